"""The Llama walkthrough: docs/walkthrough.md and docs/walkthrough.zh.md, regenerated from a live run.

    python -m llama3.inspect.walkthrough [--out docs]      (or: llama3 inspect walkthrough --out docs)

Runs the default model on one prompt, traces it with llama3.inspect, draws the
pictures into <out>/img/, and fills the English and Chinese texts
(walkthrough_en.py, walkthrough_zh.py) with the numbers it measured and with
links to the lines of llama3/model.py that compute them (found by
`inspect.getsourcelines`, so the links stay right when the code moves).
"""

from __future__ import annotations

import argparse
import inspect as pyinspect
import math
import os
from pathlib import Path

import torch

import llama3.model as model_module
from llama3.inspect.attention import AttentionMaps, plot_attention
from llama3.inspect.capture import capture, recording
from llama3.inspect.figures import new_figure, save_figure
from llama3.inspect.logit_lens import logit_lens, plot_logit_lens
from llama3.inspect.rope import plot_rope
from llama3.inspect.tokens import as_batch, encode_prompt, token_labels
from llama3.inspect.trace import trace
from llama3.inspect.walkthrough_concepts import concept_fields, md_code

PROMPT = "The capital of France is"
CODE = {  # placeholder -> the object whose source lines the text links to
    "code_embedding": model_module.Transformer.forward, "code_rmsnorm": model_module.RMSNorm.forward,
    "code_attention": model_module.Attention.forward, "code_repeat_kv": model_module.repeat_kv,
    "code_causal_mask": model_module.causal_mask, "code_rope_freqs": model_module.rope_frequencies,
    "code_apply_rope": model_module.apply_rope, "code_ffn": model_module.FeedForward.forward,
    "code_block": model_module.TransformerBlock.forward, "code_kv_cache": model_module.KVCache.update,
    "code_transformer": model_module.Transformer.forward,
}


def code_links(out: Path) -> dict[str, str]:
    """placeholder -> a markdown link like [`model.py: Attention.forward`](../llama3/model.py#L190)."""
    links = {}
    for key, obj in CODE.items():
        file = Path(pyinspect.getsourcefile(obj))
        line = pyinspect.getsourcelines(obj)[1]
        rel = Path(os.path.relpath(file, out)).as_posix()
        links[key] = f"[`{file.name}: {obj.__qualname__}`]({rel}#L{line})"
    return links


def f3(x: float) -> str:
    return f"{x:.3g}"


def trend(values: list[float]) -> dict:
    """What a series after the embedding (index 0) and after block n (index n+1) does, in numbers:
    first, last, peak and the block after which it peaks (None when the last value is the peak)."""
    peak = max(range(len(values)), key=values.__getitem__)
    at_end = values[peak] <= values[-1] * 1.01
    return {"first": values[0], "last": values[-1], "peak": values[peak], "peak_block": None if at_end else peak - 1}


def trend_text(t: dict, lang: str = "en") -> str:
    """trend() as a phrase: 'grows from 0.1 to 25.8' or 'rises from 0.1 to 946 after block 11, then falls to 208'."""
    if lang == "zh":
        if t["peak_block"] is None:
            return f"从 {f3(t['first'])} 增长到 {f3(t['last'])}"
        return f"从 {f3(t['first'])} 升到第 {t['peak_block']} 块之后的 {f3(t['peak'])}，随后降到 {f3(t['last'])}"
    if t["peak_block"] is None:
        return f"grows from {f3(t['first'])} to {f3(t['last'])}"
    return f"rises from {f3(t['first'])} to {f3(t['peak'])} after block {t['peak_block']}, then falls to {f3(t['last'])}"


