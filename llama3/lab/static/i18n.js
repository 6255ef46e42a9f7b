// The Lab page's words in English and Chinese (lab.js picks them with t(key) and data-i18n).
"use strict";

const TEXT = {
  en: { lang_button: "中文", busy: "computing…", user: "you", assistant: "model", prompt_label: "prompt",
        sampling: (s) => `sampling: temperature ${s.temperature}${s.temperature == 0 ? " (greedy)" : ""}, top-p ${s.top_p}, top-k ${s.top_k || "off"}, seed ${s.seed ?? "random"}`,
        chosen_rank: (t) => `chosen: p = ${fmt(t.prob)}, rank ${t.rank}`,
        sink: "attention on token 0 (the sink), every layer and head", stream: "stream entering the block",
        attn_adds: "attention adds", ffn_adds: "feed-forward adds", head: "head", kv: "kv",
        patch_summary: (r) => `logit[${r.answer.token}] − logit[${r.wrong.token}]: clean ${fmt(r.clean_diff)}, corrupted ${fmt(r.corrupted_diff)}`,
        attr_summary: (r) => `logit[${r.target.token}] = ${fmt(r.output)}` + (r.completeness_error == null ? "" :
          `; baseline (${r.baseline}) ${fmt(r.baseline_output)}; sum of scores ${fmt(r.scores.reduce((a, b) => a + b, 0))} (completeness error ${fmt(r.completeness_error)})`),
        fid_summary: (r) => `max |Δ logits| = ${r.max_abs_logits_diff.toExponential(2)} (${r.dtype}); ` +
          (r.first_divergence ? `first divergence: ${r.first_divergence}` : "the two implementations agree at every stage"),
        no_steps: "no steps", head_title: (l, h) => `layer ${l}` + (h == null ? "" : `, head ${h}`) },
  zh: { lang_button: "English", busy: "计算中…", user: "你", assistant: "模型", prompt_label: "提示词",
        sampling: (s) => `采样设置：温度 ${s.temperature}${s.temperature == 0 ? "（贪心）" : ""}，top-p ${s.top_p}，top-k ${s.top_k || "关"}，种子 ${s.seed ?? "随机"}`,
        chosen_rank: (t) => `选中：p = ${fmt(t.prob)}，排名 ${t.rank}`,
        sink: "每层每个头对第 0 个词元的注意力（注意力汇聚点）", stream: "进入该块的残差流",
        attn_adds: "注意力加上的", ffn_adds: "前馈层加上的", head: "头", kv: "kv",
        patch_summary: (r) => `logit[${r.answer.token}] − logit[${r.wrong.token}]：干净 ${fmt(r.clean_diff)}，被破坏 ${fmt(r.corrupted_diff)}`,
        attr_summary: (r) => `logit[${r.target.token}] = ${fmt(r.output)}` + (r.completeness_error == null ? "" :
          `；基线（${r.baseline}）${fmt(r.baseline_output)}；得分之和 ${fmt(r.scores.reduce((a, b) => a + b, 0))}（完备性误差 ${fmt(r.completeness_error)}）`),
        fid_summary: (r) => `最大 |Δ logits| = ${r.max_abs_logits_diff.toExponential(2)}（${r.dtype}）；` +
          (r.first_divergence ? `最先出现偏差：${r.first_divergence}` : "两种实现在每个阶段都一致"),
        no_steps: "没有步骤", head_title: (l, h) => `第 ${l} 层` + (h == null ? "" : `，第 ${h} 头`) },
};
const LABELS = {
  zh: { lab: "实验室", tab_chat: "对话", tab_walk: "走一遍前向计算", tab_experiments: "因果实验", tab_fidelity: "一致性",
        mode: "模式", chat: "对话", completion: "续写", max_tokens: "最多词元", temperature: "温度", seed: "种子",
        reset: "新对话", send: "发送", click_hint: "点击生成的词元，查看它是如何被选中的。",
        token_title: "选出该词元的一步：", after_reading: "读到", candidates: "候选词元", token: "词元",
        model_prob: "模型概率", sampled_prob: "采样概率", lens: "Logit 透镜：每个块之后的最佳猜测",
        attention: "所读词元对之前每个词元的注意力", layer: "层",
        attention_hint: "每行是一个查询头，按共享的键/值头分组（分组查询注意力）。第 0 列常常拿走大部分权重：注意力汇聚点。",
        residual: "残差流：每个块的注意力和前馈层加上的范数", walk: "开始", patching: "激活修补",
        patching_hint: "把干净运行中的一个激活复制到被破坏的运行中，看答案的 logit 差恢复了多少（1 = 全部）。点击格子查看该层的注意力（heads 时为该头）。",
        run: "运行", attribution: "词元归因",
        attention_not_attribution: "注意力不等于归因：一个头可能紧盯着一个对结果毫无影响的词元。这里的得分衡量的是每个词元对所选 logit 的影响。",
        steps: "步数", attribute_token: "把这个词元归因到它之前的词元", ablation: "消融", before: "之前", after: "之后",
        fidelity_hint: "运行 `llama3 doctor --reference transformers`：同一提示词分别经过本模型和 transformers 的 LlamaForCausalLM，逐块比较。",
        stage: "阶段", relative: "相对", busy: "计算中…", prompt_placeholder: "提示词",
        answer_placeholder: "答案（默认：干净运行的首选）", wrong_placeholder: "错误答案（默认：被破坏运行的首选）",
        target_placeholder: "目标（默认：首选）", heads_placeholder: "头：3.1, 5.0", blocks_placeholder: "块：2, 7" },
};
