"""Choosing the next token from logits: small pure functions, one per rule.

Every function takes logits [B, V] (one row per sequence) and returns new
logits [B, V]; a token a rule removes gets -inf, so softmax gives it
probability 0.  `sample` chains them in the order transformers uses:

    logits -> repetition penalty -> / temperature -> top-k -> top-p -> min-p
           -> softmax -> draw one token per row (with an explicit torch.Generator)

temperature == 0 means greedy: the argmax of the (penalised) logits.

Nothing here copies to the host, so a decode loop pays no device->host sync
for sampling; the generator lives on the logits' device.
"""

from __future__ import annotations

import math

import torch

from llama3.errors import Llama3Error


def validate_sampling(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                      repetition_penalty: float = 1.0, max_new_tokens: int = 1, seed: int | None = None) -> None:
    """Raise Llama3Error naming the first invalid value (the defaults all mean 'off')."""
    def bad(name, value, rule):
        raise Llama3Error(f"{name}={value!r} is invalid: {rule}")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not number(temperature) or temperature < 0:
        bad("temperature", temperature, "use 0 for greedy decoding or a positive number (0.7 is typical)")
    if not integer(top_k) or top_k < 0:
        bad("top_k", top_k, "use 0 to turn it off or a positive number of tokens to keep")
    if not number(top_p) or not 0 < top_p <= 1:
        bad("top_p", top_p, "it must be in (0, 1]; 1 turns it off")
    if not number(min_p) or not 0 <= min_p <= 1:
        bad("min_p", min_p, "it must be in [0, 1]; 0 turns it off")
    if not number(repetition_penalty) or repetition_penalty <= 0:
        bad("repetition_penalty", repetition_penalty, "it must be positive; 1 turns it off, 1.1 is typical")
    if not integer(max_new_tokens) or max_new_tokens < 1:
        bad("max_new_tokens", max_new_tokens, "generate at least 1 token")
    if seed is not None and (not integer(seed) or not -2**63 <= seed < 2**64):
        bad("seed", seed, "use an integer in [-2**63, 2**64), or None for a random seed")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen (prompt or output) less likely, as transformers and llama.cpp do:
    a positive logit is divided by `penalty`, a negative one multiplied by it.

    logits [B, V]; seen [B, V] bool (True where the row already contains the token).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (and any tied with the k-th); k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_best = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probabilities
    add up to at least p (always at least the top token); p = 1 keeps all."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V], most likely first
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                          # [B, V]: mass of the better tokens
    drop_sorted = mass_before >= p                                      # the nucleus is already full
    drop = drop_sorted.scatter(-1, order, drop_sorted)                  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens at least min_p times as likely as the most likely one; min_p = 0 keeps all."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)                                     # [B, V]
    threshold = min_p * probs.max(dim=-1, keepdim=True).values         # [B, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: [B, V] -> [B]."""
    return logits.argmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from probabilities [B, V] -> [B].

    argmax(p_i / E_i) with E_i ~ Exponential(1) picks token i with probability p_i
    (the "exponential race"); unlike torch.multinomial it needs no host sync.
    """
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row: logits [B, V] -> ids [B] (long, on the logits' device).

    seen [B, V] bool is needed only for repetition_penalty != 1.
    """
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return greedy(logits)
    logits = logits / temperature
    logits = apply_min_p(apply_top_p(apply_top_k(logits, top_k), top_p), min_p)
    return draw(logits.softmax(dim=-1), generator)
