"""`llama3 bench`: load time, prefill and decode speed and peak memory of a model on this machine."""

from __future__ import annotations

import argparse

from llama3.commands.common import add_model_arguments, add_speed_arguments
from llama3.parallel.launch import add_tp_argument


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure how fast a model runs here: load time, prefill (one forward over a long prompt, "
        "tokens/s), time to first token and decode speed (greedy, one token at a time after a short "
        "prompt, tokens/s), and the peak resident memory of the process. Decoding one token reads "
        "every weight once, so decode speed is bounded by memory bandwidth / model bytes: on a CPU, "
        "bench also reads a matrix 4x the size of the CPU's last-level cache (256 MiB to 2 GiB) to "
        "measure that bandwidth and prints the bound, and how close the run came to it. 16-bit "
        "(--dtype bfloat16), int8 and int4 (--quantize) weights are fewer bytes. Comparisons with "
        "transformers and llama.cpp: see benchmarks/ and BENCHMARKS.md."
    )
    add_model_arguments(parser)
    add_speed_arguments(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model first (fuses the small ops around the matmuls; "
                             "compiling takes minutes, excluded from the timings but not from load time)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for prefill (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_tp_argument(parser)  # --tp N under torchrun: llama3/parallel/launch.py


def run(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from llama3.errors import Llama3Error
    from llama3.fast import load_fast
    from llama3.fast.measure import decode_bound, measure

    if args.prefill_tokens < 1 or args.new_tokens < 2:
        raise Llama3Error("--prefill-tokens must be >= 1 and --new-tokens >= 2")
    if args.threads is not None:
        if args.threads < 1:
            raise Llama3Error(f"--threads {args.threads}: give a positive number of threads")
        torch.set_num_threads(args.threads)
    from llama3.fast import kernels

    threads_asked = torch.get_num_threads()  # (a busy machine may make the kernels' pool drop to 1 for a while)
    start = time.perf_counter()
    if args.tp is not None:  # tensor parallel: every rank runs the same measurements, rank 0 prints its own
        from llama3.parallel.launch import lockstep_llm

        llm = lockstep_llm(args)
    else:
        llm = load_fast(args.model, dtype=args.dtype, quantize=args.quantize, fuse=not args.plain,
                        compile=args.compile)
    load_seconds = time.perf_counter() - start
    try:
        report = measure(llm.model, load_seconds, args.prefill_tokens, args.new_tokens,
                         engine=args.tp is None)  # tensor parallel: the ranks follow TokenGeneration only
    except Exception as e:  # torch.compile compiles on the first call, and can fail there
        if not args.compile:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise Llama3Error(f"torch.compile could not compile this model ({type(e).__name__}: {first}); "
                          "run without --compile") from None
    threads = kernels.thread_stats() if llm.plan is not None and llm.plan.kernels == "C++" else None
    # measured after the report, so its test matrix stays out of the peak RSS
    bound = decode_bound(llm.model) if llm.device.type == "cpu" and args.tp is None else None
    if args.json:
        extra = {} if bound is None else {"weight_bytes_per_token": bound.weight_bytes,
                                          "memory_read_bytes_per_second": bound.read_bytes_per_second,
                                          "decode_bound_tokens_per_second": bound.tokens_per_second}
        if threads is not None:
            extra |= {"thread_pool": threads}
        print(json.dumps(report.as_dict() | extra))
    else:
        what = f"{llm.source} ({llm.dtype}".replace("torch.", "") + (f", {args.quantize}" if args.quantize else "") + ")"
        print(f"{what}, {threads_asked} threads, torch {torch.__version__}")
        plan = llm.plan.describe() if llm.plan is not None else "none: model.py's own functions and PyTorch's kernels"
        print(f"plan: {plan}")
        print("\n".join(report.lines()))
        if bound is not None:
            print(bound_line(bound, report.decode_tokens_per_second))
        if threads is not None and threads["losses"]:
            print(f"thread pool          {threads['losses']} waits for a pre-empted thread "
                  f"({threads['lost_seconds'] * 1000:.0f} ms), then {threads['solo_jobs']} of "
                  f"{threads['jobs']} kernel calls on one thread (a busy machine: llama3/fast/threads.h)")
    return 0


def bound_line(bound, decode_tokens_per_second: float) -> str:
    """The decode speed memory allows, and how close this run came to it."""
    line = (f"decode bound         {bound.tokens_per_second:8.1f} tokens/s  ({bound.weight_bytes / 1e6:.0f} MB "
            f"of weights a token / {bound.read_bytes_per_second / 1e9:.1f} GB/s read here); this run: "
            f"{decode_tokens_per_second / bound.tokens_per_second:.0%} of it")
    if bound.fits_in_cache:
        line += " (the weights fit in the CPU's last-level cache, so it can run faster than this)"
    return line
