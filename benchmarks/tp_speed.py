"""Tensor parallelism on this machine's CPUs (gloo): one process against the same model split over ranks.

    python benchmarks/tp_speed.py [--ranks 2] [--dim 512 --layers 8] [--new-tokens 32] [--prefill-tokens 128]

Writes a small random model (HF safetensors, float32) to a temporary folder and runs, each in fresh
processes with the same CPU cores in all:
    one process   `llama3.load(plain=True)`: model.py on PyTorch's kernels, torch using every core
    tp 1          the tensor-parallel path with one rank (DTensor's bookkeeping, no communication)
    tp N          `torchrun --nproc-per-node N`: each rank 1/N of every matrix, cores / N threads each
Each measures prefill (one forward over --prefill-tokens) and greedy decoding (`llama3.fast.measure`'s
functions, best of repeats), the weight bytes each rank holds and how much its RSS grew while loading
(the largest rank's, under torchrun; modules imported and the process group joined beforehand).  Prints a
markdown table (ratios are against "one process" in the same run).

On a machine with few cores tensor parallelism is not expected to be faster: the ranks share the
same cores and memory bandwidth that one process already uses, and every block adds two all-reduces
(gloo over loopback TCP) plus DTensor's per-call bookkeeping; it is for models that do not fit one
device.  On a busy machine the numbers are noisy: compare only rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """One measurement in this process (under torchrun when --tp is given); rank 0 prints a JSON line."""
    import torch

    from llama3.fast.measure import decode_speed, prefill_tokens_per_second

    if args.tp:  # the modules and the process group first, so that the RSS growth is the load's
        import torch.distributed as dist
        import torch.distributed.tensor.parallel  # noqa: F401

        from llama3.parallel import lockstep, slices, tp  # noqa: F401

        tp.init_mesh(args.tp)
    else:
        import llama3.checkpoint.hf  # noqa: F401
    before = rss_bytes()
    if args.tp:
        llm = tp.load_tp(args.worker, args.tp)
        lockstep.always_inside()   # every rank runs the same measurements
        held, ranks = tp.local_weight_bytes(llm.model), args.tp
    else:
        import llama3

        llm = llama3.load(args.worker, plain=True)
        held, ranks = sum(p.numel() * p.element_size() for p in llm.model.parameters()), 1
    rss = rss_bytes() - before   # what loading added (the process group's buffers too, under torchrun)
    prefill = prefill_tokens_per_second(llm.model, args.prefill_tokens, repeats=2)
    _, decode, _ = decode_speed(llm.model, new_tokens=args.new_tokens, repeats=2)
    row = {"ranks": ranks, "threads": torch.get_num_threads(), "prefill": prefill, "decode": decode,
           "weights": held, "rss": rss}
    if args.tp:
        rows = [None] * args.tp
        dist.all_gather_object(rows, row)
        if dist.get_rank() == 0:
            print("ROW " + json.dumps({**row, "rss": max(r["rss"] for r in rows),
                                       "weights": max(r["weights"] for r in rows)}), flush=True)
        tp.finish()
    else:
        print("ROW " + json.dumps(row), flush=True)


def run(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    rows = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not rows:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return rows[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from llama3.config import ModelConfig
    from llama3.llm import LLM
    from llama3.model import Transformer
    from llama3.params import count_params, human_bytes

    cores = os.cpu_count() or 1
    config = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4 if args.ranks <= 4 else 8,
                         vocab_size=8192, hidden_dim=4 * args.dim, max_seq_len=512)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model")
        LLM(Transformer(config).init_weights(seed=0).eval(), config).save(path, format="hf")
        me = [__file__, "--worker", path, "--prefill-tokens", str(args.prefill_tokens),
              "--new-tokens", str(args.new_tokens)]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        rows = {"one process": run([sys.executable, *me], cores),
                "tp 1": run([*torchrun, "--nproc-per-node", "1", *me, "--tp", "1"], cores),
                f"tp {args.ranks}": run([*torchrun, "--nproc-per-node", str(args.ranks), *me, "--tp", str(args.ranks)],
                                        max(1, cores // args.ranks))}
    base = rows["one process"]
    print(f"model: D={config.dim}, {config.n_layers} layers, H={config.n_heads}, Hkv={config.n_kv_heads}, "
          f"V={config.vocab_size}: {count_params(config).total / 1e6:.1f}M parameters, float32; "
          f"{cores} cores; prefill {args.prefill_tokens} tokens, decode {args.new_tokens} (greedy)\n")
    print("| run | ranks x threads | prefill tokens/s | decode tokens/s | decode vs one process "
          "| weights per rank | RSS growth of the load, per rank |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ranks']} x {r['threads']} | {r['prefill']:.0f} | {r['decode']:.1f} | "
              f"{r['decode'] / base['decode']:.2f}x | {human_bytes(r['weights'])} | {human_bytes(r['rss'])} |")


if __name__ == "__main__":
    main()
