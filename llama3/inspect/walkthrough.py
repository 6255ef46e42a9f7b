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
from llama3.inspect.capture import capture
from llama3.inspect.figures import new_figure, save_figure
from llama3.inspect.logit_lens import logit_lens, plot_logit_lens
from llama3.inspect.rope import plot_rope
from llama3.inspect.tokens import as_batch, encode_prompt, token_labels
from llama3.inspect.trace import trace

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


def plot_residual(rms: list[float], attn: list[float], ffn: list[float], path):
    """How big the residual stream is after each block, and how much each sublayer adds (log scale)."""
    fig = new_figure(8.0, 3.8)
    ax = fig.add_subplot()
    ax.plot(range(len(rms)), rms, "-o", markersize=3, label="residual stream h (rms)")
    ax.plot(range(1, len(attn) + 1), attn, "-", label="attention adds (rms)")
    ax.plot(range(1, len(ffn) + 1), ffn, "--", label="feed-forward adds (rms)")
    ax.set_yscale("log")
    ax.set_xlabel("after the embedding (0) and after block n (n+1)")
    ax.set_ylabel("root mean square")
    ax.set_title("the residual stream grows as every block adds to it")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


@torch.no_grad()
def measure(llm, out: Path, prompt: str = PROMPT) -> dict:
    """Run everything once; return the numbers the texts need; draw the pictures into out/img."""
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    c, model, tok = llm.config, llm.model, llm.tokenizer
    ids = encode_prompt(llm, prompt)
    labels = token_labels(tok, ids)
    t = trace(llm, prompt, layer=0)
    steps = {s.name: s for s in _walk(t.root)}
    heads = {s.name: s for s in steps["split into heads"].children}   # "q", "k", "v" are also names elsewhere
    cap = capture(model, as_batch(llm, ids), attention_layers="all")

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

    streams = [cap.embedding] + cap.block_outputs
    rms = [s.float().pow(2).mean().sqrt().item() for s in streams]
    attn = [a.float().pow(2).mean().sqrt().item() for a in cap.attention_out]
    ffn = [f.float().pow(2).mean().sqrt().item() for f in cap.ffn_out]
    plot_residual(rms, attn, ffn, img / "walkthrough-residual.png")
    peak = max(range(len(streams)), key=lambda i: streams[i].abs().max().item())
    peak_value = streams[peak].abs().max().item()
    peak_token = int(streams[peak][0].abs().amax(-1).argmax())

    lens = logit_lens(llm, ids)
    plot_logit_lens(lens, img / "walkthrough-logit-lens.png")
    final = int(lens.top_ids[-1, -1])
    first = next(r for r in range(len(lens.rows)) if all(int(lens.top_ids[k, -1]) == final
                                                          for k in range(r, len(lens.rows))))
    from llama3.config import get_preset

    plot_rope(get_preset("llama-3.1-8b"), img / "walkthrough-rope.png",
              title="RoPE of Llama 3.1 8B (Dh=128, θ=500000): without and with scaling")

    gate = steps["silu(gate)"].tensor.float()
    probs = cap.logits[0, -1].float().softmax(-1)
    top = probs.topk(5)
    kv_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4  # k and v, every layer, float32
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
        "kv_token_kb": f"{kv_bytes / 1024:.0f}", "kv_mha_kb": f"{kv_bytes * c.n_rep / 1024:.0f}",
        "kv_ctx_mb": f"{kv_bytes * c.max_seq_len / 2**20:.0f}", "ctx": c.max_seq_len,
        "rope_pairs": c.head_dim // 2, "rope_slowest": f"{2 * math.pi * c.rope_theta ** ((c.head_dim - 2) / c.head_dim):.3g}",
        "gate_off": f"{100 * (gate.abs() < 0.05).float().mean().item():.0f}",
        "rms_first": f3(rms[0]), "rms_last": f3(rms[-1]), "peak_value": f3(peak_value),
        "peak_where": "the embedding" if peak == 0 else f"block {peak - 1}", "peak_token": labels[peak_token],
        "top_table": "\n".join(f"| {k + 1} | `{token_labels(tok, [int(i)])[0]}` | {int(i)} | {p:.3f} |"
                               for k, (p, i) in enumerate(zip(top.values.tolist(), top.indices))),
        "top1": token_labels(tok, [int(top.indices[0])])[0], "top1_p": f"{top.values[0].item():.2f}",
        "lens_first": lens.rows[first], "lens_first_zh": _zh_stage(lens.rows[first]),
        "tied_zh": "共享" if c.tie_embeddings else "各自独立",
        "peak_where_zh": "嵌入" if peak == 0 else f"第 {peak - 1} 块",
        **code_links(out),
    }


def _zh_stage(row: str) -> str:
    """"block 7" -> "第 7 块", "embedding" -> "嵌入"."""
    return "嵌入" if row == "embedding" else f"第 {row.split()[-1]} 块"


def _walk(step):
    yield step
    for child in step.children:
        yield from _walk(child)


def write_walkthrough(out: str | os.PathLike = "docs", model: str | None = None, dtype: str = "float32",
                      llm=None) -> list[Path]:
    """Write <out>/walkthrough.md, <out>/walkthrough.zh.md and <out>/img/walkthrough-*.png."""
    from llama3.checkpoint.files import atomic_file
    from llama3.inspect.walkthrough_en import TEXT as TEXT_EN
    from llama3.inspect.walkthrough_zh import TEXT as TEXT_ZH

    if llm is None:
        import llama3

        llm = llama3.load(model, dtype=dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    values = measure(llm, out)
    written = []
    for name, text in (("walkthrough.md", TEXT_EN), ("walkthrough.zh.md", TEXT_ZH)):
        with atomic_file(out / name) as tmp:
            tmp.write_text(text.format_map(values), encoding="utf-8")
        written.append(out / name)
    return written + sorted((out / "img").glob("walkthrough-*.png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the Llama walkthrough (English and Chinese).")
    parser.add_argument("--out", default="docs", help="folder to write into (default docs/)")
    parser.add_argument("--model", default=None, help="model source (default: the embedded model)")
    args = parser.parse_args(argv)
    for path in write_walkthrough(args.out, model=args.model):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
