"""Token attribution: how much each input token contributes to one output token's logit.

The output is f = logit[target] at the last position (by default the model's top next token).
Its inputs, for this purpose, are the T embedding vectors x [T, D] the model looked up.

  * gradient x input:  score_t = sum_d x[t, d] * df/dx[t, d]
    (first-order: how f would move if token t's vector shrank towards zero; fast, one backward).
  * integrated gradients (Sundararajan et al. 2017):
        score_t = sum_d (x - x0)[t, d] * integral_0^1 df/dx (x0 + a (x - x0))[t, d] da
    between a baseline x0 and x.  Its "completeness": the scores sum to f(x) - f(x0), up to
    the error of the quadrature (a midpoint sum over `steps` points), reported as
    `completeness_error`.  The default baseline is one neutral token (the tokenizer's pad,
    else end, else begin token) at every position; "zero" takes zero vectors, whose path
    starts where RMSNorm is steepest: a vector a*x grows from nothing to full size within
    a ~ sqrt(eps) / rms(x).  For it the points are a_k = u_k^2 (u evenly spaced, weight
    da = 2u du), crowding near a = 0 (measured on a tiny random model: 64 even points recovered
    17% of f(x) - f(x0), squared points within 2%).  Check the error before trusting the
    scores: on SmolLM2's 30 blocks ("The capital of France is" -> " Paris", pad-token baseline,
    f(x) - f(x0) = 10.3) it was 171 at 16 points and 0.75 at 32; with zero vectors it was
    still over 50 at 64 points.

Attention is not attribution: a head can look hard at a token whose value changes nothing,
and a token can matter through a head that barely looks at it.  These scores measure effect
on the output, which attention weights do not.

The embeddings are swapped in through a forward hook on `tok_embeddings` (llama3/model.py),
so the very model that generates is the one differentiated; the hook acts only on the
calling thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama3.errors import Llama3Error
from llama3.inspect.patching import hooked, resolve_token
from llama3.inspect.tokens import as_batch, encode_prompt, token_label, token_labels

METHODS = ("integrated_gradients", "gradient_x_input")
CHUNK = 8  # interpolation points per forward/backward pass


@dataclass
class Attribution:
    method: str
    tokens: list[str]
    target: tuple[int, str]          # (id, token) whose logit is explained
    scores: torch.Tensor             # [T] one number per input token
    output: float                    # f(x): the target's logit
    baseline_output: float | None    # f(x0) (integrated gradients only)
    completeness_error: float | None  # |sum(scores) - (f(x) - f(x0))| (integrated gradients only)
    steps: int = 0
    baseline: str = ""               # "zero" or the baseline token (integrated gradients only)

    def to_dict(self) -> dict:
        return {"method": self.method, "tokens": self.tokens,
                "target": {"id": self.target[0], "token": self.target[1]}, "scores": self.scores.tolist(),
                "output": self.output, "baseline_output": self.baseline_output,
                "completeness_error": self.completeness_error, "steps": self.steps, "baseline": self.baseline,
                "note": "attention is not attribution: these scores measure each token's effect on the "
                        "target logit; attention weights only say where a head looked"}


def _logits_from(model, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Run the model with tok_embeddings' output replaced by embeddings [n, T, D] -> logits [n, T, V]."""
    def swap(mod, args, output):
        return embeddings.to(output.dtype)

    with hooked(model.tok_embeddings, swap):
        return model(tokens.expand(embeddings.shape[0], -1))


def neutral_token(llm) -> int | None:
    """The tokenizer's pad id, else its end id, else its begin id (None without a tokenizer)."""
    tok = llm.tokenizer
    for name in ("pad_id", "eos_id", "bos_id"):
        i = getattr(tok, name, None) if tok is not None else None
        if isinstance(i, int) and 0 <= i < llm.config.vocab_size:
            return i
    return None


