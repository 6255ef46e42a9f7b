"""One decoding step's attention, all layers, at a long context: the C++ kernels against PyTorch's.

    python benchmarks/attention_kernel.py [--context 100,1000,4000] [--threads 1,2] [--repeats 60]

SmolLM2-135M's shapes (30 layers, 9 query heads over 3 kv heads, Dh 64), float32, one query
row (a lone decoding stream), every layer's keys in its own memory (as a model's are: the step
reads them from memory, not from cache).  Rows:
    sdpa     torch's scaled_dot_product_attention over a KVCache's contiguous rows
             [1, Hkv, S, Dh] (enable_gqa: no copies of the kv heads), the readable path's kernel
    attend   torch.ops.llama3.attend over the same rows (what a recorded `llama3 bench` step runs)
    paged    torch.ops.llama3.paged_attend over the engine's pool (llama3/engine/paged_cache.py: one
             tensor for all layers, head-major) through a table of blocks in order, as a fresh
             pool hands them out (what the engine's, and so `llama3 serve`'s, decoding step runs)
    shuffled the same pool through blocks in random order (a long-running server's pool, or the
             prefix cache's blocks)
    by-block the layout before 2026-12-03: each block holds all heads side by side (contiguous
             [n_blocks, Hkv, 16, Dh]), blocks in order
Milliseconds per step (30 layers): min and median of --repeats; ratios (min over min) to sdpa and to attend.
Kernels, rows interleaved in rounds so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from llama3.fast import kernels  # noqa: E402

LAYERS, HEADS, KV_HEADS, DH, BLOCK = 30, 9, 3, 64, 16


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", default="100,1000,4000", help="cached positions, comma-separated")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args(argv)
    ops = kernels.library()
    if ops is None:
        print(f"attention_kernel.py: the C++ kernels did not build: {kernels.build_error()}", file=sys.stderr)
        return 2
    contexts = [int(c) for c in args.context.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    gen = torch.Generator().manual_seed(0)
    results = {}
    for S in contexts:
        n_blocks = -(-S // BLOCK)
        cache = [(torch.randn(1, KV_HEADS, S, DH, generator=gen), torch.randn(1, KV_HEADS, S, DH, generator=gen))
                 for _ in range(LAYERS)]
        # the engine's pool: stored [layers, Hkv, blocks, 16, Dh], indexed [layers, blocks, Hkv, 16, Dh]
        pool_k, pool_v = (torch.randn(LAYERS, KV_HEADS, 2 * n_blocks, BLOCK, DH, generator=gen).transpose(1, 2)
                          for _ in range(2))
        by_block_k, by_block_v = (torch.randn(LAYERS, 2 * n_blocks, KV_HEADS, BLOCK, DH, generator=gen)
                                  for _ in range(2))
        in_order = torch.arange(n_blocks)[None]
        shuffled = torch.randperm(2 * n_blocks, generator=gen)[:n_blocks][None]
        q = torch.randn(1, HEADS, 1, DH, generator=gen)
        q_tokens = q[:, :, 0].contiguous()                                          # [1, H, Dh]
        row, pos = torch.zeros(1, dtype=torch.long), torch.tensor([S - 1])
        steps = {
            "sdpa": lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                             for k, v in cache],
            "attend": lambda: [ops.attend(q, k, v, None) for k, v in cache],
            "paged": lambda: [ops.paged_attend(q_tokens, k, v, in_order, row, pos, BLOCK)
                              for k, v in zip(pool_k, pool_v)],
            "shuffled": lambda: [ops.paged_attend(q_tokens, k, v, shuffled, row, pos, BLOCK)
                                 for k, v in zip(pool_k, pool_v)],
            "by-block": lambda: [ops.paged_attend(q_tokens, k, v, in_order, row, pos, BLOCK)
                                 for k, v in zip(by_block_k, by_block_v)],
        }
        for threads in thread_counts:
            torch.set_num_threads(threads)
            times = {name: [] for name in steps}
            for name, step in steps.items():
                step()  # warm-up (and the kernels' first build)
            for _ in range(args.repeats):
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
            for name, ts in times.items():
                ts.sort()
                results[(S, threads, name)] = (ts[0] * 1e3, ts[len(ts) // 2] * 1e3)
    load = os.getloadavg()[0]
    print(f"\nOne decoding step's attention over {LAYERS} layers (SmolLM2-135M shapes, float32), ms: min (median); "
          f"load {load:.2f} at the end\n")
    names = ("sdpa", "attend", "paged", "shuffled", "by-block")
    print("| positions | threads | " + " | ".join(names) + " | attend / sdpa | paged / attend | shuffled / attend "
          "| by-block / attend |")
    print("|---" * (len(names) + 6) + "|")
    for S in contexts:
        for threads in thread_counts:
            r = {name: results[(S, threads, name)] for name in names}
            cells = " | ".join(f"{r[n][0]:.2f} ({r[n][1]:.2f})" for n in names)
            ratios = " | ".join(f"{r[n][0] / r['attend'][0]:.2f}" for n in ("paged", "shuffled", "by-block"))
            print(f"| {S} | {threads} | {cells} | {r['attend'][0] / r['sdpa'][0]:.2f} | {ratios} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
