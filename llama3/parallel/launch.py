"""`--tp N` for the commands: `torchrun --nproc-per-node N -m llama3 generate|chat|serve|perplexity|bench --tp N`.

Every rank runs the command; what each rank does differs only here, so the commands keep one
small `if args.tp:` each:

    generate             `generate(args)`: rank 0 reads the prompt and broadcasts it; every rank runs the
                         same TextGeneration, rank 0 samples (ids broadcast) and writes
    perplexity, bench    `lockstep_llm(args)`: every rank runs the same code on the same input
    chat, serve          `lead_engine(args)`: returns on rank 0 only, whose engine broadcasts each step;
                         the other ranks follow those steps (lockstep.py) and exit when rank 0 does

On ranks other than 0 stdout and stderr go to /dev/null, so a message or an error is printed once,
by rank 0; a failed collective is the exception, written by every rank that sees it (tp.py).
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time

from llama3.errors import Llama3Error


def add_tp_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=None, metavar="N",
                        help="tensor parallelism: split every layer over N processes, started with "
                             "`torchrun --nproc-per-node N -m llama3 ... --tp N` (N must divide the model's "
                             "key/value heads; NCCL on GPUs, gloo on CPUs; see docs/parallel.md)")


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def refuse(args: argparse.Namespace) -> None:
    """Options the tensor-parallel model does not support yet -> one-line errors, before anything loads."""
    if args.tp < 1:
        raise Llama3Error(f"--tp {args.tp}: give the number of processes (at least 1)")
    for flag, attr in (("--quantize", "quantize"), ("--compile", "compile"), ("--device", "device"),
                       ("--lab", "lab"), ("--explain", "explain")):
        if getattr(args, attr, None):
            why = ("each rank uses cuda:LOCAL_RANK, or the CPU" if attr == "device"
                   else "it runs forwards the other ranks do not" if attr in ("lab", "explain")
                   else "the split model runs model.py's own functions on float weights")
            raise Llama3Error(f"{flag} is not available with --tp ({why}); leave it out")


def start(args: argparse.Namespace):
    """Check, join the group, load this rank's slices -> LLM.  Rank 0 says what it loaded on stderr."""
    from llama3.llm import DEFAULT_MODEL
    from llama3.parallel import lockstep, tp

    try:
        refuse(args)
        tp.check_world(args.tp)
        if not is_rank0():  # one voice: rank 0's (a failed collective still reaches the real stderr)
            sys.stdout = sys.stderr = open(os.devnull, "w")
        name = args.model or DEFAULT_MODEL
        print(f"loading {name} split over {args.tp} ranks ...", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        llm = tp.load_tp(args.model, args.tp, dtype=args.dtype)
    except Llama3Error:
        if not is_rank0():
            raise SystemExit(2) from None   # rank 0 says it
        raise
    if llm.tokenizer is None:
        raise Llama3Error(f"{name} has no tokenizer files (tokenizer.json or tokenizer.model); add them to the folder")
    from llama3.params import human_bytes

    print(f"loaded {name} in {time.perf_counter() - begin:.1f} s ({llm.dtype}, {llm.device}); each of the "
          f"{args.tp} ranks holds {human_bytes(tp.local_weight_bytes(llm.model))} of weights",
          file=sys.stderr, flush=True)
    lockstep.guard(llm.model)
    atexit.register(tp.finish)
    return llm


def lockstep_llm(args: argparse.Namespace):
    """perplexity, bench: every rank runs the command's own code; its forwards run on all ranks together."""
    from llama3.parallel import lockstep

    llm = start(args)
    lockstep.always_inside()   # this (main) thread's forwards: every rank makes the same ones
    return llm


def rank0_value(read):
    """`read()` on rank 0 (e.g. stdin), its value - or its Llama3Error - on every rank."""
    from llama3.parallel import lockstep

    if is_rank0():
        try:
            value = read()
        except Llama3Error as e:
            lockstep.broadcast(("error", str(e)))
            raise
        return lockstep.broadcast(("ok", value))[1]
    kind, value = lockstep.broadcast()
    if kind == "error":
        raise SystemExit(2)
    return value


def generate(args: argparse.Namespace) -> int:
    """`llama3 generate --tp N` (see llama3/commands/generate.py for the one-process version)."""
    from contextlib import nullcontext

    from llama3.commands.generate import cli_wording, prefill_progress, settings_from_args, speed_report
    from llama3.commands.text_input import text_or_stdin
    from llama3.engine.sequence import Result
    from llama3.generate import TextGeneration
    from llama3.parallel import tp

    settings = settings_from_args(args, truncate=args.truncate)
    llm = lockstep_llm(args)
    with tp.collective_errors():
        def read():
            prompt = text_or_stdin(args.prompt, "PROMPT", args.errors)
            if not prompt:
                raise Llama3Error("the prompt is empty; give the text to continue (or '-' to read it from stdin)")
            return prompt
        prompt = rank0_value(read)
        try:
            generation = TextGeneration(llm.model, llm.tokenizer, [llm.tokenizer.encode(prompt)], settings)
        except Llama3Error as e:  # the same on every rank: rank 0 says it
            raise Llama3Error(cli_wording(e)) from None
        tp.sample_on_rank0(generation.tokens)
        with prefill_progress(generation.tokens) if is_rank0() else nullcontext():
            for _, piece in generation:
                sys.stdout.write(piece)
                sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    tokens = generation.tokens  # the one request's TokenGeneration, reported as the engine reports a Result
    print(speed_report(Result(token_ids=tokens.tokens[0], finish_reason=tokens.finish_reasons[0],
                              prompt_tokens=tokens.prompt_lengths[0], prefill_seconds=tokens.prefill_seconds,
                              decode_seconds=tokens.decode_seconds, decode_steps=tokens.decode_steps)), file=sys.stderr)
    return 0


def lead_engine(args: argparse.Namespace, engine_config=None):
    """chat, serve: the LLM on rank 0, whose `llm.engine` broadcasts its steps.  The other ranks never
    return: they run rank 0's steps until it stops, then exit."""
    from llama3.parallel import lockstep, tp

    llm = start(args)
    with tp.collective_errors():
        engine = lockstep.shared_engine(llm.model, llm.tokenizer, engine_config)
    if not is_rank0():
        lockstep.follow(engine)
        tp.finish()
        raise SystemExit(0)
    llm.__dict__["_engine"] = engine   # what `llm.engine` gives (chat), and serve's engine

    def stop():  # at exit (after the engine's own atexit close): the followers end too
        try:
            lockstep.stop_followers()
        except Exception:  # noqa: BLE001  (a follower already gone: nothing to tell)
            pass

    atexit.register(stop)
    return llm