def plot_residual(token_rms: torch.Tensor, labels: list[str], big: int, attn: list[float], ffn: list[float], path):
    """The residual stream's size after each block (log scale): the token with the largest vector on
    its own, the other tokens together, and how much each sublayer adds.  The title says what the
    lines do, computed from them."""
    fig = new_figure(8.0, 4.0)
    ax = fig.add_subplot()
    x = range(token_rms.shape[0])
    big_line = token_rms[:, big].tolist()
    ax.plot(x, big_line, "-o", markersize=3, label=f"stream at token {big} `{labels[big]}` (rms)")
    title = f"residual stream (rms): token `{labels[big]}` {trend_text(trend(big_line))}"
    if token_rms.shape[1] > 1:
        rest = token_rms[:, [j for j in range(token_rms.shape[1]) if j != big]].pow(2).mean(-1).sqrt().tolist()
        ax.plot(x, rest, "-s", markersize=3, label="stream at the other tokens (rms)")
        title += f";\nthe other tokens: {trend_text(trend(rest))}"
    ax.plot(range(1, len(attn) + 1), attn, "-", lw=1, label="attention adds (rms, all tokens)")
    ax.plot(range(1, len(ffn) + 1), ffn, "--", lw=1, label="feed-forward adds (rms, all tokens)")
    ax.set_yscale("log")
    ax.set_xlabel("blocks passed (0 = right after the embedding)")
    ax.set_ylabel("root mean square")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def residual_fields(cap, labels: list[str], img: Path) -> dict:
    """The residual-stream section's numbers; draws walkthrough-residual.png."""
    streams = [cap.embedding] + cap.block_outputs                            # L+1 x [1, T, D]
    token_rms = torch.stack([s[0].float().pow(2).mean(-1).sqrt() for s in streams])  # [L+1, T]
    big = int(token_rms.max(0).values.argmax())                              # the token whose vector gets largest
    attn = [a.float().pow(2).mean().sqrt().item() for a in cap.attention_out]
    ffn = [f.float().pow(2).mean().sqrt().item() for f in cap.ffn_out]
    plot_residual(token_rms, labels, big, attn, ffn, img / "walkthrough-residual.png")
    line = token_rms[:, big]
    jump = int((line[1:] / line[:-1]).argmax())                              # block with the largest growth
    fall = int((line[1:] - line[:-1]).argmin())                              # block that shrinks it most
    update = (cap.attention_out[fall] + cap.ffn_out[fall])[0, big].float()
    cosine = torch.nn.functional.cosine_similarity(update, cap.block_inputs[fall][0, big].float(), dim=0).item()
    others = [j for j in range(token_rms.shape[1]) if j != big]
    rest = trend(token_rms[:, others].pow(2).mean(-1).sqrt().tolist()) if others else None
    big_trend = trend(line.tolist())
    name = md_code(labels[big])
    en, zh = [], []
    if rest:
        en.append(f"At the tokens other than {name}, the stream's rms {trend_text(rest)} (after the embedding → "
                  "after the last block).")
        zh.append(f"除 {name} 以外的词元上，残差流的均方根{trend_text(rest, 'zh')}（从嵌入之后到最后一块之后）。")
    special = rest is not None and big_trend["peak"] > 10 * rest["peak"]
    en.append(f"The token {name} (position {big}) {'is the exception' if special else 'has the largest vectors'}: "
              f"its rms {trend_text(big_trend)}.")
    zh.append(f"词元 {name}（位置 {big}）{'是个例外' if special else '的向量最大'}：它的均方根{trend_text(big_trend, 'zh')}。")
    if line[jump + 1] > 3 * line[jump]:
        en.append(f"Block {jump} takes it from {f3(line[jump].item())} to {f3(line[jump + 1].item())} at once.")
        zh.append(f"第 {jump} 块一下子把它从 {f3(line[jump].item())} 推到 {f3(line[jump + 1].item())}。")
    if line[fall + 1] < 0.8 * line[fall]:
        en.append(f"Block {fall} cuts it from {f3(line[fall].item())} to {f3(line[fall + 1].item())}: that block's "
                  f"update points against the stream (cosine {cosine:.2f}), so adding it cancels much of what was there.")
        zh.append(f"第 {fall} 块又把它从 {f3(line[fall].item())} 削减到 {f3(line[fall + 1].item())}：这一块的更新与残差流"
                  f"方向相反（余弦相似度 {cosine:.2f}），加上去就抵消了其中的大部分。")
    peak = max(range(len(streams)), key=lambda i: streams[i].abs().max().item())
    return {"residual_story": " ".join(en), "residual_story_zh": "".join(zh),
            "peak_value": f3(streams[peak].abs().max().item()),
            "peak_where": "the embedding" if peak == 0 else f"block {peak - 1}",
            "peak_where_zh": "嵌入" if peak == 0 else f"第 {peak - 1} 块",
            "peak_token": md_code(labels[int(streams[peak][0].abs().amax(-1).argmax())])}


