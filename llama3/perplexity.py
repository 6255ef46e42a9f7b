"""Perplexity: how surprised a model is by a text, on average, per token.

    perplexity = exp( mean over scored tokens of  -log p(token | the tokens before it) )

A perplexity of 10 means the model was, on average, as unsure as if it chose
uniformly among 10 tokens.  Lower is better; it is the standard quick check
that a checkpoint loaded correctly and the price a quantization pays.

A model sees at most `context` tokens at once, so a long text is read through
a sliding window (the method of the Hugging Face perplexity guide):

    text tokens:  t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 ...
    window 1:     [t0 ............ t7]            scores t1..t7  (t0 has no context)
    window 2:           [t4 ............ t11]     scores t8..t11 (t4..t7 are context only)
                  <-- stride -->

Each window starts `stride` tokens after the previous one and scores only the
tokens the previous window did not, so every token after the first is scored
exactly once, with at least `context - stride` tokens of context (except near
the start).  A stride near `context` is fast (little overlap, less context per
token); a smaller stride gives more context at more cost.  stride < context, so
every window keeps at least one token of context for the first token it scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from llama3.errors import Llama3Error


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens[begin:end] go in; the last `n_scored` of them are scored."""

    begin: int
    end: int
    n_scored: int


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float   # exp(nll)
    nll: float          # mean negative log-likelihood per scored token, in nats
    n_scored: int       # tokens scored (all but the first)
    n_windows: int      # forward passes made
    context: int
    stride: int

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)


def plan_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The sliding windows that score tokens 1..n_tokens-1 once each (see the module docstring)."""
    if context < 2:
        raise Llama3Error(f"context={context} is too small; a window needs at least 2 tokens")
    if not 1 <= stride < context:
        raise Llama3Error(f"stride={stride} must be at least 1 and less than context={context}, "
                          "so that every scored token has context in its window")
    if n_tokens < 2:
        raise Llama3Error(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    windows, scored_until = [], 1  # token 0 is never scored: nothing comes before it
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + context, n_tokens)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return windows


def window_nll(logits: torch.Tensor, tokens: torch.Tensor, n_scored: int) -> torch.Tensor:
    """Summed -log p of the last n_scored tokens of one window.

    logits [T, V] (row i predicts token i+1), tokens [T] (long) -> scalar (float64).
    """
    predicting = logits[-n_scored - 1:-1].float()  # [n_scored, V]: the rows that predict the scored tokens
    targets = tokens[-n_scored:]                  # [n_scored]
    return F.cross_entropy(predicting, targets, reduction="sum").double()


def perplexity_of_ids(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: list[int],
                      context: int, stride: int | None = None,
                      windows_done: Callable[[int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity with any model: `logits_fn(tokens [T]) -> logits [T, V]`.

    Taking a function (not our Transformer) lets the benchmarks score llama.cpp's
    logits with exactly the same windows.  stride defaults to context // 2.
    """
    if stride is None:
        stride = max(1, context // 2)
    windows = plan_windows(len(ids), context, stride)
    all_tokens = torch.tensor(ids, dtype=torch.long)  # [N]
    total = torch.zeros((), dtype=torch.float64)
    for window in windows:
        tokens = all_tokens[window.begin:window.end]  # [T]
        total += window_nll(logits_fn(tokens), tokens, window.n_scored)
        if windows_done is not None:
            windows_done(1)
    n_scored = len(ids) - 1
    nll = float(total) / n_scored
    return PerplexityResult(math.exp(nll), nll, n_scored, len(windows), context, stride)


def model_logits_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a Transformer as `tokens [T] -> logits [T, V]` (no cache, no grad)."""
    device = model.norm.weight.device  # (int8/int4 models keep their weights in buffers)

    @torch.inference_mode()
    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens.to(device).unsqueeze(0))[0].cpu()  # [1, T] -> [T, V], beside the CPU token ids

    return logits_fn


def perplexity(llm, text: str, context: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of `text` under a loaded `LLM` (its model and tokenizer).

    context: tokens per window (default min(model's max_seq_len, 512));
    stride: tokens between window starts (default context // 2);
    max_tokens: score only the first N tokens of the text (a quick estimate).
    The text is encoded with the tokenizer's default BOS, as the model saw in training.
    """
    if llm.tokenizer is None:
        raise Llama3Error("this checkpoint has no tokenizer; perplexity needs one to encode the text")
    if context is None:
        context = min(llm.config.max_seq_len, 512)
    if context < 2:
        raise Llama3Error(f"context={context} is too small; a window needs at least 2 tokens")
    if context > llm.config.max_seq_len:
        raise Llama3Error(f"context={context} exceeds the model's max_seq_len={llm.config.max_seq_len}")
    if stride is None:
        stride = max(1, context // 2)
    if stride < 1:
        raise Llama3Error(f"stride={stride} must be at least 1 (and less than context={context})")
    if max_tokens is not None and max_tokens < 1:
        raise Llama3Error(f"max_tokens={max_tokens} must be a positive number of tokens (omit it to score all)")
    ids = llm.tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan_windows(len(ids), context, stride)), unit="window", desc="perplexity")
    try:
        return perplexity_of_ids(model_logits_fn(llm.model), ids, context, stride,
                                 windows_done=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
