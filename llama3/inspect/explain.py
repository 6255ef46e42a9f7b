"""Explain an answer: the prompt as the model saw it, each step's candidates, the attention
that chose the last token, and what ended the answer.  Used by `llama3 chat --explain`.

Everything comes from one teacher-forced forward pass over prompt + answer: the
logits at position p are exactly what the model computed when it chose token p+1
during generation (with a KV cache the numbers agree up to float rounding).
Probabilities are the model's own softmax (temperature 1), before any sampling
settings reshaped them.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import torch

from llama3.errors import Llama3Error
from llama3.inspect.capture import capture, resolve_layers
from llama3.inspect.tokens import as_batch, token_labels


@dataclass
class Explanation:
    prompt: list[dict]          # [{"id", "token"}]
    steps: list[dict]           # [{"chosen": {"id","token","prob","rank"}, "candidates": [{"id","token","prob"}]}]
    layer: int
    query: str                  # the token whose attention row is shown
    attention: list[dict]       # per head: {"head", "kv_head", "top": [{"position","token","weight"}]}
    ended_by: str
    rendered_prompt: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("prompt", "steps", "layer", "query", "attention", "ended_by",
                                                  "rendered_prompt")}

    def render(self, width: int = 100) -> str:
        lines = [f"prompt, {len(self.prompt)} tokens (token·id):"]
        lines += textwrap.wrap("  ".join(f"{t['token']}·{t['id']}" for t in self.prompt), width,
                               initial_indent="  ", subsequent_indent="  ")
        lines.append("")
        lines.append("each step's top candidates (model probabilities at temperature 1; ▸ = chosen):")
        for n, s in enumerate(self.steps, 1):
            c = s["chosen"]
            rank = "" if c["rank"] == 1 else f", rank {c['rank']}"
            cands = "  ".join(("▸" if k["id"] == c["id"] else " ") + f"{k['token']} {k['prob']:.2f}"
                              for k in s["candidates"])
            lines.append(f"  {n:>3}. {c['token']:<14} p={c['prob']:.2f}{rank:<9} │{cands}")
        lines.append("")
        lines.append(f"attention in layer {self.layer} of the newest token the model read ({self.query}), "
                     "the row that chose what came next:")
        for a in self.attention:
            spots = ", ".join(f"{t['token']}@{t['position']} {t['weight']:.2f}" for t in a["top"])
            lines.append(f"  head {a['head']:>2} (kv {a['kv_head']}): {spots}")
        lines.append("")
        lines.append(f"ended by: {self.ended_by}")
        return "\n".join(lines)


@torch.no_grad()
def explain_answer(llm, prompt_ids: list[int], generated_ids: list[int], stop_reason: str | None = None,
                   top_k: int = 5, layer: int = -1, top_keys: int = 3) -> Explanation:
    """Explain how `generated_ids` followed `prompt_ids`.

    stop_reason: what ended it, used when the last token is not a stop token: "stop token" (or the
    generator's "stop"), "stop string", "length" or "interrupted" (`llama3 chat` tells them apart).  layer: whose attention to show (-1: the last block).
    """
    if not prompt_ids:
        raise Llama3Error("nothing to explain: the prompt is empty")
    tok, model = llm.tokenizer, llm.model
    stop_ids = list(getattr(tok, "stop_ids", []) or [])
    ids = list(prompt_ids) + list(generated_ids)
    stop_kept = bool(generated_ids) and generated_ids[-1] in stop_ids
    fed = ids[:-1] if stop_kept else ids          # a chosen stop token was never fed back in
    (layer,) = resolve_layers(model, layer)
    cap = capture(model, as_batch(llm, fed), attention_layers=layer)
    probs = cap.logits[0].float().softmax(-1)                        # [T, V]

    def candidates(p: torch.Tensor) -> list[dict]:                   # p [V]
        top = p.topk(min(top_k, p.numel()))
        return [{"id": int(i), "token": token_labels(tok, [int(i)])[0], "prob": float(q)}
                for q, i in zip(top.values, top.indices)]

    steps = []
    for k, chosen in enumerate(generated_ids):
        p = probs[len(prompt_ids) - 1 + k]                            # [V] the distribution that chose it
        steps.append({"chosen": {"id": chosen, "token": token_labels(tok, [chosen])[0], "prob": float(p[chosen]),
                                 "rank": int((p > p[chosen]).sum()) + 1},
                      "candidates": candidates(p)})

    weights = cap.attention_weights[layer][0, :, -1].float()          # [H, S] the newest token's row
    labels = token_labels(tok, fed)
    attention = []
    for h in range(weights.shape[0]):
        best = weights[h].topk(min(top_keys, weights.shape[1]))
        attention.append({"head": h, "kv_head": h // llm.config.n_rep,
                          "top": [{"position": int(j), "token": labels[int(j)], "weight": float(w)}
                                  for w, j in zip(best.values, best.indices)]})

    if stop_kept:
        ended_by = f"the stop token {token_labels(tok, [generated_ids[-1]])[0]} (id {generated_ids[-1]})"
    elif stop_reason == "interrupted":
        ended_by = "you interrupted it (Ctrl-C): no stop token, stop string or length limit was reached"
    elif stop_reason == "length":
        ended_by = "the length limit (max_new_tokens), not a stop token"
    elif stop_reason == "stop string":
        ended_by = "a stop string (--stop): the text stopped where it appeared, not at a stop token"
    elif stop_reason in ("stop", "stop token") and stop_ids:
        last = probs[-1]                                              # [V] the step after the last token
        best = max(stop_ids, key=lambda i: float(last[i]) if i < last.numel() else -1.0)
        ended_by = (f"a stop token (the answer leaves it out); at that step the model gave "
                    f"{token_labels(tok, [best])[0]} (id {best}) p = {float(last[best]):.2f}")
    elif stop_reason:
        ended_by = f"{stop_reason} (no stop token)"
    else:
        ended_by = "no stop token (the caller did not say what ended it)"
    rendered = tok.decode(list(prompt_ids)) if tok is not None else ""
    return Explanation([{"id": i, "token": t} for i, t in zip(prompt_ids, token_labels(tok, list(prompt_ids)))],
                       steps, layer, labels[-1], attention, ended_by, rendered)