def attribute(llm, prompt: str | list[int], target: int | str | None = None,
              method: str = "integrated_gradients", steps: int = 32, baseline: int | str | None = None) -> Attribution:
    """Attribute logit[target] at the last position to the prompt's tokens.

    target: a token id or the text of one token (default: the top next token).
    method: "integrated_gradients" or "gradient_x_input".  steps: interpolation points (IG).
    baseline: None (a neutral token: pad, else eos, else bos; zero vectors if there is none), "zero",
    or a token (id or text) whose embedding fills every position (IG).
    """
    if method not in METHODS:
        raise Llama3Error(f"unknown method {method!r}; choose {' or '.join(METHODS)}")
    if not 1 <= int(steps) <= 1024:
        raise Llama3Error(f"steps={steps} is out of range; use 1..1024 (32 is usually enough)")
    model = llm.model
    ids = encode_prompt(llm, prompt)
    tokens = as_batch(llm, ids)                                        # [1, T]
    with torch.no_grad():
        x = model.tok_embeddings(tokens)[0].float()                    # [T, D]
        logits = model(tokens)[0, -1].float()                          # [V]
    target_id = resolve_token(llm, target, "target")
    target_id = int(logits.argmax()) if target_id is None else target_id
    output = float(logits[target_id])
    labels = token_labels(llm.tokenizer, ids)
    named = (target_id, token_label(llm.tokenizer, target_id))

    def f_and_grad(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [n, T, D] -> f at each [n], df/dpoints [n, T, D]."""
        points = points.detach().requires_grad_(True)
        with torch.enable_grad():
            f = _logits_from(model, tokens, points)[:, -1, target_id].float()  # [n]
            (grad,) = torch.autograd.grad(f.sum(), points)
        return f.detach(), grad.float()

    if method == "gradient_x_input":
        _, grad = f_and_grad(x[None])
        return Attribution(method, labels, named, (x * grad[0]).sum(-1).cpu(), output, None, None, 1)

    baseline_id = neutral_token(llm) if baseline is None else (
        None if baseline == "zero" else resolve_token(llm, baseline, "baseline"))
    if baseline_id is None:
        x0 = torch.zeros_like(x)
    else:
        with torch.no_grad():
            x0 = model.tok_embeddings(torch.full_like(tokens, baseline_id))[0].float()  # [T, D]
    with torch.no_grad():
        f0 = float(_logits_from(model, tokens, x0[None])[0, -1, target_id])
    total = torch.zeros_like(x)                                        # [T, D] sum of gradients
    u = (torch.arange(steps, dtype=torch.float32, device=x.device) + 0.5) / steps  # [steps]
    if baseline_id is None:
        alphas, weights = u * u, 2 * u / steps                         # a = u^2, da = 2u du
    else:
        alphas, weights = u, torch.full_like(u, 1 / steps)
    for start in range(0, steps, CHUNK):
        a = alphas[start:start + CHUNK, None, None]                    # [n, 1, 1]
        _, grad = f_and_grad(x0 + a * (x - x0))                        # [n, T, D]
        total += (weights[start:start + CHUNK, None, None] * grad).sum(0)
    scores = ((x - x0) * total).sum(-1)                                # [T]
    error = abs(float(scores.sum()) - (output - f0))
    return Attribution(method, labels, named, scores.cpu(), output, f0, error, int(steps),
                       "zero" if baseline_id is None else token_label(llm.tokenizer, baseline_id))


def plot_attribution(result: Attribution, path):
    """One bar per input token: its score (positive pushes the target up, negative down)."""
    from llama3.inspect.figures import new_figure, save_figure

    t = len(result.tokens)
    fig = new_figure(min(24.0, 3.0 + 0.45 * t), 3.6)
    ax = fig.add_subplot()
    values = result.scores.tolist()
    ax.bar(range(t), values, color=["tab:red" if v > 0 else "tab:blue" for v in values])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(t), result.tokens, rotation=90, fontsize=7)
    ax.set_ylabel(f"contribution to logit[{result.target[1]}]")
    name = result.method.replace("_", " ")
    extra = "" if result.completeness_error is None else f" (sum vs f(x) − f(x0): error {result.completeness_error:.2g})"
    ax.set_title(f"token attribution, {name}{extra}; attention is not attribution", fontsize=9)
    return save_figure(fig, path)
