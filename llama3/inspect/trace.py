"""`llama3 inspect trace`: follow one prompt through the model, step by step, with real tensors.

    text -> tokens -> ids -> embedding -> blocks -> final norm -> logits -> next token

Every step is a `Step`: a name, the tensor's shape with named dimensions
(`[B=1, T=7, H=9, Dh=64]`, legend in llama3/model.py) and summary statistics.
Blocks are summarised in one line each; the block chosen with `layer=` is shown
operation by operation from the taps of model.py (identity modules at each step of
the block: q, k, v, after RoPE, scores, weights, each head's output, gate, up, ...),
hooked during one ordinary forward pass with the explicit attention path, so nothing
is recomputed here.  A check compares that block with the same block run unwatched
(fused attention).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field

import torch

from llama3.inspect.capture import capture, recording, resolve_layers
from llama3.inspect.tokens import as_batch, encode_prompt, token_labels
from llama3.model import TransformerBlock


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


# ------------------------------------------------------- one block, through its taps
def block_taps(block: TransformerBlock) -> dict[str, torch.nn.Module]:
    """The modules of one block whose outputs the trace shows, by name (the taps of model.py and
    the block's own submodules): hooked during one ordinary forward pass, nothing recomputed."""
    att, ff = block.attention, block.feed_forward
    taps = {"xn": block.attention_norm, "attn_out": att, "h": block.after_attention, "hn": block.ffn_norm,
            "act": ff.act, "down": ff, "out": block.after_ffn, "weights": att.softmax}
    taps |= {name: getattr(att, name) for name in ("q", "k", "v", "q_rotated", "k_rotated", "keys", "values",
                                                   "scores", "masked_scores", "heads")}
    return taps | {name: getattr(ff, name) for name in ("gate", "up", "hidden")}


def block_steps(block: TransformerBlock, seen: dict[str, torch.Tensor], cos: torch.Tensor) -> list[Step]:
    """The steps of one block from what its taps recorded (`block_taps`), in model.py's order."""
    att = block.attention
    q, k, v = seen["q"], seen["k"], seen["v"]                                # [B, T, H|Hkv, Dh]
    batch, seqlen = q.shape[:2]
    projections = Step("q/k/v projections", children=[
        step("q = wq(x̂)", q.flatten(2), ("B", "T", "H·Dh"), "one query vector per token", "Attention.forward: self.wq"),
        step("k = wk(x̂)", k.flatten(2), ("B", "T", "Hkv·Dh"), "keys: fewer heads (grouped-query)",
             "Attention.forward: self.wk"),
        step("v = wv(x̂)", v.flatten(2), ("B", "T", "Hkv·Dh"), "values", "Attention.forward: self.wv")])
    heads = Step("split into heads", note=f"{att.n_heads} query heads, {att.n_kv_heads} key/value heads of width "
                 f"{att.head_dim}", code="Attention.forward: .view", children=[
                     step("q", q, ("B", "T", "H", "Dh")), step("k", k, ("B", "T", "Hkv", "Dh")),
                     step("v", v, ("B", "T", "Hkv", "Dh"))])
    rope = Step("RoPE: rotate q and k by position", note="pair i of position p turns by p·θ^(−2i/Dh); v is not rotated",
                code="apply_rope", children=[
                    step("cos table", cos, ("T", "Dh/2")), step("q rotated", seen["q_rotated"], ("B", "T", "H", "Dh")),
                    step("k rotated", seen["k_rotated"], ("B", "T", "Hkv", "Dh"))])
    repeat = Step(f"repeat KV heads ×{att.n_rep}", note=f"query head h reads kv head h // {att.n_rep}",
                  code="repeat_kv", children=[step("k", seen["keys"], ("B", "H", "S", "Dh")),
                                              step("v", seen["values"], ("B", "H", "S", "Dh"))])
    masked, mixed = seen["masked_scores"], seen["heads"].transpose(1, 2)     # [B, H, T, S], [B, H, T, Dh]
    visible = int(torch.isfinite(masked[0, 0]).sum())
    concat = seen["heads"].reshape(batch, seqlen, -1)                       # [B, T, H*Dh], as Attention.forward
    attention = Step("attention", code="Attention.forward", children=[
        step("x̂ = attention_norm(x)", seen["xn"], BTD, "x / rms(x) · g", "RMSNorm.forward"),
        projections, heads, rope, repeat,
        step("scores = q·kᵀ/√Dh", seen["scores"], ("B", "H", "T", "S"),
             f"how well each query matches each key; √Dh = {math.sqrt(att.head_dim):.3g}"),
        step("causal mask", masked, ("B", "H", "T", "S"),
             f"future keys set to −inf: {visible} of {masked[0, 0].numel()} query/key pairs stay visible", "causal_mask"),
        step("softmax → attention weights", seen["weights"], ("B", "H", "T", "S"), "each row sums to 1", "self.softmax"),
        step("weighted sum of values", mixed, ("B", "H", "T", "Dh"), "weights · v"),
        step("concat heads", concat, ("B", "T", "H·Dh")),
        step("output projection wo", seen["attn_out"], BTD, code="Attention.forward: self.wo"),
        step("residual add: h = x + attn", seen["h"], BTD, code="TransformerBlock.forward")])
    feed_forward = Step("feed-forward (SwiGLU)", code="FeedForward.forward", children=[
        step("ĥ = ffn_norm(h)", seen["hn"], BTD, code="RMSNorm.forward"),
        step("gate = w1(ĥ)", seen["gate"], ("B", "T", "F")),
        step("silu(gate)", seen["act"], ("B", "T", "F"), "x · sigmoid(x): a smooth switch"),
        step("up = w3(ĥ)", seen["up"], ("B", "T", "F")),
        step("silu(gate) * up", seen["hidden"], ("B", "T", "F"), "the gate scales each hidden unit"),
        step("down = w2(·)", seen["down"], BTD, "back to model width"),
        step("residual add: out = h + ffn", seen["out"], BTD, code="TransformerBlock.forward")])
    return [attention, feed_forward]


# ------------------------------------------------------------------- trace
@dataclass
class Trace:
    prompt: str | list[int]
    ids: list[int]
    labels: list[str]
    root: Step
    top_next: list[dict]                   # [{"id", "token", "prob"}], best first
    checks: dict = field(default_factory=dict)  # layer -> {"block_output_max_abs_diff", "weights_max_abs_diff",
    #                                                        "unwatched_max_abs_diff"}

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
    tokens = as_batch(llm, ids)
    taps = {(i, name): module for i in detailed for name, module in block_taps(model.layers[i]).items()}
    with recording(taps) as seen:                      # the explicit path of the detailed blocks, watched
        cap = capture(model, tokens, attention_layers=detailed)
    with recording({i: model.layers[i] for i in detailed}) as unwatched, torch.no_grad():
        model(tokens)                                  # the same blocks as they run when nobody looks
    cos, _ = model.rope(torch.arange(len(ids), device=llm.device))         # [T, Dh/2]

    steps = [Step("text", note=repr(prompt) if isinstance(prompt, str) else "(token ids given)"),
             Step("tokens", shape=f"[T={len(ids)}]", note=" │ ".join(labels)),
             Step("ids", shape=f"[T={len(ids)}]", note=str(ids)),
             step("embedding: h = tok_embeddings[ids]", cap.embedding, BTD,
                  "one learned row of the V×D table per token", "Transformer.forward: tok_embeddings")]
    checks = {}
    for i, block in enumerate(model.layers):
        if i in detailed:
            mine = {name: tensor for (layer_id, name), tensor in seen.items() if layer_id == i}
            children, out = block_steps(block, mine, cos), mine["out"]
            mixed = mine["weights"].float() @ mine["values"].float()       # [B, H, T, Dh]
            checks[i] = {"block_output_max_abs_diff": (out - cap.block_outputs[i]).abs().max().item(),
                         "weights_max_abs_diff": (mixed - mine["heads"].transpose(1, 2).float()).abs().max().item(),
                         "unwatched_max_abs_diff": (out - unwatched[i]).abs().max().item()}
            children.append(Step("check", note="the traced block output vs the block's own: max |Δ| = "
                                 f"{checks[i]['block_output_max_abs_diff']:.3g}; weights · v vs the heads' output: "
                                 f"max |Δ| = {checks[i]['weights_max_abs_diff']:.3g}; vs the block run unwatched "
                                 f"(fused attention): max |Δ| = {checks[i]['unwatched_max_abs_diff']:.3g}"))
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
