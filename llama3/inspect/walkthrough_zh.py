"""Chinese text of the Llama walkthrough (中文版); `{name}` fields are filled by walkthrough.measure()."""

TEXT = """\
# Llama 模型逐步讲解

<!-- 由 `llama3 inspect walkthrough --out docs`（或 `python -m llama3.inspect.walkthrough`）自动生成。
     请勿手工修改：修改 llama3/inspect/walkthrough_zh.py 后重新生成。 -->

*[English version](walkthrough.md)*

本文跟随一句提示词 **"{prompt}"**，走完一个真实的 Llama 架构模型 `{model}` 的全部计算，
并在初学者会遇到的每个概念处停下来：编码器与解码器、词元（token）、嵌入、RMSNorm
及它所取代的 LayerNorm、自注意力 softmax(QKᵀ/√d)·V、逐头计算的多头注意力与分组查询注意力
（GQA）、RoPE、SwiGLU、残差连接、logits 如何变成下一个词元，以及 KV 缓存的实测演示。
下文的每个数字都来自这一次实际运行；每个概念都链接到 [`llama3/model.py`](../llama3/model.py)
中计算它的代码行。你可以用 `llama3 inspect trace`、`attention`、`logit-lens` 和 `rope`
亲自查看同样的内容。

模型概况：{params_m} M 参数，宽度 D = {D}，{L} 个块（block），H = {H} 个查询头、
Hkv = {Hkv} 个键/值头，每头宽度 Dh = {Dh}，前馈层宽度 F = {F}，词表大小 V = {V}，
RoPE θ = {theta}，输出头与嵌入矩阵{tied_zh}。Llama 3 8B 的组成部分完全相同，只是更大
（D = 4096，32 个块，32/8 个头，V = 128256）。

全文统一使用以下维度记号：**B** 批大小，**T** 词元数，**S** 可见的键数，**D** 模型宽度，
**H** 查询头数，**Hkv** 键/值头数，**Dh** 每头宽度，**F** 前馈层宽度，**V** 词表大小。

## 1. 编码器与解码器：Transformer 的两半，以及 Llama 为什么只保留一半

最初的 Transformer（2017 年，为机器翻译而设计）有两个堆栈。**编码器**（encoder）一次读入整段
源文本；它的每个块包含**自注意力**（每个词元都可以看到它前后的所有词元）、**残差连接 + 归一化**
（"add & norm"）、一个**前馈网络**，以及又一个 add & norm。**解码器**（decoder）一次写出一个
输出词元；它的每个块包含**带掩码的自注意力**（词元只能看到它之前的词元）、add & norm、
**编码器–解码器交叉注意力**（cross-attention：查询来自解码器，键和值来自编码器的输出——解码器
正是在这里读取源文本）、add & norm、一个前馈网络、add & norm。

模型保留其中一半或两半都要，于是形成三大家族：

| 家族 | 块的组成 | 代表模型 | 用途 |
|---|---|---|---|
| 仅编码器（encoder-only） | 能看到两侧的自注意力 | BERT | 理解文本：分类、标注、检索 |
| 仅解码器（decoder-only） | 带掩码的自注意力，没有交叉注意力 | GPT、**Llama** | 续写文本：生成、对话 |
| 编码器–解码器 | 两个堆栈，用交叉注意力相连 | 2017 年的 Transformer、T5 | 把一段文本变成另一段 |

![编码器–解码器结构的 Transformer 与仅解码器的 Llama](img/walkthrough-encoder-decoder.png)

Llama 是**仅解码器**模型：只有一个由 {L} 个相同的块组成的堆栈，没有编码器，因此交叉注意力
无物可读，它也就没有交叉注意力。它的块与 2017 年的解码器还有一些细节上的不同（下文会逐一
遇到）：归一化用的是 RMSNorm，并且放在每个子层*之前*（pre-norm）；注意力使用 RoPE 和分组
查询头；前馈层是 SwiGLU。从实际模型中读出的一个块的组成：

| 模块 | 权重形状 | 参数量 |
|---|---|---|
{block_table}

每个块有 {block_params} 个参数，其中 {attention_params} 个在注意力里。整个模型有 {n_attention}
个注意力模块，每块一个，而且都是自注意力：它的输入是 `{attention_inputs}`，只有一条流 x，
q、k、v 都由它算出。T5 式的解码器会在每个块里再加一个注意力（在这里就是再多
{cross_params_m} M 个参数）。

为什么一半就够了：提示词只不过是这条流中最前面的那些词元，"源文本"不需要单独的堆栈；训练
就是在原始文本上做下一个词元预测，每个序列的每个位置都是一个训练样本；同一个堆栈既负责
理解也负责书写。掩码让它成为解码器，这一点可以验证：把最后一个词元换掉（`{last_token}` →
{causal_other}），最后一个位置的 logits 最多改变 {causal_last}，而之前每个位置的 logits 只改变
{causal_earlier}：没有哪个位置能看到未来。这也是生成时可以保留之前词元计算结果的原因（第 12 节）。

## 2. 文本 → 词元 → 编号

分词器把文本切成固定词表里的片段并给它们编号。
"{prompt}" 变成 T = {T} 个词元（`␣` 表示空格，空格属于它后面的词元）：

| 位置 | 词元 | 编号 |
|---|---|---|
{token_table}

模型看不到字母，只看到这些编号：`{ids}`。

## 3. 嵌入：每个词元一个可学习的向量

`tok_embeddings` 是一张 V × D（{V} × {D}）的表，每个编号取出其中一行
（{code_embedding}）。结果 h 的形状是 [B=1, T={T}, D={D}]：每个词元一个 {D} 维向量。
这些向量的数值很小：标准差为 {emb_std}。
这个 h 就是**残差流**（residual stream）：每个块都读取它，再把自己的结果加回去。

## 4. RMSNorm：把每个向量缩放到同一尺度

在注意力和前馈层之前，每个词元的向量都要除以它的均方根，再乘以可学习的增益 g：
x̂ = x / √(mean(x²) + ε) · g（{code_rmsnorm}）。与 LayerNorm 不同，它既不减均值，也没有偏置。
在第 0 块中，嵌入向量（均方根 {emb_rms}）经过 `attention_norm` 后均方根变为 {norm_rms}
（尺度由增益 g 决定，最大值为 {norm_max}）。

## 5. LayerNorm 与 RMSNorm：在真实向量上对比

**LayerNorm** 是 2017 年的 Transformer、BERT 和 GPT-2 使用的归一化，它先把向量标准化，
再缩放和平移：

    μ = mean(x),   σ² = mean((x − μ)²),   LayerNorm(x) = (x − μ) / √(σ² + ε) · γ + β

其中每个通道有可学习的增益 γ 和偏置 β。**RMSNorm** 去掉了减均值和偏置，并用均方根代替标准差：

    RMSNorm(x) = x / √(mean(x²) + ε) · g

因为 mean(x²) = σ² + μ²，所以均值为 0 时两者完全相同，差别只取决于均值偏离 0 的程度。
取一个真实向量 h：第 {ln_block} 块入口处、词元 {ln_token} 上的残差流。它的均值为 {ln_mean}，
方差为 {ln_var}（σ = {ln_std}），均方根为 {ln_rms}。用这一块的增益 g（并取 β = 0：Llama
本来就没有偏置）做两种归一化，下表并排列出前几个通道和绝对值最大的几个通道：

| 通道 | h | LayerNorm(h) | RMSNorm(h) |
|---|---|---|---|
{ln_table}

在全部 D = {D} 个通道上，两者最多相差 {ln_delta}（余弦相似度 {ln_cos}）。这些数字来自上面的
公式；`torch.nn.functional.layer_norm` 给出相同的 LayerNorm（max |Δ| = {ln_torch_delta}），
模型自己的 `RMSNorm` 模块给出相同的 RMSNorm（max |Δ| = {rms_model_delta}；与真实前向计算中
送入注意力的 x̂ 相比：{rms_hook_delta}）。

为什么去掉均值就够了：各个块需要的是无论前面加了什么，每个向量都处在同一尺度上（重新缩放）；
重新居中作用不大，因为隐藏向量的均值相对于它的大小很小。在这个模型的残差流中，遍历全部
{L} 个块和 {T} 个词元（共 {ln_checked} 个向量），|均值| 最多只有均方根的 {ln_worst_ratio}%，
两种归一化的方向几乎一致（余弦相似度 ≥ {ln_min_cos}）。RMSNorm 每个向量少做一次归约（不求
均值），也省掉了偏置（{n_norms} 个归一化层 × {D} = {ln_bias_params} 个参数），而训练效果
同样好（Zhang 和 Sennrich 2019 年提出 RMSNorm 时的结论）。

## 6. 自注意力：softmax(QKᵀ/√d)·V

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

## 7. 逐头计算的多头注意力，以及 GQA

学习笔记中多头注意力的写法：第 h 个头有自己的三个矩阵 W_q^h、W_k^h、W_v^h（每个都是
Dh × D = {mh_head}），并且与其他头分开、独立地计算自己的注意力：

    head_h = softmax( (x̂ W_q^hᵀ)(x̂ W_k^hᵀ)ᵀ / √Dh + mask ) · x̂ W_v^hᵀ        [T, Dh]

然后把 H 个头的输出**拼接**起来，再由输出投影混合：
out = concat(head_0, …, head_H−1) · W_oᵀ，其中 W_o 为 {mh_wo}。

`model.py` 并不逐个头循环。它把 H 个矩阵 W_q^h 叠成一个大矩阵 wq（{mh_wq}），只做一次矩阵
乘法，再把结果*看作*多个头：`.view(B, T, H, Dh)` 的意思是第 h 个头拥有 wq 的第 h·Dh 到
(h+1)·Dh − 1 行。与叠起来的大矩阵相乘，就是并排做 H 次与各个切片的乘法，所以两种写法是同一个
计算。实测验证：逐头计算（每个头分别施加 RoPE）在**全部 {L} 个块中**都复现了模型注意力加到
残差流上的结果，max |Δ| = **{mh_delta}**（输出的绝对值最大到 {mh_scale}，差别来自 float32
舍入）。这个检验能抓住错误的分头方式：如果把 wq 的行交错地分给各头（第 h 个头拥有第 h、h + H、
h + 2H、… 行，即 `.view(B, T, Dh, H)` 的含义），max |Δ| 会达到 {mh_wrong_min} 到 {mh_wrong_max}。

在这个框架下看**分组查询注意力**：有 H = {H} 个 W_q^h，却只有 Hkv = {Hkv} 对 W_k^g、W_v^g
（wk 和 wv 为 {mh_wk}），第 h 个查询头使用第 g = h // {n_rep} 对。于是每 {n_rep} 个查询头共享
一个键/值头；在上面的网格图中，第 0–{n_rep_last} 个头共享第 0 个键/值头。在大矩阵的写法里，
`repeat_kv` 把每个键/值头复制 {n_rep} 份，让形状对齐（{code_repeat_kv}）。这样做的原因是：
**KV 缓存**存的正是键和值，GQA 能把缓存缩小 {n_rep} 倍（在这里还省下 {mh_kv_params} M 个参数），
而质量损失很小（Llama 3 8B：32 个查询头，8 个键/值头）。

## 8. RoPE：用旋转表示位置

注意力本身不关心词序。RoPE 通过**旋转** q 和 k 来加入位置信息：位置 p 上向量的第 i 对通道
旋转角度 p·θ^(−2i/Dh)（{code_rope_freqs}，{code_apply_rope}）。这样，旋转后的查询与键的
点积只取决于它们之间的*距离*，而与绝对位置无关。只旋转 q 和 k，从不旋转 v。

这个模型有 {rope_pairs} 对通道，θ = {theta}：第一对每个词元转 1 弧度（每 6.3 个词元转一圈），
最慢的一对要 {rope_slowest} 个词元才转一圈。Llama 3 使用 θ = 500000。Llama 3.1 进一步拉长
慢速通道以支持 128K 词元：波长超过 8192 的通道按一个因子减速（Llama 3.1 为 8，
Llama 3.2 1B/3B 为 **32**），波长小于 2048 的保持不变，两者之间平滑过渡。
在应当用 32 的地方误用 8，是实际中常见的错误；`llama3 doctor` 会检查这一点。

![RoPE 的频率和波长：有无缩放](img/walkthrough-rope.png)

## 9. SwiGLU 前馈层

注意力之后，每个词元独立地经过一个带门控的前馈网络（{code_ffn}）：
out = w2( silu(w1 x̂) ⊙ w3 x̂ )。w1（门，gate）和 w3（上投影，up）把 D = {D} 扩展到 F = {F}；
silu(x) = x·sigmoid(x) 起到柔性开关的作用；w2（下投影，down）再把结果变回 D 维。
在第 0 块中，{gate_off}% 的门控值几乎是关闭的（|silu| < 0.05）：每个词元只用到网络的一部分。

## 10. 残差连接

块从不替换残差流，而是往上加（{code_block}）：
h = x + attention(norm(x))；out = h + feed_forward(norm(h))。
因此嵌入中的信息可以直达顶层，每个块只需学习一个修正量。{residual_story_zh}
最大的单个数值 {peak_value} 出现在{peak_where_zh}之后的词元 {peak_token} 上：真实模型中存在
少数这样巨大的"超大激活"（massive activations，常出现在第一个词元上，那里是注意力停放的地方），
这也是 RMSNorm 要用 float32 计算的原因。图中把向量最大的那个词元与其他词元分开画，
因为把它们平均在一起会把两种情况都掩盖掉。

![每个块之后残差流的大小](img/walkthrough-residual.png)

## 11. Logits → 下一个词元

最后一块之后，再做一次 RMSNorm，然后输出头（一个 D → V 的矩阵，本模型中与嵌入矩阵{tied_zh}）
为每个位置上词表中的每一项给出一个分数，即 *logit*（{code_transformer}）。
Softmax 把最后一个位置的 logits 变成下一个词元的概率：

| 排名 | 词元 | 编号 | 概率 |
|---|---|---|---|
{top_table}

贪心解码选择 `{top1}`（p = {top1_p}）；采样则从这个分布中抽取，
分布的形状可由 temperature、top-k 或 top-p 调整。

**Logit lens（逻辑透镜）** 把同样的最终归一化和输出头应用到*每一个*块之后的残差流上，
就好像模型在那里停下。在最后一个位置，最终答案 `{top1}` {lens_settles_zh}；更早的层猜的是
标点和虚词。最下面一行读的是嵌入之后的残差流：{lens_embedding_zh}图中 `␣` 表示空格，
`↵` 表示换行，`…` 表示标签太长被截断；图下方的说明写出了每个被截断标签的全文。

![logit lens](img/walkthrough-logit-lens.png)

## 12. KV 缓存：实测演示

生成文本时，模型预测一个词元，把它接到末尾，再运行一次。没有缓存的话，每一步都要把全文重新
送过每一个块，重新计算那些不可能改变的键和值（每个位置只能看到过去，见第 1 节）。`KVCache`
为每个位置只存一次 k 和 v（{code_kv_cache}）；之后每个新词元只需计算它自己的 q、k、v，
并对已存储的键做注意力。

在这个模型上实测：贪心解码，在 {T} 个词元的提示词之后生成 {kv_n} 个新词元。两次运行得到的词元
{kv_same_zh}（"{kv_text}"），最后一步的 logits 相差 {kv_logit_delta}：

| | 使用缓存 | 不使用缓存 |
|---|---|---|
| 送过各块的词元位置总数 | {kv_pos_with} | {kv_pos_without}（{kv_pos_ratio}×） |
| 矩阵乘法计算量（GFLOP） | {kv_gflop_with} | {kv_gflop_without}（{kv_flop_ratio}×） |
| 时间（秒；{kv_device}，{kv_threads} 个线程，每步取 {kv_repeats} 次中最快的一次） | {kv_s_with} | {kv_s_without}（{kv_speedup}×） |

使用缓存时，提示词只送一次，之后每步一个位置：生成 N 个词元共 T + N − 1 个位置。不使用缓存时，
第 n 步要重新送入全部 T + n 个位置：共 N·T + N(N−1)/2 个，随 N 平方增长而不是线性增长。
FLOPs 由 `torch.utils.flop_counter` 统计；时间是在重新生成本页的那台机器上逐步测得的（两种方式背靠背交替运行，当时的
负载为 {kv_load}），会有波动；在短文本上，时间的节省比计算量的节省小，因为每一步仍要把所有权重读一遍。

代价是内存。对每个词元，缓存为每一层、每个键/值头各存一个键向量和一个值向量：

    字节数 = 2（k 和 v）× 层数 × Hkv × Dh × 每个元素的字节数 × 词元数 × 批大小

本模型：2 × {L} × {Hkv} × {Dh} × {kv_elem}（{kv_dtype}）= 每个词元 {kv_token}（bfloat16 下为
{kv_token_bf16}；不用 GQA 则为 {kv_token_mha}）。演示用的缓存（{kv_demo_len} 个位置）占
{kv_demo_size}；完整的 {kv_ctx} 词元上下文需要 {kv_ctx_size}（为它创建的真实 `KVCache` 分配了
{kv_alloc} 字节；公式给出 {kv_formula}）。**Llama 3.1 8B**（层数 = {l8b_L}，Hkv = {l8b_Hkv}，
Dh = {l8b_Dh}，bfloat16 = 2 字节）：每个词元 {l8b_token}，8192 个词元 {l8b_8k}，完整的
{l8b_ctx} 词元上下文 {l8b_ctx_size}（float32 下为 {l8b_ctx_fp32}；如果用 {l8b_H} 个而不是
{l8b_Hkv} 个键/值头，则为 {l8b_mha_size}）。在长上下文中，占满内存的是缓存，而不是权重
（bfloat16 下 {l8b_weights}）。

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
