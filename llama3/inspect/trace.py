"""`llama3 inspect trace`: follow one prompt through the model, step by step, with real tensors.

    text -> tokens -> ids -> embedding -> blocks -> final norm -> logits -> next token

Every step is a `Step`: a name, the tensor's shape with named dimensions
(`[B=1, T=7, H=9, Dh=64]`, legend in llama3/model.py) and summary statistics.
Blocks are summarised in one line each; the block chosen with `layer=` is redone
operation by operation by `unroll_block`, which repeats TransformerBlock.forward
with the model's own weights and functions (apply_rope, repeat_kv, causal_mask,
the RMSNorm modules), and then checks itself against what the model really
computed (block output and attention weights, captured through hooks).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llama3.inspect.capture import capture, resolve_layers
from llama3.inspect.tokens import as_batch, encode_prompt, token_labels
from llama3.model import TransformerBlock, apply_rope, causal_mask, repeat_kv


# ------------------------------------------------------------------- steps
@dataclass
class Step:
    """One node of the trace tree.  `tensor` stays in memory for tests; JSON leaves it out."""

    name: str
    shape: str = ""
    stats: dict | None = None
    note: str = ""
    code: str = ""
    children: list["Step"] = field(default_factory=list)
    tensor: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {"name": self.name}
        for key in ("shape", "stats", "note", "code"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.children:
            d["children"] = [c.to_dict() for c in self.children]
        return d


def named_shape(tensor: torch.Tensor, dims: tuple[str, ...]) -> str:
    """[1, 7, 9, 64] with ("B", "T", "H", "Dh") -> "[B=1, T=7, H=9, Dh=64]"."""
    assert len(dims) == tensor.dim(), f"{dims} does not name every axis of {tuple(tensor.shape)}"
    return "[" + ", ".join(f"{name}={size}" for name, size in zip(dims, tensor.shape)) + "]"


def tensor_stats(tensor: torch.Tensor) -> dict:
    """mean, std, min, max, rms over the finite entries (masked scores hold -inf)."""
    x = tensor.detach().float()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return {}
    return {"mean": x.mean().item(), "std": x.std().item() if x.numel() > 1 else 0.0,
            "min": x.min().item(), "max": x.max().item(), "rms": x.pow(2).mean().sqrt().item()}


def step(name: str, tensor: torch.Tensor, dims: tuple[str, ...], note: str = "", code: str = "") -> Step:
    return Step(name, named_shape(tensor, dims), tensor_stats(tensor), note, code, tensor=tensor)


BTD = ("B", "T", "D")


# ------------------------------------------------------- one block, unrolled
def unroll_block(block: TransformerBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 ) -> tuple[list[Step], torch.Tensor, torch.Tensor]:
    """TransformerBlock.forward redone one operation at a time, from its input x [B, T, D].

    Returns (steps, block output [B, T, D], attention weights [B, H, T, S]).
    Same modules, same functions, same order as llama3/model.py (explicit attention path).
    """
    att = block.attention
    batch, seqlen, _ = x.shape
    n_heads, n_kv, head_dim = att.n_heads, att.n_kv_heads, att.head_dim

    # -- attention: h = x + wo(softmax(q kᵀ / √Dh + mask) v)
    xn = block.attention_norm(x)                                            # [B, T, D]
    q, k, v = att.wq(xn), att.wk(xn), att.wv(xn)                             # [B, T, H*Dh], [B, T, Hkv*Dh] x2
    projections = Step("q/k/v projections", children=[
        step("q = wq(x̂)", q, ("B", "T", "H·Dh"), "one query vector per token", "Attention.forward: self.wq"),
        step("k = wk(x̂)", k, ("B", "T", "Hkv·Dh"), "keys: fewer heads (grouped-query)", "Attention.forward: self.wk"),
        step("v = wv(x̂)", v, ("B", "T", "Hkv·Dh"), "values", "Attention.forward: self.wv")])
    q = q.view(batch, seqlen, n_heads, head_dim)                             # [B, T, H, Dh]
    k = k.view(batch, seqlen, n_kv, head_dim)                                # [B, T, Hkv, Dh]
    v = v.view(batch, seqlen, n_kv, head_dim)                                # [B, T, Hkv, Dh]
    heads = Step("split into heads", note=f"{n_heads} query heads, {n_kv} key/value heads of width {head_dim}",
                 code="Attention.forward: .view", children=[
                     step("q", q, ("B", "T", "H", "Dh")), step("k", k, ("B", "T", "Hkv", "Dh")),
                     step("v", v, ("B", "T", "Hkv", "Dh"))])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)                  # same shapes, rotated
    rope = Step("RoPE: rotate q and k by position", note="pair i of position p turns by p·θ^(−2i/Dh); v is not rotated",
                code="apply_rope", children=[
                    step("cos table", cos, ("T", "Dh/2")), step("q rotated", q, ("B", "T", "H", "Dh")),
                    step("k rotated", k, ("B", "T", "Hkv", "Dh"))])
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)        # [B, H|Hkv, T, Dh]
    k, v = repeat_kv(k, att.n_rep), repeat_kv(v, att.n_rep)                  # [B, H, S, Dh]
    repeat = Step(f"repeat KV heads ×{att.n_rep}", note=f"query head h reads kv head h // {att.n_rep}",
                  code="repeat_kv", children=[step("k", k, ("B", "H", "S", "Dh")), step("v", v, ("B", "H", "S", "Dh"))])
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)                   # [B, H, T, S]
    mask = causal_mask(seqlen, k.shape[2], 0, device=x.device)               # [T, S]
    masked = scores.masked_fill(~mask, float("-inf"))                        # [B, H, T, S]
    weights = att.softmax(masked.float()).type_as(q)                         # [B, H, T, S]
    mixed = weights @ v                                                      # [B, H, T, Dh]
    concat = mixed.transpose(1, 2).reshape(batch, seqlen, -1)                # [B, T, H*Dh]
    attn_out = att.wo(concat)                                                # [B, T, D]
    h = x + attn_out                                                         # [B, T, D]
    visible = int(mask.sum())
    attention = Step("attention", code="Attention.forward", children=[
        step("x̂ = attention_norm(x)", xn, BTD, "x / rms(x) · g", "RMSNorm.forward"),
        projections, heads, rope, repeat,
        step("scores = q·kᵀ/√Dh", scores, ("B", "H", "T", "S"), f"how well each query matches each key; √Dh = {math.sqrt(head_dim):.3g}"),
        step("causal mask", masked, ("B", "H", "T", "S"),
             f"future keys set to −inf: {visible} of {mask.numel()} query/key pairs stay visible", "causal_mask"),
        step("softmax → attention weights", weights, ("B", "H", "T", "S"), "each row sums to 1", "self.softmax"),
        step("weighted sum of values", mixed, ("B", "H", "T", "Dh"), "weights · v"),
        step("concat heads", concat, ("B", "T", "H·Dh")),
        step("output projection wo", attn_out, BTD, code="Attention.forward: self.wo"),
        step("residual add: h = x + attn", h, BTD, code="TransformerBlock.forward")])

    # -- feed-forward (SwiGLU): out = h + w2(silu(w1 ĥ) * w3 ĥ)
    ff = block.feed_forward
    hn = block.ffn_norm(h)                                                   # [B, T, D]
    gate, up = ff.w1(hn), ff.w3(hn)                                          # [B, T, F] each
    activated = F.silu(gate)                                                 # [B, T, F]
    product = activated * up                                                 # [B, T, F]
    down = ff.w2(product)                                                    # [B, T, D]
    out = h + down                                                           # [B, T, D]
    feed_forward = Step("feed-forward (SwiGLU)", code="FeedForward.forward", children=[
        step("ĥ = ffn_norm(h)", hn, BTD, code="RMSNorm.forward"),
        step("gate = w1(ĥ)", gate, ("B", "T", "F")),
        step("silu(gate)", activated, ("B", "T", "F"), "x · sigmoid(x): a smooth switch"),
        step("up = w3(ĥ)", up, ("B", "T", "F")),
        step("silu(gate) * up", product, ("B", "T", "F"), "the gate scales each hidden unit"),
        step("down = w2(·)", down, BTD, "back to model width"),
        step("residual add: out = h + ffn", out, BTD, code="TransformerBlock.forward")])
    return [attention, feed_forward], out, weights


# ------------------------------------------------------------------- trace
@dataclass
class Trace:
    prompt: str | list[int]
    ids: list[int]
    labels: list[str]
    root: Step
    top_next: list[dict]                   # [{"id", "token", "prob"}], best first
    checks: dict = field(default_factory=dict)  # layer -> {"block_output_max_abs_diff", "weights_max_abs_diff"}

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "ids": self.ids, "tokens": self.labels,
                "steps": [c.to_dict() for c in self.root.children], "top_next": self.top_next,
                "checks": {str(k): v for k, v in self.checks.items()}}

    def render(self) -> str:
        return render_tree(self.root)


def trace(llm, prompt: str | list[int], layer: int | None = None, top_k: int = 5) -> Trace:
    """Run `prompt` through `llm` and record every step; block `layer` (if given) in full detail."""
    model, tok = llm.model, llm.tokenizer
    ids = encode_prompt(llm, prompt)
    labels = token_labels(tok, ids)
    detailed = resolve_layers(model, layer) if layer is not None else []
    cap = capture(model, as_batch(llm, ids), attention_layers=detailed)
    cos, sin = model.rope(torch.arange(len(ids), device=llm.device))       # [T, Dh/2] each

    steps = [Step("text", note=repr(prompt) if isinstance(prompt, str) else "(token ids given)"),
             Step("tokens", shape=f"[T={len(ids)}]", note=" │ ".join(labels)),
             Step("ids", shape=f"[T={len(ids)}]", note=str(ids)),
             step("embedding: h = tok_embeddings[ids]", cap.embedding, BTD,
                  "one learned row of the V×D table per token", "Transformer.forward: tok_embeddings")]
    checks = {}
    for i, block in enumerate(model.layers):
        if i in detailed:
            with torch.no_grad():
                children, out, weights = unroll_block(block, cap.block_inputs[i], cos, sin)
            checks[i] = {"block_output_max_abs_diff": (out - cap.block_outputs[i]).abs().max().item(),
                         "weights_max_abs_diff": (weights.float() - cap.attention_weights[i].float()).abs().max().item()}
            children.append(Step("check", note="recomputed block output vs the model's own: max |Δ| = "
                                 f"{checks[i]['block_output_max_abs_diff']:.3g}; attention weights: max |Δ| = "
                                 f"{checks[i]['weights_max_abs_diff']:.3g}"))
            steps.append(Step(f"block {i}", named_shape(out, BTD), tensor_stats(out), code="TransformerBlock.forward",
                              children=children, tensor=out))
        else:
            attn_rms = tensor_stats(cap.attention_out[i])["rms"]
            ffn_rms = tensor_stats(cap.ffn_out[i])["rms"]
            steps.append(step(f"block {i}", cap.block_outputs[i], BTD,
                              f"attention adds rms {attn_rms:.3g}, feed-forward adds rms {ffn_rms:.3g}"))
    steps.append(step("final norm", cap.final_norm, BTD, code="Transformer.forward: self.norm"))
    steps.append(step("logits = output(norm(h))", cap.logits, ("B", "T", "V"),
                      "a score for every vocabulary entry at every position", "Transformer.forward: self.output"))
    probs = cap.logits[0, -1].float().softmax(-1)                           # [V]
    top = probs.topk(min(top_k, probs.numel()))
    top_next = [{"id": int(j), "token": token_labels(tok, [int(j)])[0], "prob": float(p)}
                for p, j in zip(top.values, top.indices)]
    steps.append(Step("next token (softmax of the last position's logits)", shape=f"[V={probs.numel()}]",
                      children=[Step(f"{k + 1}. {t['token']!s}", note=f"p = {t['prob']:.3f}   id {t['id']}")
                                for k, t in enumerate(top_next)]))
    title = f"trace of {len(ids)} tokens through {type(model).__name__} ({len(model.layers)} blocks)"
    return Trace(prompt, ids, labels, Step(title, children=steps), top_next, checks)


# ------------------------------------------------------------------ render
def format_stats(stats: dict | None) -> str:
    if not stats:
        return ""
    return (f"mean {stats['mean']:+.3g}  std {stats['std']:.3g}  "
            f"min {stats['min']:+.3g}  max {stats['max']:+.3g}")


def pad(text: str, width: int) -> str:
    """Left-justify by what the eye sees: combining marks (the hat of x̂) take no column."""
    visible = sum(not unicodedata.combining(c) for c in text)
    return text + " " * max(0, width - visible)


def render_tree(root: Step, name_width: int = 38, shape_width: int = 28) -> str:
    """The trace as a box-drawing tree: name, shape, stats; notes on their own line."""
    lines = [root.name]

    def walk(node: Step, prefix: str) -> None:
        for n, child in enumerate(node.children):
            last = n == len(node.children) - 1
            head = prefix + ("└─ " if last else "├─ ")
            cont = prefix + ("   " if last else "│  ")
            text = head + child.name
            if child.shape or child.stats:
                text = f"{pad(text, name_width)} {child.shape:<{shape_width}} {format_stats(child.stats)}".rstrip()
                if child.note:
                    lines.append(text)
                    text = cont + ("│  " if child.children else "   ") + "· " + child.note
            elif child.note and len(text) < name_width:
                text = f"{pad(text, name_width)} {child.note}"
            elif child.note:
                lines.append(text)
                text = cont + ("│  " if child.children else "   ") + "· " + child.note
            lines.append(text)
            walk(child, cont)

    walk(root, "")
    return "\n".join(lines)
