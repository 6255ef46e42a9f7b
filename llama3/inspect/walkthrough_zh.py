"""Chinese text of the Llama walkthrough (中文版); `{name}` fields are filled by walkthrough.measure()."""

TEXT = """\
# Llama 模型逐步讲解

<!-- 由 `llama3 inspect walkthrough --out docs`（或 `python -m llama3.inspect.walkthrough`）自动生成。
     请勿手工修改：修改 llama3/inspect/walkthrough_zh.py 后重新生成。 -->

*[English version](walkthrough.md)*

本文跟随一句提示词 **"{prompt}"**，走完一个真实的 Llama 架构模型 `{model}` 的全部计算，
并在初学者会遇到的每个概念处停下来：词元（token）、嵌入、RMSNorm、
自注意力 softmax(QKᵀ/√d)·V、多头与分组查询注意力（GQA）、RoPE、SwiGLU、残差连接、
KV 缓存，以及 logits 如何变成下一个词元。
下文的每个数字都来自这一次实际运行；每个概念都链接到 [`llama3/model.py`](../llama3/model.py)
中计算它的代码行。你可以用 `llama3 inspect trace`、`attention`、`logit-lens` 和 `rope`
亲自查看同样的内容。

模型概况：{params_m} M 参数，宽度 D = {D}，{L} 个块（block），H = {H} 个查询头、
Hkv = {Hkv} 个键/值头，每头宽度 Dh = {Dh}，前馈层宽度 F = {F}，词表大小 V = {V}，
RoPE θ = {theta}，输出头与嵌入矩阵{tied_zh}。Llama 3 8B 的组成部分完全相同，只是更大
（D = 4096，32 个块，32/8 个头，V = 128256）。

全文统一使用以下维度记号：**B** 批大小，**T** 词元数，**S** 可见的键数，**D** 模型宽度，
**H** 查询头数，**Hkv** 键/值头数，**Dh** 每头宽度，**F** 前馈层宽度，**V** 词表大小。

## 1. 文本 → 词元 → 编号

分词器把文本切成固定词表里的片段并给它们编号。
"{prompt}" 变成 T = {T} 个词元（`␣` 表示空格，空格属于它后面的词元）：

| 位置 | 词元 | 编号 |
|---|---|---|
{token_table}

模型看不到字母，只看到这些编号：`{ids}`。

## 2. 嵌入：每个词元一个可学习的向量

`tok_embeddings` 是一张 V × D（{V} × {D}）的表，每个编号取出其中一行
（{code_embedding}）。结果 h 的形状是 [B=1, T={T}, D={D}]：每个词元一个 {D} 维向量。
这些向量的数值很小：标准差为 {emb_std}。
这个 h 就是**残差流**（residual stream）：每个块都读取它，再把自己的结果加回去。

## 3. RMSNorm：把每个向量缩放到同一尺度

在注意力和前馈层之前，每个词元的向量都要除以它的均方根，再乘以可学习的增益 g：
x̂ = x / √(mean(x²) + ε) · g（{code_rmsnorm}）。与 LayerNorm 不同，它既不减均值，也没有偏置。
在第 0 块中，嵌入向量（均方根 {emb_rms}）经过 `attention_norm` 后均方根变为 {norm_rms}
（尺度由增益 g 决定，最大值为 {norm_max}）。

## 4. 自注意力：softmax(QKᵀ/√d)·V

注意力让每个词元从它之前的词元那里收集信息（{code_attention}）。以第 0 块为例：

1. **投影。** 三个矩阵把 x̂ 变成查询、键和值：q {qkv_q}，k {qkv_k}，v 与 k 形状相同。
2. **拆分成多个头。** q 被看作 {heads_q}：{H} 个宽度为 {Dh} 的头，每个头可以关注不同的东西；
   k 和 v 被看作 {heads_k}。
3. **打分。** 每个查询与每个键做点积，再除以 √Dh = {sqrt_dh}，使数值不随头宽增大：
   scores 形状为 {scores_shape}，本例中取值在 {scores_min} 到 {scores_max} 之间。
4. **因果掩码。** 词元不能看到未来：对角线以上的分数被设为 −∞（{code_causal_mask}）。
   在 {pairs} 个查询/键组合中，有 {visible} 个保持可见。
5. **Softmax。** 每一行变成非负且和为 1 的权重。
6. **对值加权求和。** 每个头的输出等于它的权重乘以 v；各头拼接回宽度 H·Dh，
   再由输出投影 `wo` 混合。

下图是第 {mid} 块所有头的注意力权重：行是"看"的词元，列是"被看"的词元，空白三角形就是掩码。

![第 {mid} 块所有头的注意力权重](img/walkthrough-attention-grid.png)

许多头把大部分权重放在第一个词元上（在所有层和头上平均占每行的 {sink}%）：
这叫"注意力汇聚点"（attention sink），当没有其他相关内容时，注意力就停放在这里。
另一些头确实在寻找语义。从最后一个词元（`{last_token}`）出发，第 {focus_layer} 块的第
{focus_head} 个头把 {focus_weight} 的权重放在 `{focus_token}` 上：

![第 {focus_layer} 块，第 {focus_head} 个头](img/walkthrough-attention-head.png)

## 5. 多头注意力与分组查询注意力（GQA）

这个模型有 H = {H} 个查询头，却只有 Hkv = {Hkv} 个键/值头：每 {n_rep} 个查询头共享一个
键/值头。`repeat_kv` 把每个键/值头复制 {n_rep} 份，让形状对齐（{code_repeat_kv}）；
在上面的网格图中，第 0–{n_rep_last} 个头共享第 0 个键/值头。这样做的原因是：**KV 缓存**
存的正是键和值，GQA 能把缓存缩小 {n_rep} 倍，而质量损失很小（Llama 3 8B：32 个查询头，
8 个键/值头）。

## 6. RoPE：用旋转表示位置

注意力本身不关心词序。RoPE 通过**旋转** q 和 k 来加入位置信息：位置 p 上向量的第 i 对通道
旋转角度 p·θ^(−2i/Dh)（{code_rope_freqs}，{code_apply_rope}）。这样，旋转后的查询与键的
点积只取决于它们之间的*距离*，而与绝对位置无关。只旋转 q 和 k，从不旋转 v。

这个模型有 {rope_pairs} 对通道，θ = {theta}：第一对每个词元转 1 弧度（每 6.3 个词元转一圈），
最慢的一对要 {rope_slowest} 个词元才转一圈。Llama 3 使用 θ = 500000。Llama 3.1 进一步拉长
慢速通道以支持 128K 词元：波长超过 8192 的通道按一个因子减速（Llama 3.1 为 8，
Llama 3.2 1B/3B 为 **32**），波长小于 2048 的保持不变，两者之间平滑过渡。
在应当用 32 的地方误用 8，是实际中常见的错误；`llama3 doctor` 会检查这一点。

![RoPE 的频率和波长：有无缩放](img/walkthrough-rope.png)

## 7. SwiGLU 前馈层

注意力之后，每个词元独立地经过一个带门控的前馈网络（{code_ffn}）：
out = w2( silu(w1 x̂) ⊙ w3 x̂ )。w1（门，gate）和 w3（上投影，up）把 D = {D} 扩展到 F = {F}；
silu(x) = x·sigmoid(x) 起到柔性开关的作用；w2（下投影，down）再把结果变回 D 维。
在第 0 块中，{gate_off}% 的门控值几乎是关闭的（|silu| < 0.05）：每个词元只用到网络的一部分。

## 8. 残差连接

块从不替换残差流，而是往上加（{code_block}）：
h = x + attention(norm(x))；out = h + feed_forward(norm(h))。
因此嵌入中的信息可以直达顶层，每个块只需学习一个修正量。随着各块不断累加，
残差流从嵌入后的均方根 {rms_first} 增长到最后一块之后的 {rms_last}。
其中最大的单个数值 {peak_value} 出现在{peak_where_zh}之后的词元 `{peak_token}` 上：
真实模型中存在少数这样巨大的"超大激活"（massive activations），
这也是 RMSNorm 要用 float32 计算的原因。

![每个块之后残差流的大小](img/walkthrough-residual.png)

## 9. KV 缓存

生成文本时，模型预测一个词元，把它接到末尾，再运行一次。没有缓存的话，每一步都要
重新计算全文的键和值。`KVCache` 为每个位置只存一次键和值（{code_kv_cache}）；
之后每个新词元只需计算它自己的 q、k、v，并对已存储的键做注意力。
本模型在 float32 下每个词元的缓存占 {kv_token_kb} KiB（2 × {L} 层 × {Hkv} 个键/值头 × {Dh}），
完整的 {ctx} 词元上下文需要 {kv_ctx_mb} MiB；如果不用 GQA，每个词元需要 {kv_mha_kb} KiB。

## 10. Logits → 下一个词元

最后一块之后，再做一次 RMSNorm，然后输出头（一个 D → V 的矩阵，本模型中与嵌入矩阵{tied_zh}）
为每个位置上词表中的每一项给出一个分数，即 *logit*（{code_transformer}）。
Softmax 把最后一个位置的 logits 变成下一个词元的概率：

| 排名 | 词元 | 编号 | 概率 |
|---|---|---|---|
{top_table}

贪心解码选择 `{top1}`（p = {top1_p}）；采样则从这个分布中抽取，
分布的形状可由 temperature、top-k 或 top-p 调整。

**Logit lens（逻辑透镜）** 把同样的最终归一化和输出头应用到*每一个*块之后的残差流上，
就好像模型在那里停下。在最后一个位置，最终答案 `{top1}` 从{lens_first_zh}起成为首选；
更早的层猜的是标点和虚词。

![logit lens](img/walkthrough-logit-lens.png)

## 动手试试

```
llama3 inspect trace "{prompt}" --layer 0       # 第 0 块的每一步：形状与统计量
llama3 inspect attention "{prompt}" --layer {mid} --out attention.png
llama3 inspect logit-lens "{prompt}" --out lens.png
llama3 inspect rope --out rope.png
llama3 chat --explain                            # 它为什么这样回答？
llama3 doctor path/to/checkpoint --reference transformers
```
"""