def lens_fields(llm, lens, labels: list[str]) -> dict:
    """Where the logit lens settles on the final answer, and what its embedding row shows."""
    final, n = int(lens.top_ids[-1, -1]), len(lens.rows)
    first = next(r for r in range(n) if all(int(lens.top_ids[k, -1]) == final for k in range(r, n)))
    stage = "the embedding" if lens.rows[first] == "embedding" else lens.rows[first]
    if first == n - 1 and n > 1:
        before = md_code(lens.top_labels[n - 2][-1])
        settles = f"only in the last row, {lens.rows[-1]} ({lens.rows[-2]} still guesses {before})"
        settles_zh = f"只在最后一行（{_zh_stage(lens.rows[-1])}）才成为首选（{_zh_stage(lens.rows[-2])}还在猜 {before}）"
    else:
        settles = f"from {stage} on (the last {n - first} rows)"
        settles_zh = f"从{_zh_stage(lens.rows[first])}起（最后 {n - first} 行）一直是首选"
    own = [j for j in range(len(labels)) if int(lens.top_ids[0, j]) == lens.ids[j]]
    special = set(getattr(llm.tokenizer, "special_tokens", {}).values())
    examples = [(md_code(labels[j]), md_code(lens.top_labels[0][j]), int(lens.top_ids[0, j]) in special)
                for j in range(len(labels)) if j not in own][:3]
    other = ", ".join(f"{a} → {b}" + (" (a special token of this vocabulary)" if s else "") for a, b, s in examples)
    other_zh = "，".join(f"{a} → {b}" + ("（这个词表里的一个特殊词元）" if s else "") for a, b, s in examples)
    count = f"{len(own)} of {len(labels)} positions read back their own input token"
    count_zh = f"{len(labels)} 个位置中有 {len(own)} 个读出的正是输入词元本身"
    if llm.config.tie_embeddings:
        en = f"the head is the embedding matrix itself (tied), so a token's own vector mostly points back at itself: {count}"
        zh = f"输出头就是嵌入矩阵本身（共享），所以词元自己的向量大多指回它自己：{count_zh}"
    else:
        en, zh = count[0].upper() + count[1:], count_zh
    return {"lens_settles": settles, "lens_settles_zh": settles_zh,
            "lens_embedding": en + (f"; the others: {other}." if other else "."),
            "lens_embedding_zh": zh + (f"；其余的：{other_zh}。" if other_zh else "。")}


