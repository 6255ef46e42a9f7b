"""`llama3 perplexity FILE`: sliding-window perplexity of a text file under a model."""

from __future__ import annotations

import argparse

from llama3.commands.common import add_model_arguments
from llama3.parallel.launch import add_tp_argument


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Perplexity = exp(mean -log p(token | the tokens before it)) over a text: how surprised "
        "the model is per token (lower is better). A long text is read through windows of "
        "--context tokens, each starting --stride tokens after the previous one; each token is "
        "scored once, with at least context - stride tokens of context. Use it to check that a "
        "checkpoint loaded correctly and to see what --dtype or --quantize costs."
    )
    parser.add_argument("file", help="a UTF-8 text file to score")
    add_model_arguments(parser)
    parser.add_argument("--context", type=int, default=None,
                        help="tokens per window (default: min(max_seq_len, 512))")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts, less than --context (default: context / 2)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="int8 (per-row scales) or int4 (a scale and offset per 32 weights), to see what "
                             "weight-only quantization costs (see llama3.fast)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="score only the first N tokens of the file (a quick estimate)")
    add_tp_argument(parser)  # --tp N under torchrun: llama3/parallel/launch.py


def run(args: argparse.Namespace) -> int:
    from llama3.fast import load_fast
    from llama3.errors import Llama3Error
    from llama3.perplexity import perplexity

    for name, value, least in (("--context", args.context, 2), ("--stride", args.stride, 1),
                               ("--max-tokens", args.max_tokens, 1)):
        if value is not None and value < least:  # checked before the (slow) model load
            raise Llama3Error(f"{name} must be at least {least}, got {value}")
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise Llama3Error(f"{args.file}: no such file; pass the path of a plain text file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Llama3Error(f"{args.file}: cannot read it as UTF-8 text ({e.__class__.__name__}); "
                          "pass a plain text file") from None
    if args.tp is not None:  # tensor parallel: every rank scores the same windows, rank 0 prints
        from llama3.parallel.launch import lockstep_llm

        llm = lockstep_llm(args)
    else:
        llm = load_fast(args.model, dtype=args.dtype, quantize=args.quantize, fuse=False)
    result = perplexity(llm, text, args.context, args.stride, max_tokens=args.max_tokens, progress=True)
    print(f"perplexity {result.perplexity:.4f}  (nll {result.nll:.4f} nats = {result.bits_per_token:.3f} "
          f"bits per token; {result.n_scored} tokens scored in {result.n_windows} windows of "
          f"{result.context}, stride {result.stride})")
    return 0
