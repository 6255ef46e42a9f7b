"""The engine: one scheduler that owns the KV memory and runs many sequences at once.

Each `step()`:
    1. drops cancelled sequences, then admits waiting ones (first come, first served) while
       fewer than `parallel` run and the pool has blocks for the prompt; a prompt's leading
       full blocks that the prefix cache already holds are taken from it, not recomputed;
    2. plans the step's tokens: every decoding sequence's one new token first, then prompt
       chunks of the sequences still prefilling, up to `step_tokens` in all, so a long new
       prompt never stalls the running streams for more than one chunk;
    3. runs ONE forward of the readable model (`Transformer.forward`) over all of them side
       by side, with the paged cache's per-token positions; each layer's attention reads the
       keys in their blocks (`paged_cache.py`, `llama3/fast/paged_attention.cpp`);
    4. samples the next token of each sequence whose tokens are all computed, each with its
       own settings and generator, so a greedy or seeded request gives the same tokens alone
       or in a crowd; a finished sequence leaves at once and its blocks go back to the pool.
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are released and it waits at the head of the queue to be recomputed.
The n choices of one prompt are scheduled as one sequence until its prompt is prefilled, then
forked (`_fork`): they share the prompt's blocks and each decodes on in its own.

`submit()` is safe from any thread; the loop runs in one daemon thread (`start()`), or a
caller (a test) calls `step()` itself.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from llama3.engine.blocks import BlockPool, NoFreeBlock, chain_key
from llama3.engine.memory import default_parallel, human, memory_budget
from llama3.engine.paged_cache import PagedKVCache, bytes_per_token
from llama3.engine.sequence import Cancelled, Request, Result, Sequence, Stream
from llama3.errors import Llama3Error
from llama3.generate import GenerationSettings, checked_prompt
from llama3.fast.cpu_share import prompt_threads
from llama3.fast.graph import graphs_of
from llama3.model import Transformer


IDLE_SECONDS = 5.0
STREAM_INTERVAL = 0.02  # seconds a request's events may wait to be handed over together (Request)


class QueueFull(Llama3Error):
    """More requests wait than --max-queued allows (the server answers 429)."""


@dataclass
class EngineConfig:
    """kv_memory: a size or share ("2GB", "25%"; None: memory.py's default).  parallel: running
    sequences at most (None: from the budget).  max_queued: waiting sequences before submit
    refuses.  step_tokens: tokens one forward computes at most (prompt chunks share them).
    stream_interval: seconds a request's events may wait to be handed over together (see Request)."""

    kv_memory: str | int | None = None
    parallel: int | None = None
    max_queued: int = 256
    block_size: int = 16
    step_tokens: int = 256
    prefix_cache: bool = True
    stream_interval: float = STREAM_INTERVAL

    def __post_init__(self):
        for name in ("parallel", "max_queued", "block_size", "step_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise Llama3Error(f"{name}={value!r} is invalid: it must be a positive whole number")
        if not (isinstance(self.stream_interval, (int, float)) and 0 <= self.stream_interval <= 1):
            raise Llama3Error(f"stream_interval={self.stream_interval!r} is invalid: give seconds from 0 to 1")


def model_dtype_device(model) -> tuple[torch.dtype, torch.device]:
    """The model's own float type and device (quantized embeddings have no `.weight` to read them from)."""
    return model.dtype, model.device


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config or EngineConfig()
        # read every step (is any on the explicit path?): through each block's nn.Module attribute
        # lookup, the 30 of SmolLM2 took ~30 us a step, from this list ~2
        self.attentions = [layer.attention for layer in model.layers]
        cfg, model_config = self.config, model.config
        dtype, self.device = model_dtype_device(model)
        if not dtype.is_floating_point:
            dtype = torch.float32
        self.budget, self.budget_note = memory_budget(cfg.kv_memory, self.device)
        block_bytes = bytes_per_token(model_config, dtype) * cfg.block_size
        n_blocks = self.budget // block_bytes
        if n_blocks < 2:
            raise Llama3Error(f"--kv-memory {human(self.budget)} holds fewer than 2 blocks of {cfg.block_size} "
                              f"tokens ({human(block_bytes)} each); give it more")
        self.cache = PagedKVCache(model_config, n_blocks, cfg.block_size, dtype, self.device)
        self.pool = BlockPool(n_blocks, cfg.block_size)
        self.parallel = cfg.parallel or default_parallel(n_blocks * cfg.block_size, model_config.max_seq_len)
        self.stop_ids = frozenset(tokenizer.stop_ids) if tokenizer is not None else frozenset()
        self.inbox: deque[Sequence] = deque()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.Condition()
        self.requests = self.completion_tokens = self.cancelled = self.preemptions = self.steps = 0
        self._undelivered: set[Request] = set()   # requests holding events back (Request.interval)
        self.thread: threading.Thread | None = None
        self.closed = self._exit_hook = self._warm_pending = False

    @classmethod
    def sized_for(cls, model: Transformer, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings,
                  **config) -> "Engine":
        """An engine whose KV memory holds just these prompts and their new tokens, all running at
        once (what `llama3 generate` and the benchmarks use: memory proportional to the request)."""
        size = config.pop("block_size", EngineConfig.block_size)
        dtype, _ = model_dtype_device(model)
        per_token = bytes_per_token(model.config, dtype if dtype.is_floating_point else torch.float32)
        blocks = 0
        for row, ids in enumerate(prompt_ids):
            n = len(checked_prompt(row, ids, model.config, settings))
            blocks += -(-(min(n + settings.max_new_tokens, model.config.max_seq_len) + 1) // size)
        config.setdefault("parallel", len(prompt_ids))
        config.setdefault("prefix_cache", False)
        return cls(model, tokenizer, EngineConfig(kv_memory=max(2, blocks) * size * per_token, block_size=size,
                                                  **config))

    def describe(self) -> str:
        """The start-up line: the budget, its blocks and tokens, the parallel limit."""
        tokens = self.pool.n_blocks * self.pool.block_size
        return (f"KV cache: {human(self.budget)} ({self.budget_note}) in {self.pool.n_blocks} blocks of "
                f"{self.pool.block_size} tokens "
                f"({tokens:,} positions, {self.cache.k.dtype}); up to {self.parallel} sequences at once, "
                f"{self.config.max_queued} waiting")

    # ------------------------------------------------------------ callers
    def submit(self, prompt_ids: list[list[int]], settings: GenerationSettings, sink, stop_ids=None,
               samplers=None) -> Request:
        """Queue one sequence per prompt; events go to `sink` from the engine's thread (see Request).
        samplers: one `llama3.sampling.Sampler` per prompt (default: made from settings, each
        seeded with settings.seed, so a prompt gives the same tokens alone or with others)."""
        config = self.model.config
        if not prompt_ids:
            raise Llama3Error("no prompts given; pass at least one")
        stop_ids = self.stop_ids if stop_ids is None else frozenset(int(i) for i in stop_ids)
        request = Request(sink, config.vocab_size, self.config.stream_interval)
        if samplers is not None and len(samplers) != len(prompt_ids):
            raise Llama3Error(f"{len(samplers)} samplers for {len(prompt_ids)} prompts; give one per prompt")
        capacity = self.pool.n_blocks * self.pool.block_size
        for row, ids in enumerate(prompt_ids):
            ids = checked_prompt(row, ids, config, settings)
            if len(ids) + 1 > capacity:
                raise Llama3Error(f"prompt {row} has {len(ids)} tokens but the KV cache holds {capacity}; "
                                  "shorten it or give the server more --kv-memory")
            max_new = min(settings.max_new_tokens, config.max_seq_len - len(ids))
            request.sequences.append(Sequence(request, row, ids, settings, max_new, stop_ids, self.tokenizer,
                                              self.device, samplers[row] if samplers is not None else None))
        with self.lock:
            if self.closed:
                raise Cancelled("the engine is shutting down; try again later")
            if len(self.waiting) + len(self.inbox) >= self.config.max_queued:
                raise QueueFull(f"{self.config.max_queued} requests are already waiting (--max-queued); "
                                "try again in a moment")
            self.inbox.extend(self._group_choices(request.sequences))
            self.requests += 1
            self.lock.notify()
        return request

    @staticmethod
    def _group_choices(sequences: list[Sequence]) -> list[Sequence]:
        """The sequences to schedule: a run of equal prompts (the n choices of one prompt) is its
        first sequence, the others its `siblings`, which take its prompt's KV once it is prefilled."""
        leaders: list[Sequence] = []
        for seq in sequences:
            if leaders and seq.ids == leaders[-1].ids:
                leaders[-1].siblings.append(seq)
            else:
                leaders.append(seq)
        return leaders

    def stream(self, prompt_ids: list[list[int]], settings: GenerationSettings, stop_ids=None,
               samplers=None) -> Stream:
        """Submit and iterate the events here, as the engine's thread makes them (see `Stream`)."""
        return Stream(self, prompt_ids, settings, stop_ids, samplers)

    def run(self, prompt_ids: list[list[int]], settings: GenerationSettings, stop_ids=None,
            samplers=None) -> list[Result]:
        """Generate to the end; one Result per prompt."""
        stream = self.stream(prompt_ids, settings, stop_ids, samplers)
        for _ in stream:
            pass
        return stream.results

    def stats(self) -> dict:
        return {"running": len(self.running), "queued": len(self.waiting) + len(self.inbox),
                "requests": self.requests, "completion_tokens": self.completion_tokens, "cancelled": self.cancelled,
                "preemptions": self.preemptions, "parallel": self.parallel, "max_queued": self.config.max_queued,
                **self.pool.stats()}

    # ------------------------------------------------------------ the loop thread
    def start(self) -> None:
        with self.lock:
            if self.thread is None and not self.closed:
                self.thread = threading.Thread(target=self._loop, name="llama3-engine", daemon=True)
                self.thread.start()
                if not self._exit_hook:  # the interpreter must not exit with the thread inside a forward
                    atexit.register(_close_at_exit, weakref.ref(self))
                    self._exit_hook = True

    def warm_up(self) -> None:
        """Record the one-sequence decoding step now, in the engine's thread, before any request needs
        it (`llama3 serve` calls this at start-up): a lone client's first tokens then replay.  A
        request submitted meanwhile waits in the inbox and runs right after (~0.2 s)."""
        with self.lock:
            self._warm_pending = True
        self.start()

    @torch.inference_mode()
    def _warm(self) -> None:
        """One decoding-shaped forward (one token of one sequence, in a borrowed block) recorded at once."""
        graphs = graphs_of(self.model)
        if graphs is None or self.cache.kernel is None or not self.cache.attend_in_blocks:
            return
        try:
            block = self.pool.allocate()
        except NoFreeBlock:
            return
        wait, graphs.paged_record_after = graphs.paged_record_after, 0
        try:
            self.forward(torch.zeros(1, 1, dtype=torch.long, device=self.device), [([block], 0, 1)], [0])
        finally:
            graphs.paged_record_after = wait
            self.pool.release(block)

    def cancel_all(self) -> None:
        """Refuse new requests; end every running and waiting one with `Cancelled` (signal-safe)."""
        self.closed = True
        for seq in list(self.running) + list(self.waiting) + list(self.inbox):
            seq.request.cancel()
        with self.lock:
            self.lock.notify()

    def close(self, timeout: float = 10.0) -> None:
        self.cancel_all()
        thread = self.thread
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        """Step while there is work; after IDLE_SECONDS with none the thread ends (`start` makes a
        new one), so an engine nobody uses holds no thread and can be garbage-collected."""
        if self._warm_pending:
            self._warm_pending = False
            try:
                self._warm()
            except Exception:  # a warm-up that fails leaves the steps eager until they record themselves
                pass
        while True:
            with self.lock:
                if not (self.inbox or self.waiting or self.running or self.closed):
                    self.lock.wait(IDLE_SECONDS)
                    if not (self.inbox or self.waiting or self.running or self.closed):
                        self.thread = None
                        return
            try:
                self.step()
            except Exception as error:  # a bug: every request in flight gets the error, the loop goes on
                for seq in list(self.running):
                    self._finish(seq, None, error)
            if self.closed and not (self.running or self.waiting or self.inbox):
                with self.lock:
                    self.thread = None
                return

    # ------------------------------------------------------------ one step
    def step(self) -> bool:
        """Admit, compute one forward over every running sequence, sample; False if there was nothing to do."""
        with self.lock:
            self.waiting.extend(self.inbox)
            self.inbox.clear()
        for seq in [s for s in self.running + list(self.waiting) if s.request.cancelled]:
            self._finish(seq, "cancelled", Cancelled("the server is shutting down") if self.closed else None)
        self._admit()
        plan = self._plan()
        if not plan:
            return False
        rows, tokens, want, sampling = [], [], [], []
        for seq, n in plan:
            rows.append((seq.blocks, seq.computed, seq.computed + n))
            tokens += seq.ids[seq.computed:seq.computed + n]
            if seq.computed + n == len(seq.ids):
                want.append(len(tokens) - 1)
                sampling.append(seq)
        logits = self.forward(torch.tensor([tokens], device=self.device), rows, want)  # [len(want), V]
        for seq, n in plan:
            seq.computed += n
            self._offer_full_blocks(seq)
        # a plan's batched sampler (CUDA: every row's token on the device, one host read) or each row's own
        pick_rows = getattr(graphs_of(self.model), "pick_rows", None)
        picked = pick_rows([seq.sampler for seq in sampling], logits) if pick_rows is not None else None
        for index, (seq, row_logits) in enumerate(zip(sampling, logits)):
            for sibling in self._fork(seq):  # n choices: the prompt was prefilled once, for all
                sibling.accept(sibling.pick(row_logits.clone()))
                if sibling.finished:
                    self._finish(sibling, sibling.result.finish_reason)
            seq.accept(picked[index] if picked is not None else seq.pick(row_logits))
            if seq.finished:
                self._finish(seq, seq.result.finish_reason)
        self._deliver({seq.request for seq in sampling})
        self.steps += 1
        return True

    def _deliver(self, stepped: set[Request]) -> None:
        """Hand over the events whose interval is up (a request's first and last went at once)."""
        self._undelivered |= stepped
        now = time.perf_counter()
        for request in list(self._undelivered):
            if request.due(now):
                request.deliver()
            if not request.undelivered:
                self._undelivered.discard(request)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, rows: list[tuple[list[int], int, int]], want: list[int]) -> torch.Tensor:
        """tokens [1, N] of the sequences `rows` (block table, first position, end) side by side ->
        logits [len(want), V] (float32) at the token indices `want`."""
        step = self.cache.step(rows)
        # attention attends in the blocks (`StepCache.attend`); only the explicit path (inspection
        # hooks, `Attention.fused = False`) reads keys side by side and needs the step's mask
        explicit = not self.cache.attend_in_blocks or any(not attention.fused for attention in self.attentions)
        if not explicit and want == list(range(tokens.shape[1])) and graphs_of(self.model) is not None:
            # every token is sampled (a decoding step): the instance's forward, which replays a
            # recorded step where it can (llama3/fast/graph.py), else runs Transformer.forward --
            # no head hook, so no index tensor to build
            return self.model(tokens, 0, step, positions=step.positions)[0]
        picked = torch.tensor(want, dtype=torch.long, device=self.device)
        caller = threading.get_ident()

        def only_wanted(module, args):  # the head runs on the tokens whose next token is sampled
            if threading.get_ident() != caller:  # another thread's forward of the same model
                return None
            return (args[0][:, picked],)

        hook = self.model.norm.register_forward_pre_hook(only_wanted)
        try:
            with prompt_threads(tokens.numel()):  # prompt chunks: fewer PyTorch threads on a busy machine
                logits = Transformer.forward(self.model, tokens, 0, step, positions=step.positions,
                                             mask=step.mask if explicit else None)
        finally:
            hook.remove()
        return logits[0]

    def _admit(self) -> None:
        size = self.pool.block_size
        while self.waiting and len(self.running) < self.parallel:
            seq = self.waiting[0]
            if self.running and len(self.running) + 1 + len(seq.siblings) > self.parallel:
                return  # its n choices run together
            matched = self._match_prefix(seq)
            # its blocks, and one for each sibling's copy of the prompt's last, partial block
            needed = -(-(len(seq.ids) + 1) // size) - len(matched) + len(seq.siblings)
            if needed > self.pool.available and self.running:
                for block in matched:
                    self.pool.release(block)
                return
            self.waiting.popleft()
            seq.blocks, seq.computed = matched, len(matched) * size
            seq.keys = seq.keys[:len(matched)]
            if seq.result.cached_tokens == 0 and matched:  # counted once, not again after a preemption
                seq.result.cached_tokens = seq.computed
                self.pool.hits += 1
                self.pool.hit_tokens += seq.computed
            self.running.append(seq)

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """seq has just computed its whole prompt: its waiting siblings (the other choices of the
        same prompt) hold its full blocks too (one more reference each) and get their own copy of
        the last, partial block, so each writes its answer in blocks of its own; they join the
        running sequences and sample their first token from seq's logits.  A sibling that finds
        no free block prefills by itself instead (the prefix cache holds the prompt's full blocks)."""
        siblings, seq.siblings = seq.siblings, []
        full, partial = divmod(seq.computed, self.pool.block_size)
        forked = []
        for sibling in siblings:
            if sibling.left:
                continue
            try:
                own = self.pool.allocate() if partial else None
            except NoFreeBlock:
                self.waiting.appendleft(sibling)
                continue
            sibling.blocks = [self.pool.share(block) for block in seq.blocks[:full]]
            if own is not None:
                self.cache.copy_positions(seq.blocks[full], own, partial)
                sibling.blocks.append(own)
            sibling.computed, sibling.keys = seq.computed, list(seq.keys[:full])
            sibling.result.cached_tokens = seq.result.cached_tokens  # the prompt's, reported by each choice
            self.running.append(sibling)
            forked.append(sibling)
        return forked

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that start seq.ids (held now); the last token is always computed."""
        if not self.config.prefix_cache:
            return []
        size, matched, seq.keys = self.pool.block_size, [], []
        parent = b""
        for begin in range(0, len(seq.ids) - size, size):  # full blocks before the last token only
            parent = chain_key(parent, seq.ids[begin:begin + size])
            seq.keys.append(parent)
            block = self.pool.lookup(parent)
            if block is None:
                break
            matched.append(block)
        return matched

    def _offer_full_blocks(self, seq: Sequence) -> None:
        """Give the prefix cache each block this sequence has filled (prompt and answer alike)."""
        if not self.config.prefix_cache:
            return
        size = self.pool.block_size
        for index in range(len(seq.keys), seq.computed // size):
            parent = seq.keys[-1] if seq.keys else b""
            seq.keys.append(chain_key(parent, seq.ids[index * size:(index + 1) * size]))
        for index in range(min(len(seq.keys), seq.computed // size)):
            self.pool.register(seq.blocks[index], seq.keys[index])

    def _plan(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) for this step, with the blocks they need allocated."""
        budget, plan = self.config.step_tokens, []
        decoding = [s for s in self.running if len(s.ids) - s.computed == 1]
        prefilling = [s for s in self.running if len(s.ids) - s.computed > 1]
        for seq in decoding + prefilling:
            if seq not in self.running:  # preempted by an earlier one in this loop
                continue
            n = min(len(seq.ids) - seq.computed, budget)
            if n == 0:
                break
            if not self._reserve(seq, seq.computed + n, plan):
                continue
            plan.append((seq, n))
            budget -= n
        return plan

    def _reserve(self, seq: Sequence, end: int, plan: list) -> bool:
        """Allocate blocks until seq holds positions 0..end-1, preempting the newest other
        running sequence when none is free; False if seq itself had to stop."""
        while len(seq.blocks) * self.pool.block_size < end:
            try:
                seq.blocks.append(self.pool.allocate())
            except NoFreeBlock:
                victims = [s for s in self.running if s is not seq]
                if not victims:
                    self._finish(seq, "length")  # alone and still too big for the whole budget
                    return False
                victim = victims[-1]
                plan[:] = [(s, n) for s, n in plan if s is not victim]
                self._preempt(victim)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        for block in seq.blocks:
            self.pool.release(block)
        seq.blocks, seq.computed = [], 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _finish(self, seq: Sequence, reason: str | None, error: BaseException | None = None) -> None:
        """Take seq out (running or waiting), free its blocks, tell its request."""
        if seq.left:
            return
        seq.left = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        for block in seq.blocks:
            self.pool.release(block)
        seq.blocks = []
        request = seq.request
        if seq.result.finish_reason is None:
            seq.result.finish_reason = reason or "cancelled"
        self.completion_tokens += seq.result.completion_tokens
        try:
            self._tell(seq, request, error)
        finally:
            if request.closed:  # its last events went at once
                self._undelivered.discard(request)

    def _tell(self, seq: Sequence, request: Request, error: BaseException | None) -> None:
        """Send seq's end (and the request's, when it was the last) or the error that ended it."""
        if error is not None:
            request.send(error)
            for other in request.sequences:  # the whole request fails
                self._finish(other, "cancelled")
            return
        if seq.result.finish_reason == "cancelled":
            if not any(s.result.finish_reason == "cancelled" for s in request.sequences if s is not seq):
                self.cancelled += 1
            for other in request.sequences:
                self._finish(other, "cancelled")
            request.send(None)
            return
        r = seq.result
        request.send(("end", seq.row, r.finish_reason, r.completion_tokens, r.cached_tokens))
        if all(s.finished for s in request.sequences):
            request.send(None)


def _close_at_exit(engine_ref) -> None:
    engine = engine_ref()
    if engine is not None:
        engine.close(timeout=5.0)
