"""Choosing the next token from logits: small pure functions, one per rule, and `Sampler`,
which applies them for ONE sequence with its own state.

Every function takes logits [B, V] (one row per sequence) and returns new
logits [B, V]; a token a rule removes gets -inf, so softmax gives it
probability 0.  `sample` chains them in the order transformers uses:

    logits -> repetition penalty -> / temperature -> top-k -> top-p -> min-p
           -> softmax -> draw one token per row (with an explicit torch.Generator)

temperature == 0 means greedy: the argmax of the (penalised) logits.

`Sampler` (one per sequence: the engine keeps one for each running request) adds what
belongs to a sequence rather than a batch: its seed's torch.Generator, the penalty state
(tokens seen, output counts), logit_bias, an optional logits processor (a grammar
matcher) and the log-probabilities of each chosen token.

The pure functions copy nothing to the host, so a decode loop pays no device->host sync
for sampling; the generator lives on the logits' device.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from llama3.errors import Llama3Error

# Below these, a value is the same as its "off"/greedy end in all but name, and float32 arithmetic
# goes wrong: top_p=1e-300 rounds to 0 and keeps no token at all; logits / 1e-300 overflow to inf.
SMALLEST_TEMPERATURE = 1e-6
SMALLEST_TOP_P = 1e-6
PENALTY_RANGE = (1e-6, 1e6)       # repetition_penalty: logits / r and x r stay finite in float32
MAX_LOGPROBS = 20                 # OpenAI's limit for top_logprobs
NUCLEUS_FIRST = 64                # Sampler's top-p looks at this many best tokens first (doubling if short)


class SamplingError(Llama3Error):
    """An invalid sampling value; `param` names it (the server answers 400 with it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def validate_sampling(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                      repetition_penalty: float = 1.0, max_new_tokens: int = 1, seed: int | None = None,
                      presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                      logit_bias: dict | None = None, logprobs: int | None = None) -> None:
    """Raise SamplingError naming the first invalid value (the defaults all mean 'off')."""
    def bad(name, value, rule):
        raise SamplingError(f"{name}={value!r} is invalid: {rule}", name)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not number(temperature) or temperature < 0:
        bad("temperature", temperature, "use 0 for greedy decoding or a positive number (0.7 is typical)")
    if 0 < temperature < SMALLEST_TEMPERATURE:
        bad("temperature", temperature, f"values below {SMALLEST_TEMPERATURE} overflow float32 (logits / T) "
            "and are greedy in all but name; use 0 for greedy decoding")
    if not integer(top_k) or top_k < 0:
        bad("top_k", top_k, "use 0 to turn it off or a positive number of tokens to keep")
    if not number(top_p) or not 0 < top_p <= 1:
        bad("top_p", top_p, "it must be in (0, 1]; 1 turns it off")
    if top_p < SMALLEST_TOP_P:
        bad("top_p", top_p, f"values below {SMALLEST_TOP_P} round to 0 in float32 and would keep no token; "
            "to keep only the most likely token use top_k=1 (or temperature 0)")
    if not number(min_p) or not 0 <= min_p <= 1:
        bad("min_p", min_p, "it must be in [0, 1]; 0 turns it off")
    low, high = PENALTY_RANGE
    if not number(repetition_penalty) or not low <= repetition_penalty <= high:
        bad("repetition_penalty", repetition_penalty,
            f"it must be in [{low}, {high:g}]; 1 turns it off, 1.1 is typical")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not number(value) or not -2 <= value <= 2:
            bad(name, value, "it must be in [-2, 2] (OpenAI's range); 0 turns it off")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            bad("logit_bias", logit_bias, "give a mapping {token id: bias}")
        for token, bias in logit_bias.items():
            if not integer(token) or token < 0:
                bad("logit_bias", {token: bias}, "keys are token ids (integers >= 0)")
            if not number(bias) or not -100 <= bias <= 100:
                bad("logit_bias", {token: bias}, "biases are numbers in [-100, 100]; -100 bans a token")
    if logprobs is not None and (not integer(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        bad("logprobs", logprobs, f"give the number of most likely tokens to report, 0 to {MAX_LOGPROBS}")
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


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties: logit - frequency x count - presence x (count > 0), where counts [B, V]
    says how often each token already appears in the row's OUTPUT (the prompt does not count)."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


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


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1), the same index (the first of equal maxima, the first NaN if any), through
    NumPy for a float32 CPU tensor: PyTorch's CPU argmax reduces one element at a time, ~80 us for
    a 49152-token vocabulary row (~1% of a SmolLM2 decoding step; 530 us for 8 rows), NumPy's
    vectorized one ~5 us (31 us for 8; measured 2026-12-03, 2 cores, Zen 4).  Elsewhere (CUDA,
    other dtypes, autograd) torch's own."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad or x.dim() == 0:
        return x.argmax(dim=-1)
    return torch.from_numpy(np.asarray(x.numpy().argmax(axis=-1), dtype=np.int64))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: [B, V] -> [B]."""
    return argmax_last(logits)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from probabilities [B, V] -> [B].

    argmax(p_i / E_i) with E_i ~ Exponential(1) picks token i with probability p_i
    (the "exponential race"); unlike torch.multinomial it needs no host sync.
    """
    race = exponential_variates(probs.shape, generator, probs.device)
    return argmax_last(probs / race)


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


def exponential_variates(size, generator: torch.Generator | None, device) -> torch.Tensor:
    """The Exponential(1) variates `torch.empty(size).exponential_(1.0, generator=generator)` draws,
    bit for bit, in a third of the time on the CPU: PyTorch's CPU kernel takes a float64 uniform u
    per element and returns -log1p(-u) cast to float32, one element at a time (~18 ns each, 0.9 ms
    for 49152); a float64 uniform_ from the same generator and one vectorized log1p give the same
    numbers and leave the generator where it would have been (tests/test_sampler.py checks both
    against exponential_ itself).  Elsewhere (CUDA) exponential_ as it is."""
    if torch.device(device).type != "cpu" or (generator is not None and generator.device.type != "cpu"):
        return torch.empty(size, device=device).exponential_(1.0, generator=generator)
    uniform = torch.empty(size, dtype=torch.float64).uniform_(generator=generator)
    return torch.log1p(uniform.neg_()).neg_().float()


def nucleus_draw(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> int:
    """`sample`'s draw (top-p, then softmax and the exponential race) for ONE row without sorting
    the vocabulary: logits [V] (already / temperature) -> the id that apply_top_p + softmax +
    draw pick with the same generator.

    The nucleus is the best tokens whose probabilities (softmax of the whole row) reach top_p; it
    is read from topk of the first NUCLEUS_FIRST tokens, doubled until the mass before the last
    one reaches top_p (a flat distribution ends at the whole row); top_p 1 keeps the row.  The
    draw takes the same Exponential(1) variates as `draw` (one per vocabulary entry, so the
    generator advances alike, `exponential_variates`) and races only the nucleus: the tokens
    outside it have probability 0 there.  A full sort of 49152 logits costs ~3.4 ms on one core,
    topk(64) ~0.09 ms."""
    size = logits.shape[-1]
    if top_p >= 1.0:
        return int(draw(logits.softmax(dim=-1), generator))
    probs = logits.softmax(dim=-1)
    k = min(NUCLEUS_FIRST, size)
    while True:
        best, ids = torch.topk(probs, k)                                  # most likely first
        mass_before = best.cumsum(dim=-1) - best
        keep = mass_before < top_p                                        # apply_top_p's rule
        if k == size or not bool(keep[-1]):
            break
        k = min(2 * k, size)
    kept = ids[keep]
    race = exponential_variates(size, generator, logits.device)
    chosen = argmax_last(logits[kept].softmax(dim=-1) / race[kept])
    return int(kept[chosen])


@contextmanager
def serial_ops(device: torch.device):
    """PyTorch's CPU operators in this thread run on the calling thread alone, set back after.
    Sampling works on a whole vocabulary row (49152 logits for SmolLM2): any elementwise operator
    over more than 32768 elements opens an OpenMP region, whose worker then spins on the core
    the decoding kernels' own pool needs for the next step (llama3/fast/threads.cpp); run alone,
    each such operator is a few microseconds.  The thread count is this thread's (the pool reads
    it per call), restored before the next forward."""
    before = torch.get_num_threads() if device.type == "cpu" else 1
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------ one sequence
class LogitsProcessor(Protocol):
    """A hook that shapes one sequence's logits before any other rule (a grammar matcher: -inf on
    the tokens its grammar forbids next).  `accept` is told every token the sequence takes."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...   # [V] -> [V]

    def accept(self, token: int) -> None: ...


@dataclass
class TokenLogprobs:
    """The log-probability of the token a sequence took, and the `top` most likely alternatives
    [(id, logprob)], best first, all from the model's own distribution (before any rule)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """log_softmax of raw logits [V] -> the entry of `token` and the `top` best (ties: lower id first)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)              # [V]
    best = torch.topk(logprobs, top) if top > 0 else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprobs(int(token), float(logprobs[token]), pairs)


class Sampler:
    """How ONE sequence picks its tokens: its settings, its own torch.Generator, its penalty state,
    its logit_bias and an optional LogitsProcessor.  The engine keeps one per running sequence:

        sampler = Sampler(vocab_size, temperature=0.8, top_p=0.95, seed=1, prompt_ids=prompt)
        token = sampler.pick(logits)          # logits [V] -> id; the penalty state learns the id
        sampler.last                          # TokenLogprobs of that step (when logprobs is not None)

    The rules, in order (each adjusts the logits the next one sees):
        processor -> logit_bias -> repetition penalty -> presence / frequency penalty
        -> / temperature -> top-k -> top-p -> min-p -> draw (temperature 0: argmax)

    Penalties as their authors define them: repetition (transformers, llama.cpp) over the prompt
    and the output, positive logits / r and negative ones x r; presence and frequency (OpenAI)
    over the output only: logit - frequency x count - presence x (count > 0).
    logit_bias {id: b} adds b to that logit (OpenAI: -100 bans, +100 forces).
    logprobs: None = off; K >= 0 = record the chosen token's log-probability and the K best,
    from log_softmax of the RAW logits (before every rule above, as OpenAI defines logprobs).
    """

    def __init__(self, vocab_size: int, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
                 seed: int | None = None, logprobs: int | None = None, processor: LogitsProcessor | None = None,
                 prompt_ids=(), device: torch.device | str | None = None):
        validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty, logit_bias=logit_bias, seed=seed, logprobs=logprobs)
        device = torch.device(device or "cpu")
        self.vocab_size, self.device = vocab_size, device
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repetition_penalty = repetition_penalty
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.logprobs, self.processor = logprobs, processor
        self.last: TokenLogprobs | None = None
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.bias = None                                                  # [V] float
        if logit_bias:
            ids = [int(i) for i in logit_bias]
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise SamplingError(f"logit_bias names token ids outside the vocabulary [0, {vocab_size})",
                                    "logit_bias")
            self.bias = torch.zeros(vocab_size, device=device)
            self.bias[torch.tensor(ids, device=device)] = torch.tensor(
                [float(b) for b in logit_bias.values()], device=device)
        self.seen = None                                                  # [V] bool: prompt + output
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            prompt = [int(i) for i in prompt_ids]
            if prompt:
                self.seen[torch.tensor(prompt, device=device)] = True
        self.counts = None                                                # [V] float: output only
        if presence_penalty or frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)

    @classmethod
    def from_settings(cls, settings, vocab_size: int, *, prompt_ids=(), seed: int | None = None,
                      processor: LogitsProcessor | None = None, device=None) -> "Sampler":
        """A Sampler from a GenerationSettings (or anything with its sampling fields).
        seed: this sequence's seed (default settings.seed)."""
        return cls(vocab_size, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                   min_p=settings.min_p, repetition_penalty=settings.repetition_penalty,
                   presence_penalty=settings.presence_penalty, frequency_penalty=settings.frequency_penalty,
                   logit_bias=settings.logit_bias, seed=settings.seed if seed is None else seed,
                   logprobs=settings.logprobs, processor=processor, prompt_ids=prompt_ids, device=device)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits with nothing to record: a batch of these needs no per-row work."""
        return (self.temperature == 0 and self.processor is None and self.bias is None and self.seen is None
                and self.counts is None and self.logprobs is None)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rule that changes logits [V] (float) before temperature and the filters."""
        if self.processor is not None:
            logits = self.processor(logits)
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            logits = apply_repetition_penalty(logits[None], self.seen[None], self.repetition_penalty)[0]
        if self.counts is not None:
            logits = apply_presence_frequency(logits[None], self.counts[None], self.presence_penalty,
                                              self.frequency_penalty)[0]
        return logits

    def pick(self, logits: torch.Tensor) -> int:
        """Choose this sequence's next token from its logits [V]; record its log-probabilities
        (if asked) and remember it for the penalties and the processor.  The same token as
        `sample` with this generator; its operators run on this thread alone (`serial_ops`), and
        a draw with temperature and top-p only (no top-k, no min-p) takes the nucleus without
        sorting the row and the race's variates the fast way (`nucleus_draw`)."""
        with serial_ops(logits.device):
            raw = logits.float()
            adjusted = self.adjust(raw)
            if self.temperature > 0 and self.top_k == 0 and self.min_p == 0:
                token = nucleus_draw(adjusted / self.temperature, self.top_p, self.generator)
            else:
                token = int(sample(adjusted[None], temperature=self.temperature, top_k=self.top_k,
                                   top_p=self.top_p, min_p=self.min_p, generator=self.generator)[0])
            if self.logprobs is not None:
                self.last = token_logprobs(raw, token, self.logprobs)
            self.accept(token)
        return token

    def accept(self, token: int) -> None:
        """The sequence took `token` (pick calls this; call it yourself for a token forced from outside)."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if self.processor is not None and hasattr(self.processor, "accept"):
            self.processor.accept(token)


def pick_batch(samplers: list[Sampler | None], logits: torch.Tensor) -> list[int | None]:
    """One token per row of logits [B, V] from each row's Sampler (None: a finished row, skipped).
    Rows that are all plain greedy take one batched argmax and one host sync."""
    if all(s is not None and s.plain_greedy for s in samplers):
        return argmax_last(logits).tolist()
    return [None if s is None else s.pick(logits[row]) for row, s in enumerate(samplers)]
