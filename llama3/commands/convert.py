"""`llama3 convert`: rewrite a checkpoint in another format (HF folder, Meta folder, GGUF file)."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  llama3 convert Meta-Llama-3-8B/original --to hf llama-3-8b-hf
  llama3 convert llama-3-8b-hf --to meta llama-3-8b-meta --dtype bfloat16
  llama3 convert my-tiny-model --to gguf tiny.gguf
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Load a checkpoint (HF folder, Meta folder, .gguf file, hf:ORG/NAME or built-in name) and write it in another "
        "format. HF <-> Meta conversion renames the tensors and permutes the rows of wq/wk between the two "
        "rotary layouts; the numbers are otherwise copied exactly. The output is written atomically.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("source", help="the checkpoint to read: a HF/Meta folder, a .gguf file, "
                                       "hf:ORG/NAME[/FILE.gguf] (from the Hugging Face Hub) or a built-in name")
    parser.add_argument("--to", required=True, choices=("hf", "meta", "gguf"), help="the format to write")
    parser.add_argument("output", help="the folder (hf, meta) or .gguf file to write")
    parser.add_argument("--dtype", default="auto",
                        help="weights' type in the output: float32, bfloat16, float16, or auto (default: "
                             "keep the source's type)")


def run(args: argparse.Namespace) -> int:
    import sys

    from llama3.checkpoint import load_checkpoint, save_checkpoint
    from llama3.llm import parse_dtype, resolve_source

    dtype = "auto" if args.dtype == "auto" else parse_dtype(args.dtype)
    print(f"reading {args.source} ...", file=sys.stderr)
    llm = load_checkpoint(resolve_source(args.source), dtype=dtype)
    print(f"writing {args.output} ({args.to}, {str(llm.dtype).removeprefix('torch.')}) ...", file=sys.stderr)
    save_checkpoint(llm, args.output, format=args.to)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
