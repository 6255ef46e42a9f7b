"""The generation engine: prompt ids in, new tokens (and text) out.

One request runs like this:

    prompts [B lists of ids]
      -> left-pad to the longest prompt, allocate ONE KVCache for prompt + new tokens
      -> prefill: forward over the prompt tokens (512 at a time), fills the cache   logits [B, V]
      -> loop: sample a token per row, feed it back (one position per step)
         until every row has hit a stop id / stop string or max_new_tokens

Batches of prompts of different lengths give the same tokens as generating
each alone: a shorter prompt is padded on the LEFT, its pad slots are hidden
from every real query by the attention mask, and its RoPE positions start at 0
at its first real token (`positions` [B, T]).  So row b sees exactly what it
would see alone; only the slot where its keys sit in the cache differs.

Two layers:
  * `TokenGeneration`: ids only, one `Step` per new position (optionally with the
    logits that produced it); the one-batch reference the engine is tested against, and
    what the lab, `llama3 bench`'s decode loop and tensor parallelism run.  `llama3 generate`,
    `llama3 chat`, the server and `LLM.generate` run through `llama3.engine` instead.
  * `TextGeneration`: on top of it, text pieces per row, streamed through the
    tokenizer's `stream_decoder` (never half a UTF-8 character) and cut exactly at
    stop strings (text that might begin a stop string is held back until resolved).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from llama3.errors import Llama3Error
from llama3.fast.cpu_share import prompt_threads
from llama3.model import KVCache, Transformer
from llama3.sampling import Sampler, TokenLogprobs, pick_batch, validate_sampling


# The prompt goes through the model this many tokens at a time (keys accumulate in the cache),
# so the logits [B, T, V] of a long prompt never sit in memory at once: 8K tokens x 128K vocab
# x 4 bytes would be 4 GB.  Only the last position's logits are used.
PREFILL_CHUNK = 512


@dataclass
class GenerationSettings:
    """How to generate.  The defaults mean greedy decoding with every filter off.

    temperature 0 = greedy (argmax); top_k 0, top_p 1, min_p 0, repetition_penalty 1 = off.
    presence_penalty, frequency_penalty (OpenAI's, over the output; 0 = off), logit_bias {id: bias}.
    seed: makes sampled output reproducible (None: a fresh random seed each request).
    logprobs: None = off; K = record each new token's log-probability and the K most likely.
    stop: strings that end a sequence; the text is cut just before the first one.
    truncate: a prompt too long for the context keeps its last tokens instead of raising.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    truncate: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in self.stop):
            raise Llama3Error(f"stop={self.stop!r} is invalid: stop strings must be non-empty strings")
        validate_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                          repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                          seed=self.seed, presence_penalty=self.presence_penalty,
                          frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias,
                          logprobs=self.logprobs)


@dataclass
class Step:
    """One decoding step.  tokens[b]: the new id of row b (None once row b has finished);
    a stop id is reported here but not kept in the row's output.  logits [B, V]: the raw
    logits the ids were drawn from (only with return_logits=True).  logprobs[b]: row b's
    TokenLogprobs (only with settings.logprobs set)."""

    tokens: list[int | None]
    logits: torch.Tensor | None = None
    logprobs: list[TokenLogprobs | None] | None = None


