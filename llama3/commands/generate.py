"""`llama3 generate`: continue a prompt, streaming only the new text to stdout.

Also home of the pieces `llama3 chat` shares: the sampling options, turning them
into GenerationSettings, and loading a model with a note on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import threading
import time

from llama3.commands.common import add_model_arguments, add_speed_arguments
from llama3.commands.text_input import add_errors_argument, argument_text, text_or_stdin
from llama3.parallel.launch import add_tp_argument

PREFILL_NOTICE_S = 2.0  # a prefill still running after this long gets a progress line on stderr

EXAMPLES = """\
examples:
  llama3 generate "The capital of France is"
  llama3 generate --temperature 0.8 --top-p 0.95 --seed 1 "Once upon a time"
  echo "def fib(n):" | llama3 generate --stop "\\n\\n" -
  llama3 generate --model path/to/Meta-Llama-3-8B "Llamas are"
"""


def add_sampling_arguments(parser: argparse.ArgumentParser, *, temperature: float, top_p: float,
                           max_new_tokens: int) -> None:
    """The sampling options, shared by `generate` and `chat` (which differ only in defaults)."""
    group = parser.add_argument_group("sampling (applied in this order: repetition penalty, temperature, "
                                      "top-k, top-p, min-p)")
    group.add_argument("--temperature", type=float, default=temperature,
                       help=f"divide the logits by T before sampling: below 1 sharpens, above 1 flattens; "
                            f"0 = greedy, always the most likely token (default {temperature})")
    group.add_argument("--top-k", type=int, default=0, metavar="K",
                       help="sample only among the K most likely tokens (default 0 = off)")
    group.add_argument("--top-p", type=float, default=top_p, metavar="P",
                       help=f"sample only among the fewest most likely tokens whose probabilities add up to P "
                            f"('nucleus'; default {top_p}, 1 = off)")
    group.add_argument("--min-p", type=float, default=0.0, metavar="P",
                       help="drop tokens less than P times as likely as the best one (default 0 = off)")
    group.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                       help="make tokens already in the text less likely: positive logits / R, negative * R "
                            "(default 1 = off; 1.1 is typical)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                       help=f"stop after N new tokens (default {max_new_tokens}; capped by the context length)")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed: the same seed, settings and prompt give the same text")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="also stop where this text appears (not printed); repeatable. The model's own stop "
                            "tokens (e.g. <|eot_id|>, <|im_end|>) always apply")


def settings_from_args(args: argparse.Namespace, *, truncate: bool = False):
    """GenerationSettings from the parsed options (validated: bad values raise Llama3Error)."""
    from llama3.generate import GenerationSettings

    escapes = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}        # so --stop "\n" means a newline
    errors = getattr(args, "errors", "strict")                 # chat has no --errors: strict
    stops = [re.sub(r"\\[nt\\]", lambda m: escapes[m.group()], argument_text(s, "--stop", errors)) for s in args.stop]
    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed, stop=stops, truncate=truncate)


def load_model(args: argparse.Namespace):
    """Load --model (with --dtype), saying what and how long on stderr; it must have a tokenizer."""
    from llama3.errors import Llama3Error
    from llama3.fast import load_fast
    from llama3.llm import DEFAULT_MODEL

    name = args.model or DEFAULT_MODEL
    print(f"loading {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    # llama3.load, then llama3.fast's inference speed-ups unless --plain (same tokens up to float rounding)
    llm = load_fast(args.model, dtype=args.dtype, quantize=args.quantize, fuse=not args.plain)
    if llm.tokenizer is None:
        raise Llama3Error(f"{name} has no tokenizer files (tokenizer.json or tokenizer.model); add them to the folder")
    print(f"loaded {name} in {time.perf_counter() - start:.1f} s ({llm.dtype}, {llm.device})",
          file=sys.stderr, flush=True)
    return llm


@contextlib.contextmanager
def prefill_progress(tokens, stream=None, after: float | None = None):
    """While the body runs, report on stderr a prefill of `tokens.prompt_lengths` that takes longer than
    `after` seconds (a --truncate'd 8K prompt takes minutes on a CPU and would otherwise show nothing):
    one line when it starts to take long, a ticking count of seconds on a terminal, a closing line when done.
    The body ends it by iterating: the notice stops once `tokens.prefill_seconds` is set or the body exits."""
    stream = stream or sys.stderr
    after = PREFILL_NOTICE_S if after is None else after
    done = threading.Event()
    n = sum(tokens.prompt_lengths)

    def watch():
        if done.wait(after) or tokens.prefill_seconds:
            return
        start = time.perf_counter() - after
        tty = stream.isatty()
        print(f"prefill: reading the prompt's {n:,} tokens ...", end="" if tty else "\n", file=stream, flush=True)
        while not done.wait(1.0) and not tokens.prefill_seconds:
            if tty:
                print(f"\rprefill: reading the prompt's {n:,} tokens ... {time.perf_counter() - start:.0f} s",
                      end="", file=stream, flush=True)
        print(("\r" if tty else "") + f"prefill: {n:,} tokens in {time.perf_counter() - start:.1f} s" + " " * 8,
              file=stream, flush=True)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def cli_wording(error: Exception, truncate_flag: bool = True) -> str:
    """A library message in the CLI's words: the Python keyword truncate=True is the flag --truncate
    (a command without that flag, chat, leaves the advice out)."""
    if truncate_flag:
        return str(error).replace("pass truncate=True", "pass --truncate")
    return str(error).replace(", or pass truncate=True to keep its last tokens", "")


def speed_report(result) -> str:
    """One line on how fast a finished request went (a `llama3.engine.Result`)."""
    line = (f"{result.completion_tokens} new tokens; prefill {result.prompt_tokens} tokens in "
            f"{result.prefill_seconds:.2f} s")
    if result.decode_steps:
        line += f"; decode {result.decode_tokens_per_second:.1f} tokens/s"
    return line + f"; finish: {result.finish_reason}"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Continue PROMPT with the model and print only the continuation, as it is generated. "
                          "The prompt is raw text: no chat template is applied (use `llama3 chat` for that). "
                          "Load time and speed go to stderr, so stdout holds just the text.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("prompt", metavar="PROMPT", help="the text to continue; '-' reads it from stdin")
    add_model_arguments(parser)
    add_speed_arguments(parser)
    add_sampling_arguments(parser, temperature=0.0, top_p=1.0, max_new_tokens=256)
    parser.add_argument("--truncate", action="store_true",
                        help="if the prompt is longer than the context, keep its last tokens instead of failing")
    add_errors_argument(parser)
    add_tp_argument(parser)  # --tp N under torchrun: llama3/parallel/launch.py


def run(args: argparse.Namespace) -> int:
    from llama3.engine import Engine
    from llama3.errors import Llama3Error

    if args.tp is not None:  # tensor parallel: every rank generates in step, rank 0 reads and writes
        from llama3.parallel.launch import generate

        return generate(args)
    settings = settings_from_args(args, truncate=args.truncate)  # check the values before the slow load
    prompt = text_or_stdin(args.prompt, "PROMPT", args.errors)
    if not prompt:
        raise Llama3Error("the prompt is empty; give the text to continue (or '-' to read it from stdin)")
    llm = load_model(args)
    ids = [llm.tokenizer.encode(prompt)]
    try:  # through the engine, as the server and the library go; its KV memory holds just this request
        engine = Engine.sized_for(llm.model, llm.tokenizer, ids, settings)
        generation = engine.stream(ids, settings)
    except Llama3Error as e:  # e.g. a prompt longer than the context
        raise Llama3Error(cli_wording(e)) from None
    with prefill_progress(generation):
        for event in generation:
            if event[0] == "text":
                sys.stdout.write(event[2])
                sys.stdout.flush()
    engine.close()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    print(speed_report(generation.results[0]), file=sys.stderr)
    return 0
