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
                        help="weights' dtype in memory (default float32; bfloat16 halves memory and the bytes "
                             "each decoded token reads; `llama3 bench` shows what it gains on this CPU)")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize and --plain, for commands that generate (llama3.fast is on unless --plain)."""
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantization for faster decoding at a small accuracy cost "
                             "(`llama3 perplexity --quantize` measures it). int8: per-row scales, a quarter "
                             "of the float32 bytes. int4: a scale and offset per 32 weights (CPU only); the "
                             "embedded model's own Q4_1 weights run as they are. From a .gguf, Q8_0 and Q4_0/Q4_1 "
                             "blocks are read directly")
    parser.add_argument("--plain", action="store_true",
                        help="run the readable model exactly as written: no fused projections, no lean "
                             "decoding step, no C decoding step, no packed weights (slower; the same tokens up "
                             "to float rounding). LLAMA3_NATIVE=0 turns off only the C step, which is compiled "
                             "with the machine's C compiler on first use and cached in ~/.cache/llama3 (or $LLAMA3_CACHE)")

