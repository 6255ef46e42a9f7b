"""Arguments that several subcommands share, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ["float32", "bfloat16", "float16"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model SOURCE and --dtype, for every command that runs a model."""
    parser.add_argument("--model", metavar="SOURCE", default=None,
                        help="a Hugging Face folder, a Meta folder (consolidated.*.pth + params.json), a .gguf "
                             "file or a built-in name (default: the embedded smollm2-135m-instruct)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                        help="weights' dtype in memory (default float32; bfloat16 halves memory, on CPU it is "
                             "usually slower)")