def fit_prompt(ids: list[int], max_seq_len: int, max_new_tokens: int, truncate: bool) -> list[int]:
    """Check a prompt fits the context (at least one new token must fit after it).

    With truncate=True a too-long prompt keeps its last tokens, leaving room for
    max_new_tokens but never dropping more than half the context.
    """
    if len(ids) < max_seq_len:
        return ids
    if not truncate:
        raise Llama3Error(f"the prompt has {len(ids)} tokens but the model's context holds {max_seq_len} "
                          "(prompt + new tokens); shorten it, or pass truncate=True to keep its last tokens")
    return ids[-(max_seq_len - min(max_new_tokens, max_seq_len // 2)):]


def checked_prompt(row: int, ids, config, settings: GenerationSettings) -> list[int]:
    """Prompt `row`'s ids as ints, refused when empty or outside the vocabulary, fitted to the context."""
    ids = [int(i) for i in ids]
    if not ids:
        raise Llama3Error(f"prompt {row} is empty (no tokens); give it some text")
    if min(ids) < 0 or max(ids) >= config.vocab_size:
        raise Llama3Error(f"prompt {row} has token ids outside the vocabulary [0, {config.vocab_size})")
    return fit_prompt(ids, config.max_seq_len, settings.max_new_tokens, settings.truncate)


class TokenGeneration:
    """Generate token ids for a batch of prompts; iterate it (once) to get one `Step` per position.

    After (or during) iteration: `tokens[b]` are row b's new ids (stop id excluded),
    `finish_reasons[b]` is "stop" (a stop id, or `finish(b)` was called) or "length",
    `prompt_lengths[b]` its prompt size, and `prefill_seconds` / `decode_seconds` /
    `decode_steps` time the model (not the consumer).

    Each row picks its tokens with its own `llama3.sampling.Sampler` (`samplers[b]`); by default
    one per row from `settings`, every row seeded with settings.seed (so a prompt gives the same
    tokens alone or in a batch).  Pass `samplers` to choose them yourself (e.g. n choices of one
    prompt, seeded seed, seed+1, ...; see `row_seeds`).
    """

    def __init__(self, model: Transformer, prompt_ids: list[list[int]], settings: GenerationSettings,
                 stop_ids=(), *, return_logits: bool = False, samplers: list[Sampler] | None = None):
        config = model.config
        if not prompt_ids:
            raise Llama3Error("no prompts given; pass at least one")
        prompts = [checked_prompt(row, ids, config, settings) for row, ids in enumerate(prompt_ids)]
        self.model, self.settings, self.return_logits = model, settings, return_logits
        self.prompts = prompts
        self.prompt_lengths = [len(p) for p in prompts]
        self.longest = max(self.prompt_lengths)
        self.max_new_tokens = min(settings.max_new_tokens, config.max_seq_len - self.longest)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        if samplers is not None and len(samplers) != len(prompts):
            raise Llama3Error(f"{len(samplers)} samplers for {len(prompts)} prompts; give one per prompt")
        self.samplers = samplers
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str | None] = [None] * len(prompts)
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_steps = 0

    def finish(self, row: int) -> None:
        """End row `row` now with reason "stop" (the text layer calls this on a stop string)."""
        self.finish_reasons[row] = "stop"

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    # ---------------------------------------------------------------- the loop
    def __iter__(self) -> Iterator[Step]:
        settings, batch = self.settings, len(self.prompts)
        device, vocab = self.model.device, self.model.config.vocab_size
        total = self.longest + self.max_new_tokens                        # cache slots for this request
        pads = torch.tensor([self.longest - n for n in self.prompt_lengths], device=device)  # [B]
        self.padded = bool(pads.any())
        slots = torch.arange(total, device=device)                        # [total]
        self.key_valid = slots >= pads[:, None]                           # [B, total]: False on pad slots
        self.positions = (slots - pads[:, None]).clamp(min=0)             # [B, total]: RoPE position per slot
        prompt = torch.zeros(batch, self.longest, dtype=torch.long, device=device)  # [B, T], left-padded
        for row, ids in enumerate(self.prompts):
            prompt[row, self.longest - len(ids):] = torch.tensor(ids, device=device)
        with torch.inference_mode():
            if self.samplers is None:
                self.samplers = [Sampler.from_settings(settings, vocab, prompt_ids=ids, device=device)
                                 for ids in self.prompts]
            self.cache = KVCache(self.model.config, batch, total, dtype=self.model.dtype, device=device)

        start = time.perf_counter()
        for begin in range(0, self.longest, PREFILL_CHUNK):               # prefill, chunk by chunk
            logits = self._forward(prompt[:, begin:begin + PREFILL_CHUNK], begin)  # [B, V]
        next_ids, ids = self._pick(logits)
        self.prefill_seconds = time.perf_counter() - start
        for step in range(self.max_new_tokens):
            logprobs = [s.last if token is not None else None for s, token in zip(self.samplers, ids)]
            yield Step(self._record(ids), logits if self.return_logits else None,
                       logprobs if settings.logprobs is not None else None)
            if self.done:
                break
            start = time.perf_counter()
            logits = self._forward(next_ids[:, None], self.longest + step)
            next_ids, ids = self._pick(logits)
            self.decode_seconds += time.perf_counter() - start
            self.decode_steps += 1
        self.cache = None                                                 # free the memory now

    def _record(self, ids: list[int]) -> list[int | None]:
        """Apply stop ids and the length limit; return what this step reports per row."""
        reported: list[int | None] = []
        for row, token in enumerate(ids):
            if self.finish_reasons[row] is not None or token is None:
                reported.append(None)
                continue
            reported.append(token)
            if token in self.stop_ids:
                self.finish_reasons[row] = "stop"
            else:
                self.tokens[row].append(token)
                if len(self.tokens[row]) == self.max_new_tokens:
                    self.finish_reasons[row] = "length"
        return reported

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [B, T] at cache slots start.. -> logits of the last position [B, V]."""
        with prompt_threads(tokens.numel()):  # a prompt: fewer PyTorch threads on a busy machine
            return self._forward_rows(tokens, start)

    def _forward_rows(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        if not self.padded:  # every row starts at slot 0: plain causal attention, fastest path
            return self.model(tokens, start_pos=start, cache=self.cache, last_only=True)[:, -1]
        end = start + tokens.shape[1]
        query = torch.arange(start, end, device=tokens.device)[:, None]  # [T, 1]
        key = torch.arange(end, device=tokens.device)[None, :]           # [1, S]
        # Row b may see key j if j is not in the future and is a real token of row b.  A pad
        # query also sees itself, so its softmax is never over nothing (which gives NaN).
        mask = (key <= query) & (self.key_valid[:, None, :end] | (key == query))  # [B, T, S]
        return self.model(tokens, start_pos=start, cache=self.cache, positions=self.positions[:, start:end],
                          mask=mask[:, None], last_only=True)[:, -1]

    @torch.inference_mode()
    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[int | None]]:
        """One id per unfinished row, each from its own Sampler -> (ids [B] on the device to feed
        back (a finished row gets 0), the same as a list with None for finished rows)."""
        active = [None if reason is not None else s for s, reason in zip(self.samplers, self.finish_reasons)]
        pick_rows = getattr(self.model.__dict__.get("forward"), "pick_rows", None)  # CUDA: rows sampled on the device
        ids = pick_rows(active, logits) if pick_rows is not None else pick_batch(active, logits)
        fed = torch.tensor([0 if i is None else i for i in ids], device=logits.device)  # [B]
        return fed, ids


def generate_tokens(model: Transformer, prompt_ids: list[list[int]], settings: GenerationSettings,
                    stop_ids=(), *, return_logits: bool = False,
                    samplers: list[Sampler] | None = None) -> TokenGeneration:
    """The token-level API: iterate the result for one `Step` per new position."""
    return TokenGeneration(model, prompt_ids, settings, stop_ids, return_logits=return_logits, samplers=samplers)


def row_seeds(seed: int | None, count: int) -> list[int | None]:
    """Distinct seeds for `count` sequences that share one request seed: seed, seed+1, ...
    (wrapped into torch.Generator's range); None stays None (each row random)."""
    if seed is None:
        return [None] * count
    return [(seed + i + 2**63) % 2**64 - 2**63 for i in range(count)]


# ------------------------------------------------------------------ text layer
class StopStrings:
    """Cuts streamed text just before the first stop string, holding back any tail
    that could still grow into one (e.g. "</" while waiting to see if "</s>" follows)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        """Take new text -> (text now safe to emit, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            safe, self.pending = self.pending[:min(hits)], ""
            return safe, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        safe, self.pending = self.pending[:cut], self.pending[cut:]
        return safe, False

    def flush(self) -> str:
        """The end of the sequence: whatever was held back is final text."""
        safe, self.pending = self.pending, ""
        return safe


class RowText:
    """The text of one sequence as its tokens arrive: decoded without splitting a UTF-8
    character (the tokenizer's `stream_decoder`) and cut just before a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.decoder, self.stops = tokenizer.stream_decoder(), StopStrings(stops)

    def add(self, token: int, is_stop_id: bool, ended: bool) -> tuple[str, bool]:
        """A new token (a stop id adds no text; ended: the sequence ends with it) ->
        (text now final, whether a stop string was found: the sequence ends there)."""
        piece = "" if is_stop_id else self.decoder.add(token)
        if ended:
            piece += self.decoder.flush()
        text, hit_stop = self.stops.add(piece)
        if ended and not hit_stop:
            text += self.stops.flush()
        return text, hit_stop


@dataclass
class Completion:
    """One finished sequence: its text (stop id and stop string excluded), new token ids,
    why it ended ("stop" or "length") and how many prompt tokens it read."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None     # one per token of token_ids (settings.logprobs set)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class TextGeneration:
    """Text on top of `TokenGeneration`: iterate (once) to get (row, piece) as text becomes final.

    stop_ids defaults to tokenizer.stop_ids.  `completions()` gives one Completion per row
    (call it after iterating; `run()` does both).
    """

    def __init__(self, model: Transformer, tokenizer, prompt_ids: list[list[int]],
                 settings: GenerationSettings, stop_ids=None, *, samplers: list[Sampler] | None = None):
        stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
        self.tokens = TokenGeneration(model, prompt_ids, settings, stop_ids, samplers=samplers)
        self.logprobs: list[list[TokenLogprobs]] | None = (
            [[] for _ in prompt_ids] if settings.logprobs is not None else None)
        self.rows = [RowText(tokenizer, settings.stop) for _ in prompt_ids]
        self.texts: list[list[str]] = [[] for _ in prompt_ids]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        gen = self.tokens
        for step in gen:
            for row, token in enumerate(step.tokens):
                if token is None:
                    continue
                if self.logprobs is not None and token not in gen.stop_ids:
                    self.logprobs[row].append(step.logprobs[row])
                text, hit_stop = self.rows[row].add(token, token in gen.stop_ids, gen.finish_reasons[row] is not None)
                if hit_stop:
                    gen.finish(row)
                if text:
                    self.texts[row].append(text)
                    yield row, text

    def completions(self) -> list[Completion]:
        gen = self.tokens
        return [Completion("".join(self.texts[row]), list(gen.tokens[row]), gen.finish_reasons[row],
                           gen.prompt_lengths[row], None if self.logprobs is None else list(self.logprobs[row]))
                for row in range(len(self.texts))]

    def run(self) -> list[Completion]:
        """Generate to the end, return the completions."""
        for _ in self:
            pass
        return self.completions()
