"""Measuring speed and memory the same way everywhere (`llama3 bench` and benchmarks/).

    prefill   tokens/s of one forward over a long prompt (filling the KV cache)
    ttft      time to first token: prefill of a short prompt + picking the first token
    decode    tokens/s of the one-token-at-a-time loop after it (the engine's own timer)
    peak RSS  the most resident memory this process ever held (ru_maxrss)
    bound     decoding reads every weight once a token, so it cannot beat
              memory read speed / weight bytes a token (`decode_bound`)

Each timing is the best of a few repeats after a warm-up run: the first call
pays one-time costs (allocations, kernel selection) that a server pays once.
Measure each configuration in its own process, or the peak RSS of one leaks
into the next.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class SpeedReport:
    load_seconds: float | None
    prefill_tokens: int
    prefill_tokens_per_second: float
    ttft_seconds: float
    decode_tokens: int
    decode_tokens_per_second: float
    peak_rss_bytes: int
    engine_decode_tokens_per_second: float | None = None  # the same decode through the engine

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        load = f"{self.load_seconds:.2f} s" if self.load_seconds is not None else "-"
        return [f"load time            {load}",
                f"prefill              {self.prefill_tokens_per_second:8.1f} tokens/s  ({self.prefill_tokens} tokens)",
                f"time to first token  {self.ttft_seconds * 1000:8.1f} ms",
                f"decode               {self.decode_tokens_per_second:8.1f} tokens/s  ({self.decode_tokens} tokens)",
                *([f"decode, engine       {self.engine_decode_tokens_per_second:8.1f} tokens/s  "
                   "(paged cache: what generate, chat and serve run)"]
                  if self.engine_decode_tokens_per_second is not None else []),
                f"peak RSS             {self.peak_rss_bytes / 2**20:8.0f} MiB"]


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def prompt_of(n_tokens: int, vocab_size: int, seed: int = 0) -> list[int]:
    """n_tokens reproducible random ids (speed does not depend on which tokens they are)."""
    return torch.randint(0, vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def prefill_tokens_per_second(model, n_tokens: int = 512, repeats: int = 3) -> float:
    """Best-of-`repeats` tokens/s of one forward over n_tokens, writing a fresh KV cache and
    computing the last position's logits (what generation asks of a prompt; llama.cpp's
    prompt evaluation does the same, and the benchmarks ask transformers for the same)."""
    from llama3.fast.cpu_share import prompt_threads
    from llama3.model import KVCache

    config = model.config
    n_tokens = min(n_tokens, config.max_seq_len)
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    tokens = torch.tensor([prompt_of(n_tokens, config.vocab_size)], device=device)  # [1, T]
    best = float("inf")
    for attempt in range(repeats + 1):  # attempt 0 is the warm-up
        cache = KVCache(config, 1, n_tokens, dtype=dtype, device=device)
        start = time.perf_counter()
        with prompt_threads(n_tokens):  # what generate and the engine do around a prompt
            model(tokens, 0, cache, last_only=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them before reading the clock
        if attempt:
            best = min(best, time.perf_counter() - start)
    return n_tokens / best


def decode_speed(model, prompt_tokens: int = 16, new_tokens: int = 128,
                 repeats: int = 2) -> tuple[float, float, int]:
    """(time to first token in s, decode tokens/s, tokens generated) of greedy generation with
    the engine, best of repeats.  Fewer than new_tokens are generated when the context is full."""
    from llama3.generate import GenerationSettings, generate_tokens

    prompt_tokens = max(1, min(prompt_tokens, model.config.max_seq_len - 1))
    prompt = prompt_of(prompt_tokens, model.config.vocab_size, seed=1)
    settings = GenerationSettings(max_new_tokens=new_tokens)
    list(generate_tokens(model, [prompt], GenerationSettings(max_new_tokens=8)))  # warm-up
    ttft, per_token, generated = float("inf"), float("inf"), 0
    for _ in range(repeats):
        run = generate_tokens(model, [prompt], settings)  # no stop ids: new_tokens, or up to the context
        generated = sum(1 for _ in run)
        ttft = min(ttft, run.prefill_seconds)
        per_token = min(per_token, run.decode_seconds / max(1, run.decode_steps))
    return ttft, 1.0 / per_token, generated


def engine_decode_speed(model, prompt_tokens: int = 16, new_tokens: int = 128, repeats: int = 2) -> float:
    """Decode tokens/s of one greedy request through the engine (`llama3.engine`: the paged cache
    and scheduler that `llama3 generate`, `chat`, `serve` and `LLM.generate` run), best of repeats.
    `decode_speed` measures the one-batch generator over a contiguous KVCache; the engine's
    decoding steps are recorded and replayed too (fast/graph.py, over the paged cache's
    `graph_inputs`), but each step still does the scheduler's Python work (block tables, sampling)
    and attends through the paged kernel, so the two differ."""
    from llama3.engine import Engine
    from llama3.generate import GenerationSettings

    prompt_tokens = max(1, min(prompt_tokens, model.config.max_seq_len - 1))
    prompt = prompt_of(prompt_tokens, model.config.vocab_size, seed=1)
    settings = GenerationSettings(max_new_tokens=min(new_tokens, model.config.max_seq_len - prompt_tokens))
    engine = Engine.sized_for(model, None, [prompt], settings)
    try:
        engine.run([prompt], GenerationSettings(max_new_tokens=8))  # warm-up
        return max(engine.run([prompt], settings)[0].decode_tokens_per_second for _ in range(repeats))
    finally:
        engine.close()


def measure(model, load_seconds: float | None = None, prefill_tokens: int = 512,
            new_tokens: int = 128, engine: bool = True) -> SpeedReport:
    """Prefill, time to first token, decode (and, with `engine`, decode through the engine) and
    peak RSS of `model` in this process."""
    prefill = prefill_tokens_per_second(model, prefill_tokens)
    ttft, decode, decoded = decode_speed(model, new_tokens=new_tokens)
    through_engine = engine_decode_speed(model, new_tokens=new_tokens) if engine else None
    return SpeedReport(load_seconds, min(prefill_tokens, model.config.max_seq_len), prefill, ttft,
                       decoded, decode, peak_rss_bytes(), through_engine)


# ------------------------------------------------------------ the memory bound
def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: every matrix the blocks and the head multiply
    by, quantized ones with their scales (a tied head counted once; the embedding lookup reads
    one row of its table, not counted)."""
    from torch import nn

    from llama3.fast.int4 import Bf16Head, Int4Linear
    from llama3.fast.packed import PackedLinear
    from llama3.fast.quantize import Int8Linear

    skipped, counted, total = set(), set(), 0   # modules not read (copies), tensors already counted
    for module in model.modules():
        if id(module) in skipped:
            continue
        if isinstance(module, Int4Linear):
            total += module.out_features * module.in_features // 2 + _nbytes(module.scales_and_zeros)
        elif isinstance(module, Int8Linear):
            total += _nbytes(module.weight) + _nbytes(module.scales)
            total += _nbytes(module.offsets) if module.offsets is not None else 0
        elif isinstance(module, PackedLinear):
            total += module.out_features * module.in_features * 2
        elif isinstance(module, Bf16Head):  # its oneDNN copy (`packed`) holds the same matrix: one is read
            total += _nbytes(module.table)
            skipped.add(id(module.packed))
        elif isinstance(module, nn.Linear) and module.weight.data_ptr() not in counted:
            counted.add(module.weight.data_ptr())
            total += _nbytes(module.weight)
    return total


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def last_level_cache_bytes() -> int | None:
    """The size of the CPU's last-level cache (Linux sysfs), or None where it is not known."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


def uncacheable_bytes(cache_bytes: int | None) -> int:
    """A test matrix the cache cannot hold: 4x the last-level cache, 256 MiB to 2 GiB."""
    return min(max(4 * (cache_bytes or 0), 256 * 2**20), 2 * 2**30)


def memory_read_bytes_per_second(n_bytes: int | None = None, repeats: int = 3) -> float:
    """How fast this process reads memory with torch's threads: the best of `repeats` passes of
    the C decode kernel (or, without it, torch's sum) over a float32 matrix of n_bytes (default:
    `uncacheable_bytes` of this CPU's last-level cache)."""
    from llama3.fast import kernels

    if n_bytes is None:
        n_bytes = uncacheable_bytes(last_level_cache_bytes())
    columns = 1024
    table = torch.ones(max(1, n_bytes // 4 // columns), columns)  # filling it also maps every page
    n_bytes = table.numel() * 4
    lib, read = kernels.library(), table.sum
    if lib is not None:
        x = torch.ones(1, columns)

        def read():
            lib.matvec(x, table, None, kernels.F32, table.shape[0])
    return n_bytes / best_seconds(read, repeats)


def best_seconds(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of fn()."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass
class DecodeBound:
    weight_bytes: int          # read once a token
    read_bytes_per_second: float
    fits_in_cache: bool        # weights smaller than the last-level cache: they may stay there

    @property
    def tokens_per_second(self) -> float:
        return self.read_bytes_per_second / self.weight_bytes


def decode_bound(model) -> DecodeBound:
    """The fastest a CPU could decode `model` here: memory read speed / weight bytes a token."""
    cache = last_level_cache_bytes()
    weights = weight_bytes_per_token(model)
    return DecodeBound(weights, memory_read_bytes_per_second(uncacheable_bytes(cache)),
                       cache is not None and weights < cache)
