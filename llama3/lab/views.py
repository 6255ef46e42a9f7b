"""What the Lab's page shows, computed on request from the loaded model: plain dicts ready for JSON.

    generate_events(...)    the streamed answer, one event per token with its candidates
    token_views(...)        for one step: attention of the token read (every layer, every head),
                            the logit lens and the residual stream at that position
    head_map(...)           one layer's full attention maps (the page opens a head from patching)
    fidelity(...)           `llama3 doctor --reference transformers`'s comparison, on demand

Every view is one forward pass through hooks on the readable model (llama3/model.py); a view
that would not fit in memory is refused before it runs (`check_fits`).  Shapes use the legend
of llama3/model.py.
"""

from __future__ import annotations

import os

import torch

from llama3.errors import Llama3Error
from llama3.generate import GenerationSettings, generate_tokens
from llama3.inspect.capture import explicit_attention
from llama3.inspect.patching import hooked
from llama3.inspect.tokens import as_batch, token_label, token_labels
from llama3.sampling import apply_min_p, apply_top_k, apply_top_p

TOP = 10  # candidates per generated token
MAX_CELLS = 2_000_000  # numbers in one view's JSON (~40 MB): more is refused rather than sent


class TooLarge(Llama3Error):
    """A view would need more memory than is free."""


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (the engine's reading of it)."""
    from llama3.engine.memory import available_memory

    return available_memory(device)


def check_fits(llm, needed: int, what: str) -> None:
    """Refuse a view needing `needed` bytes when less than twice that is free (leave room for the rest)."""
    free = free_bytes(llm.device)
    if free is not None and 2 * needed > free:
        raise TooLarge(f"{what} needs about {needed / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free; "
                       "use a shorter prompt (or a smaller model)")


def check_cells(cells: int, what: str) -> None:
    """Refuse a view whose answer would hold more than MAX_CELLS numbers."""
    if cells > MAX_CELLS:
        raise TooLarge(f"{what} is {cells:,} numbers, more than the page takes ({MAX_CELLS:,}); "
                       "use a shorter prompt")


def forward_bytes(llm, t: int, batch: int = 1, attention: bool = False) -> int:
    """A generous estimate of one forward pass's peak: activations and logits, plus
    [B, H, T, T] scores and weights when the explicit attention path runs."""
    c = llm.config
    element = 4
    total = batch * t * (6 * c.dim + 3 * c.hidden_dim + c.vocab_size) * element
    if attention:
        total += 3 * batch * c.n_heads * t * t * element
    return total


# ------------------------------------------------------------------ generation
def _candidates(tok, probs: torch.Tensor, filtered: torch.Tensor, k: int = TOP) -> list[dict]:
    best = probs.topk(min(k, probs.numel()))
    return [{"id": int(i), "token": token_label(tok, int(i)), "prob": float(p), "sampled_prob": float(filtered[i])}
            for p, i in zip(best.values, best.indices)]


def sampling_distribution(logits: torch.Tensor, s: GenerationSettings) -> torch.Tensor:
    """logits [V] -> the distribution the sampler drew from: sampling.sample's filters, in its order
    (greedy: all mass on the argmax).  The repetition penalty is left out (it needs the history)."""
    logits = logits.float()
    if s.temperature == 0:
        out = torch.zeros_like(logits)
        out[logits.argmax()] = 1.0
        return out
    x = apply_min_p(apply_top_p(apply_top_k((logits / s.temperature)[None], s.top_k), s.top_p), s.min_p)
    return x[0].softmax(-1)


def generate_events(llm, prompt_ids: list[int], settings: GenerationSettings):
    """Yield dicts: {"type": "prompt"}, then one {"type": "token"} per new token (its text piece,
    the top candidates of the model's own softmax and of the sampling distribution), then {"type": "end"}."""
    tok = llm.tokenizer
    yield {"type": "prompt", "ids": prompt_ids, "tokens": token_labels(tok, prompt_ids),
           "settings": {k: getattr(settings, k) for k in ("temperature", "top_k", "top_p", "min_p", "seed",
                                                          "max_new_tokens")}}
    gen = generate_tokens(llm.model, [prompt_ids], settings, tok.stop_ids, return_logits=True)
    decoder = tok.stream_decoder()
    for index, step in enumerate(gen):
        token = step.tokens[0]
        if token is None:
            break
        logits = step.logits[0].float()                                  # [V] what this token was drawn from
        probs = logits.softmax(-1)
        stop = token in gen.stop_ids
        text = "" if stop else decoder.add(token)
        if gen.finish_reasons[0] is not None:
            text += decoder.flush()
        yield {"type": "token", "index": index, "id": token, "token": token_label(tok, token), "text": text,
               "stop": stop, "prob": float(probs[token]), "rank": int((probs > probs[token]).sum()) + 1,
               "candidates": _candidates(tok, probs, sampling_distribution(logits, settings))}
    yield {"type": "end", "finish_reason": gen.finish_reasons[0] or "length", "completion_tokens": len(gen.tokens[0])}


# ----------------------------------------------------------------- token views
@torch.no_grad()
def token_views(llm, ids: list[int], top: int = 5) -> dict:
    """The model reading ids [T]; views of the last position, the step that chose the next token:

    attention  [L][H][T]: the last token's attention weights over every token, per layer and head
    lens       per row (embedding, block 0..L-1): the top next tokens read from the stream there
    residual   per block: the L2 norm of the stream entering it, and of what attention and the
               feed-forward add at this position; the stream's norm after the last block
    """
    model, c = llm.model, llm.config
    check_cells(c.n_layers * c.n_heads * len(ids), "the attention of the last token in every layer and head")
    check_fits(llm, forward_bytes(llm, len(ids), attention=True), "the attention of this many tokens")
    n = len(model.layers)
    rows: dict[int, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}

    def keep_row(i):
        def hook(mod, args, output):
            rows[i] = output[0, :, -1].float().cpu()                      # [H, S] the last query's row
        return hook

    def keep_last(name, use_input=False):
        def hook(mod, args, output):
            value = args[0] if use_input else output
            last[name] = value[0, -1].detach().float()                    # [D] at the last position
        return hook

    from contextlib import ExitStack

    with ExitStack() as stack:
        stack.enter_context(explicit_attention(model, range(n)))
        stack.enter_context(hooked(model.tok_embeddings, keep_last("embedding")))
        for i, block in enumerate(model.layers):
            stack.enter_context(hooked(block.attention.softmax, keep_row(i)))
            stack.enter_context(hooked(block, keep_last(f"block{i}")))
            stack.enter_context(hooked(block.attention, keep_last(f"attn{i}")))
            stack.enter_context(hooked(block.feed_forward, keep_last(f"ffn{i}")))
        logits = model(as_batch(llm, ids))[0, -1].float()                # [V]
    tok = llm.tokenizer
    streams = [last["embedding"]] + [last[f"block{i}"] for i in range(n)]  # L+1 x [D]
    lens = []
    for name, h in zip(["embedding"] + [f"block {i}" for i in range(n)], streams):
        probs = model.output(model.norm(h.to(model.norm.weight.dtype)[None])).float().softmax(-1)[0]  # [V]
        best = probs.topk(min(top, probs.numel()))
        lens.append({"layer": name, "top": [{"id": int(j), "token": token_label(tok, int(j)), "prob": float(p)}
                                            for p, j in zip(best.values, best.indices)]})
    probs = logits.softmax(-1)
    best = probs.topk(min(top, probs.numel()))
    return {
        "tokens": token_labels(tok, ids), "position": len(ids) - 1, "n_rep": c.n_rep,
        "attention": [rows[i].tolist() for i in range(n)],
        "lens": lens,
        "residual": {"stream": [float(s.norm()) for s in streams],
                     "attention_adds": [float(last[f"attn{i}"].norm()) for i in range(n)],
                     "ffn_adds": [float(last[f"ffn{i}"].norm()) for i in range(n)]},
        "next": [{"id": int(j), "token": token_label(tok, int(j)), "prob": float(p)}
                 for p, j in zip(best.values, best.indices)],
    }


@torch.no_grad()
def head_map(llm, ids: list[int], layer: int) -> dict:
    """Every head's full attention map [H][T][T] of one layer."""
    from llama3.inspect.attention import attention_maps

    check_cells(llm.config.n_heads * len(ids) ** 2, "one layer's attention maps")
    check_fits(llm, forward_bytes(llm, len(ids), attention=True), "these attention maps")
    maps = attention_maps(llm, ids, layer=layer)
    return {"layer": maps.layer, "tokens": maps.labels, "n_rep": maps.n_rep, "weights": maps.weights.tolist()}


# --------------------------------------------------------------------- fidelity
def fidelity(llm, source: str | None, ids: list[int]) -> dict:
    """Our logits against transformers' on ids: `llama3 doctor --reference transformers`'s comparison."""
    from llama3.inspect.doctor import compare_with_transformers, load_transformers_reference
    from llama3.llm import resolve_source

    if source is False:
        raise Llama3Error("this model was not loaded from a checkpoint file, so there is nothing for "
                          "transformers to load; start the lab with --model SOURCE")
    path = resolve_source(source)
    if not os.path.exists(path):
        raise Llama3Error(f"{path}: no such file or folder")
    reference = load_transformers_reference(path)
    try:
        comparison = compare_with_transformers(llm, reference, ids)
    finally:
        del reference
    data = comparison.to_dict()
    logits = next((s for s in data["stages"] if s["stage"] == "logits"), None)
    data["max_abs_logits_diff"] = logits["max_abs_diff"] if logits else None
    data["dtype"] = str(llm.model.dtype).removeprefix("torch.")
    return data
