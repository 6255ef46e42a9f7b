"""How fast can this machine read memory, and what does that allow a decoder?

    python benchmarks/memory_bandwidth.py [--threads 2] [--gib 1] [--speed results/speed_cpu_....json]

Decoding one token reads every weight of the model once (the head included; the embedding
lookup reads one row). A model of W bytes cannot decode faster than bandwidth / W tokens a
second, whatever the code does. This script measures the bandwidth and prints that bound for
the embedded model (SmolLM2-135M) at each precision.

Bandwidth is measured on a matrix much bigger than the caches (1 GiB by default; this VM's L3
is 300 MiB), best of 5 passes, two ways:
    C decode kernel  our float32 kernel (`torch.ops.llama3.matvec`, llama3/fast/kernels.cpp), as `llama3 bench`
                     measures it (`llama3.fast.measure.memory_read_bytes_per_second`)
    torch sum        PyTorch's own reduction over the matrix (an independent reader)
The bytes a token are counted on the loaded models (`weight_bytes_per_token`: int4 keeps its
head in bfloat16, int8 and the rest count their scales).

With --speed (a JSON written by benchmarks/speed.py) it also prints what "3x transformers"
(issue 8's decode target) would need from memory at each precision, next to the bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama3, however it is installed

import torch

PEER = {"fp32": "hf-fp32", "bf16": "hf-bf16", "int8": "hf-fp32", "int4": "hf-fp32"}


def torch_sum_bytes_per_second(n_bytes: int, repeats: int = 5) -> float:
    """An independent reader: PyTorch's own sum over a float32 matrix of n_bytes."""
    from llama3.fast.measure import best_seconds

    table = torch.ones(n_bytes // 4 // 1024, 1024)
    return table.numel() * 4 / best_seconds(table.sum, repeats)


def load(precision: str):
    """SmolLM2 as `llama3 bench` loads it at this precision (int8/int4 from the shipped Q4_1
    file: the byte count is the same as from llama.cpp's Q8_0 file)."""
    from llama3.fast import load_fast

    return load_fast(None, dtype="bfloat16" if precision == "bf16" else None,
                     quantize=precision if precision in ("int8", "int4") else None).model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test matrix (default 1 GiB)")
    parser.add_argument("--speed", type=Path, help="a benchmarks/speed.py results JSON, for the 3x-transformers line")
    args = parser.parse_args()

    from llama3.fast.measure import last_level_cache_bytes, memory_read_bytes_per_second, weight_bytes_per_token

    n_bytes = int(args.gib * 2**30)
    cache = last_level_cache_bytes()
    print(f"last-level cache: {cache / 2**20:.0f} MiB; test matrix {n_bytes / 2**20:.0f} MiB" if cache else
          f"test matrix {n_bytes / 2**20:.0f} MiB")
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        c_kernel = memory_read_bytes_per_second(n_bytes, repeats=5)
        print(f"{threads} thread{'s' if threads > 1 else ' '}  C decode kernel {c_kernel / 1e9:6.1f} GB/s   "
              f"torch sum {torch_sum_bytes_per_second(n_bytes) / 1e9:6.1f} GB/s")
    speed = json.loads(args.speed.read_text())["results"] if args.speed else {}
    print(f"\nSmolLM2-135M, decode bound at {c_kernel / 1e9:.1f} GB/s (weights read a token, as `llama3 bench` counts them)")
    for precision in ("fp32", "bf16", "int8", "int4"):
        n = weight_bytes_per_token(load(precision))
        line = f"  {precision:<5} {n / 1e6:6.0f} MB a token -> at most {c_kernel / n:6.1f} tokens/s"
        ours = speed.get(f"ours-{precision}", {}).get("decode_tokens_per_second")
        theirs = speed.get(PEER[precision], {}).get("decode_tokens_per_second")
        if ours:
            line += f"; ours {ours:.1f} ({ours * n / 1e9:.1f} GB/s)"
        if theirs:
            line += f"; 3x {PEER[precision]} ({3 * theirs:.0f} tok/s) needs {3 * theirs * n / 1e9:.1f} GB/s"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
