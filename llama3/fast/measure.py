"""Measuring speed and memory the same way everywhere (`llama3 bench` and benchmarks/).

    prefill   tokens/s of one forward over a long prompt (filling the KV cache)
    ttft      time to first token: prefill of a short prompt + picking the first token
    decode    tokens/s of the one-token-at-a-time loop after it (the engine's own timer)
    peak RSS  the most resident memory this process ever held (ru_maxrss)

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

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        load = f"{self.load_seconds:.2f} s" if self.load_seconds is not None else "-"
        return [f"load time            {load}",
                f"prefill              {self.prefill_tokens_per_second:8.1f} tokens/s  ({self.prefill_tokens} tokens)",
                f"time to first token  {self.ttft_seconds * 1000:8.1f} ms",
                f"decode               {self.decode_tokens_per_second:8.1f} tokens/s  ({self.decode_tokens} tokens)",
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
    from llama3.model import KVCache

    config = model.config
    n_tokens = min(n_tokens, config.max_seq_len)
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    tokens = torch.tensor([prompt_of(n_tokens, config.vocab_size)], device=device)  # [1, T]
    best = float("inf")
    for attempt in range(repeats + 1):  # attempt 0 is the warm-up
        cache = KVCache(config, 1, n_tokens, dtype=dtype, device=device)
        start = time.perf_counter()
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


def measure(model, load_seconds: float | None = None, prefill_tokens: int = 512,
            new_tokens: int = 128) -> SpeedReport:
    """Prefill, time to first token, decode and peak RSS of `model` in this process."""
    prefill = prefill_tokens_per_second(model, prefill_tokens)
    ttft, decode, decoded = decode_speed(model, new_tokens=new_tokens)
    return SpeedReport(load_seconds, min(prefill_tokens, model.config.max_seq_len), prefill, ttft,
                       decoded, decode, peak_rss_bytes())