@torch.no_grad()
def measure(llm, out: Path, prompt: str = PROMPT, decode_tokens: int = 16) -> dict:
    """Run everything once; return the numbers the texts need; draw the pictures into out/img."""
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    c, model, tok = llm.config, llm.model, llm.tokenizer
    ids = encode_prompt(llm, prompt)
    labels = token_labels(tok, ids)
    t = trace(llm, prompt, layer=0)
    steps = {s.name: s for s in _walk(t.root)}
    heads = {s.name: s for s in steps["split into heads"].children}   # "q", "k", "v" are also names elsewhere
    with recording({i: block.attention for i, block in enumerate(model.layers)}, record="input") as normed:
        cap = capture(model, as_batch(llm, ids), attention_layers="all")   # normed[i]: x̂ entering attention i

    # the head that looks hardest at an earlier word (not the first token, not itself) from the last token
    best = max(((w[0, h, -1, 1:-1].max().item(), layer, h) for layer, w in cap.attention_weights.items()
                for h in range(c.n_heads)), default=(0.0, 0, 0)) if len(ids) > 2 else (0.0, 0, 0)
    _, focus_layer, focus_head = best
    focus_row = cap.attention_weights[focus_layer][0, focus_head, -1]
    focus_key = int(focus_row[1:-1].argmax()) + 1
    mid = c.n_layers // 2
    for layer, name, head in ((mid, "walkthrough-attention-grid.png", None),
                              (focus_layer, "walkthrough-attention-head.png", focus_head)):
        maps = AttentionMaps(layer, ids, labels, cap.attention_weights[layer][0].float(), c.n_rep)
        plot_attention(maps, img / name, head=head)
    sink = torch.stack([w[0, :, 1:, 0].mean() for w in cap.attention_weights.values()]).mean().item()

    lens = logit_lens(llm, ids)
    plot_logit_lens(lens, img / "walkthrough-logit-lens.png")
    from llama3.config import get_preset

    plot_rope(get_preset("llama-3.1-8b"), img / "walkthrough-rope.png",
              title="RoPE of Llama 3.1 8B (Dh=128, θ=500000): without and with scaling")

    gate = steps["silu(gate)"].tensor.float()
    probs = cap.logits[0, -1].float().softmax(-1)
    top = probs.topk(5)
    n_params = sum(p.numel() for p in model.parameters())
    scores = steps["scores = q·kᵀ/√Dh"].stats
    norm_in, norm_out = steps["embedding: h = tok_embeddings[ids]"].stats, steps["x̂ = attention_norm(x)"].stats
    return {
        "model": llm.source or "the default model", "prompt": prompt, "T": len(ids),
        "D": c.dim, "L": c.n_layers, "H": c.n_heads, "Hkv": c.n_kv_heads, "Dh": c.head_dim, "F": c.hidden_dim,
        "V": c.vocab_size, "n_rep": c.n_rep, "theta": f"{c.rope_theta:g}", "eps": f"{c.norm_eps:g}",
        "params_m": f"{n_params / 1e6:.1f}", "tied": "tied" if c.tie_embeddings else "separate",
        "token_table": "\n".join(f"| {i} | `{lab}` | {tid} |" for i, (lab, tid) in enumerate(zip(labels, ids))),
        "ids": str(ids), "emb_std": f3(norm_in["std"]), "emb_rms": f3(norm_in["rms"]),
        "norm_rms": f3(norm_out["rms"]), "norm_max": f3(norm_out["max"]),
        "qkv_q": steps["q = wq(x̂)"].shape, "qkv_k": steps["k = wk(x̂)"].shape,
        "heads_q": heads["q"].shape, "heads_k": heads["k"].shape,
        "scores_shape": steps["scores = q·kᵀ/√Dh"].shape, "scores_min": f3(scores["min"]), "scores_max": f3(scores["max"]),
        "sqrt_dh": f3(math.sqrt(c.head_dim)), "visible": len(ids) * (len(ids) + 1) // 2, "pairs": len(ids) ** 2,
        "n_rep_last": c.n_rep - 1, "mid": mid, "focus_layer": focus_layer, "focus_head": focus_head, "focus_kv": focus_head // c.n_rep,
        "focus_token": labels[focus_key], "focus_weight": f3(focus_row[focus_key].item()), "last_token": labels[-1],
        "sink": f"{100 * sink:.0f}",
        "rope_pairs": c.head_dim // 2, "rope_slowest": f"{2 * math.pi * c.rope_theta ** ((c.head_dim - 2) / c.head_dim):.3g}",
        "gate_off": f"{100 * (gate.abs() < 0.05).float().mean().item():.0f}",
        "top_table": "\n".join(f"| {k + 1} | `{token_labels(tok, [int(i)])[0]}` | {int(i)} | {p:.3f} |"
                               for k, (p, i) in enumerate(zip(top.values.tolist(), top.indices))),
        "top1": token_labels(tok, [int(top.indices[0])])[0], "top1_p": f"{top.values[0].item():.2f}",
        "tied_zh": "共享" if c.tie_embeddings else "各自独立",
        **residual_fields(cap, labels, img), **lens_fields(llm, lens, labels),
        **concept_fields(llm, ids, cap, normed, img, decode_tokens), **code_links(out),
    }


def _zh_stage(row: str) -> str:
    """"block 7" -> "第 7 块", "embedding" -> "嵌入"."""
    return "嵌入" if row == "embedding" else f"第 {row.split()[-1]} 块"


def _walk(step):
    yield step
    for child in step.children:
        yield from _walk(child)


def render_walkthrough(values: dict) -> dict[str, str]:
    """file name -> text: the English and Chinese walkthroughs filled with measure()'s values."""
    from llama3.inspect.walkthrough_en import TEXT as TEXT_EN
    from llama3.inspect.walkthrough_zh import TEXT as TEXT_ZH

    return {"walkthrough.md": TEXT_EN.format_map(values), "walkthrough.zh.md": TEXT_ZH.format_map(values)}


def write_walkthrough(out: str | os.PathLike = "docs", model: str | None = None, dtype: str = "float32",
                      llm=None, decode_tokens: int = 16) -> list[Path]:
    """Write <out>/walkthrough.md, <out>/walkthrough.zh.md and <out>/img/walkthrough-*.png."""
    from llama3.checkpoint.files import atomic_file

    if llm is None:
        import llama3

        llm = llama3.load(model, dtype=dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_walkthrough(measure(llm, out, decode_tokens=decode_tokens)).items():
        with atomic_file(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out / name)
    return written + sorted((out / "img").glob("walkthrough-*.png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the Llama walkthrough (English and Chinese).")
    parser.add_argument("--out", default="docs", help="folder to write into (default docs/)")
    parser.add_argument("--model", default=None,
                        help="model source: a folder, .gguf file, hf:ORG/NAME or built-in name (default: the "
                             "embedded model)")
    args = parser.parse_args(argv)
    for path in write_walkthrough(args.out, model=args.model):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
