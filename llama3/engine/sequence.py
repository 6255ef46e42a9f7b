"""One sequence the engine runs (a prompt and its answer so far), and the request handle
that groups the sequences of one call and carries their events to whoever waits.

A sequence's `ids` are its prompt and the tokens sampled so far; `computed` of them have
their keys and values in the cache.  Each step computes ids[computed:] (a chunk of the
prompt, or the one token sampled last step); when that reaches the end of `ids` the
step's logits give the next token.  A sequence pushed out of the cache (preempted) just
starts again from computed = 0 (or its cached prefix): the same rule recomputes its
prompt and answer so far and then samples on.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator
from dataclasses import dataclass, field

import torch

from llama3.errors import Llama3Error
from llama3.generate import GenerationSettings, RowText
from llama3.sampling import Sampler


class Cancelled(Llama3Error):
    """The request was cancelled before it finished (the server is shutting down)."""


@dataclass
class Result:
    """One finished sequence: its text (stop id and stop string excluded), new token ids, why it
    ended ("stop", "length" or "cancelled"), its prompt size and how much of it came from the cache."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list | None = None   # per new token, its TokenLogprobs (settings.logprobs not None)
    prefill_seconds: float = 0.0   # from submit to the first new token (waiting in the queue included)
    decode_seconds: float = 0.0    # from the first new token to the last
    decode_steps: int = 0          # tokens sampled after the first (a final stop id included)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Sequence:
    def __init__(self, request: "Request", row: int, prompt: list[int], settings: GenerationSettings,
                 max_new_tokens: int, stop_ids: frozenset[int], tokenizer, device: torch.device,
                 sampler: Sampler | None = None):
        self.request, self.row, self.settings = request, row, settings
        self.ids = list(prompt)
        self.prompt_tokens, self.max_new_tokens, self.stop_ids = len(prompt), max_new_tokens, stop_ids
        self.computed = 0
        self.left = False                    # the engine is done with it (finished, cancelled, failed)
        self.blocks: list[int] = []
        self.keys: list[bytes] = []          # prefix-cache keys of its full blocks, in order
        # the later choices of the same prompt (n > 1): they wait, unscheduled, until this one has
        # prefilled the prompt, then take its blocks and sample from its logits (Engine._fork)
        self.siblings: list[Sequence] = []
        self.result = Result(prompt_tokens=len(prompt))
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.text = RowText(tokenizer, settings.stop) if tokenizer is not None else None
        # how it picks its tokens: its own settings, generator and penalty state (llama3.sampling)
        self.sampler = sampler or Sampler.from_settings(settings, request.vocab_size, prompt_ids=prompt,
                                                        device=device)
        if settings.logprobs is not None:
            self.result.logprobs = []

    @property
    def finished(self) -> bool:
        return self.result.finish_reason is not None

    def pick(self, logits: torch.Tensor) -> int:
        """The next id from this sequence's logits [V]."""
        return self.sampler.pick(logits)

    def accept(self, token: int) -> None:
        """Record a sampled token: end on a stop id, the length limit or a stop string; send its text."""
        result, is_stop_id = self.result, token in self.stop_ids
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            result.prefill_seconds = now - self.submitted
        else:
            result.decode_steps += 1
        result.decode_seconds = now - self.first_token_at
        if is_stop_id:
            result.finish_reason = "stop"
        else:
            result.token_ids.append(token)
            self.ids.append(token)
            if result.logprobs is not None:
                result.logprobs.append(self.sampler.last)
            if len(result.token_ids) >= self.max_new_tokens:
                result.finish_reason = "length"
        if self.text is not None:
            text, hit_stop = self.text.add(token, is_stop_id, self.finished)
            if hit_stop:
                result.finish_reason = "stop"
            if text:
                result.text += text
                self.request.send(("text", self.row, text))
        else:
            self.request.send(("token", self.row, token))


class Request:
    """The sequences of one call (one per prompt).  The engine calls `send(event)` from its thread:
        ("text", row, piece)  or  ("token", row, id)   (without a tokenizer)
        ("end", row, finish_reason, n_tokens, cached_tokens)
        None  (the request is over)   or an exception (it failed).
    `sink(events)` receives them in order, a list at a time (a queue's put, or a hop onto an event
    loop): the first event and the last at once, the others at most one delivery per `interval`
    seconds (the engine calls `deliver` after a step when `due`).  Each delivery wakes the reader's
    thread, and on a machine whose cores all decode, waking it per token cost a lone stream ~10% of
    its speed (benchmarks/engine_lone_client.py); every few tokens it costs a fraction of that, and
    text that arrives 20 ms apart still reads as a stream."""

    def __init__(self, sink, vocab_size: int, interval: float = 0.0):
        self.sink, self.vocab_size, self.interval = sink, vocab_size, interval
        self.sequences: list[Sequence] = []
        self._cancelled = threading.Event()
        self.closed = False
        self._pending: list = []                   # events sent and not yet delivered
        self._delivered_at: float | None = None    # perf_counter of the last delivery

    def cancel(self) -> None:
        """Stop generating for this request (safe from any thread, idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def results(self) -> list[Result]:
        return [s.result for s in self.sequences]

    def send(self, event) -> None:
        if self.closed:
            return
        self._pending.append(event)
        self.closed = event is None or isinstance(event, BaseException)
        if self.closed or self._delivered_at is None or self.interval <= 0:
            self.deliver()

    @property
    def undelivered(self) -> bool:
        return bool(self._pending)

    def due(self, now: float) -> bool:
        """Events wait and the last delivery was `interval` seconds ago or more."""
        return bool(self._pending) and now - (self._delivered_at or 0.0) >= self.interval

    def deliver(self) -> None:
        """Hand the waiting events to the sink (the engine's thread)."""
        if self._pending:
            events, self._pending = self._pending, []
            self._delivered_at = time.perf_counter()
            self.sink(events)


class Stream:
    """A submitted request read from the caller's thread: iterate for its events; `results` then
    holds one Result per prompt.  Leaving the loop early (break, an exception, Ctrl-C) cancels it."""

    def __init__(self, engine, prompt_ids: list[list[int]], settings: GenerationSettings, stop_ids=None,
                 samplers=None):
        self._events: queue.Queue = queue.Queue()
        self.request = engine.submit(prompt_ids, settings, self._events.put, stop_ids, samplers)  # lists
        # what a progress notice reads (llama3.commands.generate.prefill_progress): the prompt sizes, and
        # the seconds until the first event (0 until then)
        self.prompt_lengths = [s.prompt_tokens for s in self.request.sequences]
        self.prefill_seconds = 0.0
        self._start = time.perf_counter()
        engine.start()

    def __iter__(self) -> Iterator[tuple]:
        try:
            while True:
                for event in self._events.get():
                    if event is None:
                        return
                    if isinstance(event, BaseException):
                        raise event
                    if not self.prefill_seconds:
                        self.prefill_seconds = time.perf_counter() - self._start
                    yield event
        finally:
            self.request.cancel()

    def cancel(self) -> None:
        self.request.cancel()

    @property
    def results(self) -> list[Result]:
        return self.request.results
