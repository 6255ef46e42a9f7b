"""How fast can this machine read memory, and what does that allow a decoder?

    python benchmarks/memory_bandwidth.py [--threads 2] [--gib 1] [--speed results/speed_cpu_....json]

Decoding one token reads every weight of the model once (the head included; the embedding
lookup reads one row). A model of W bytes cannot decode faster than bandwidth / W tokens a
second, whatever the code does. This script measures the bandwidth and prints that bound for
the embedded model (SmolLM2-135M) at each precision.

Bandwidth is measured on a matrix much bigger than the caches (1 GiB by default; this VM's L3
is 300 MiB), best of 5 passes, three ways:
    torch sum      PyTorch's own reduction over the matrix (an independent reader)
    C f32 / bf16   our decode kernel (`llama3_matvec` in llama3/fast/native.c) over the matrix

With --speed (a JSON written by benchmarks/speed.py) it also prints what "3x transformers"
(issue 8's decode target) would need from memory at each precision, next to the bound.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama3, however it is installed

import torch
import torch.nn as nn

K = 1024  # columns of the test matrix


def best_seconds(fn, repeats: int = 5) -> float:
    fn()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(gib: float, threads: int) -> dict[str, float]:
    """GB/s (10^9 bytes a second) of each reader over a `gib` GiB matrix."""
    from llama3.fast import native

    torch.set_num_threads(threads)
    results = {}
    n_bytes = int(gib * 2**30)
    table = torch.ones(n_bytes // 4 // K, K)
    results["torch sum (f32)"] = table.numel() * 4 / best_seconds(table.sum) / 1e9
    del table
    lib = native.library()
    if lib is None:
        print(f"(no C kernel: {native.build_error()})")
        return results
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        rows = n_bytes // size // K
        linear = nn.Linear(K, rows, bias=False, dtype=dtype)
        matrix, _ = native.describe(linear)
        x, y = torch.randn(K), torch.empty(rows)
        seconds = best_seconds(lambda: lib.llama3_matvec(ctypes.byref(matrix), x.data_ptr(), y.data_ptr(), 1, threads))
        results[f"C matvec ({'f32' if size == 4 else 'bf16'})"] = rows * K * size / seconds / 1e9
        del linear
    return results


def bytes_per_token(params: int) -> dict[str, float]:
    """Weight bytes read per decoded token at each precision (int8: + a float32 scale per row,
    int4: + a bf16 scale and zero per 32 weights, rounded into the per-weight cost)."""
    return {"fp32": params * 4, "bf16": params * 2, "int8": params * 1.0, "int4": params * (0.5 + 4 / 32)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test matrix (default 1 GiB)")
    parser.add_argument("--speed", type=Path, help="a benchmarks/speed.py results JSON, for the 3x-transformers line")
    args = parser.parse_args()

    from llama3.checkpoint.gguf import read_gguf_config
    from llama3.llm import resolve_source
    from llama3.params import count_params

    for threads in sorted({1, args.threads}):
        results = measure(args.gib, threads)
        for name, gbs in results.items():
            print(f"{threads} thread{'s' if threads > 1 else ' '}  {name:<18} {gbs:6.1f} GB/s")
    bandwidth = max(results.values())  # the fastest reader at --threads
    params = count_params(read_gguf_config(resolve_source(None))).total
    print(f"\nSmolLM2-135M ({params / 1e6:.1f}M parameters, head tied): decode bound at {bandwidth:.1f} GB/s")
    speed = json.loads(args.speed.read_text())["results"] if args.speed else {}
    peer = {"fp32": "hf-fp32", "bf16": "hf-bf16", "int8": "hf-fp32", "int4": "hf-fp32"}
    for precision, n_bytes in bytes_per_token(params).items():
        line = f"  {precision:<5} {n_bytes / 1e6:6.0f} MB a token -> at most {bandwidth * 1e9 / n_bytes:6.1f} tokens/s"
        ours = speed.get(f"ours-{precision}", {}).get("decode_tokens_per_second")
        theirs = speed.get(peer[precision], {}).get("decode_tokens_per_second")
        if ours:
            line += f"; ours {ours:.1f} ({ours * n_bytes / 1e9:.1f} GB/s)"
        if theirs:
            need = 3 * theirs * n_bytes / 1e9
            line += f"; 3x {peer[precision]} ({3 * theirs:.0f} tok/s) needs {need:.1f} GB/s"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
