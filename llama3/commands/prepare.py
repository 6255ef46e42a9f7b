"""`llama3 prepare`: tokenize text into training shards (token ids on disk, a manifest, a validation split)."""

from __future__ import annotations

import argparse

EXAMPLES = """\
input (--data):
  a .txt or .md file        one document
  a .jsonl file             one document per line, in its "text" field
  a folder                  every such file under it, in sorted order
output (--out):
  train_000.bin ...         token ids, uint16 when the vocabulary has <= 65536 tokens, else uint32;
  val_000.bin               every document as <bos> text <eos>
  manifest.json             source, tokenizer, token counts, shard list
  tokenizer files           so `llama3 train --data OUT` finds the tokenizer
Re-running with the same input and tokenizer does nothing; with changed input it rewrites the shards.

examples:
  llama3 train-tokenizer --data books/ --vocab-size 4096 --out tok
  llama3 prepare --data books/ --tokenizer tok --out books-data
  llama3 train --data books-data --out model
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--data", required=True, metavar="PATH", help="a text file, a JSONL file or a folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write the shards into")
    parser.add_argument("--tokenizer", metavar="SOURCE", default=None,
                        help="a tokenizer folder (e.g. from train-tokenizer), a model folder, a .gguf file, "
                             "hf:ORG/NAME (a Hugging Face Hub model's tokenizer) or a built-in name (default: Meta's "
                             "Llama 3 tokenizer, 128,256 tokens)")
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="X",
                        help="share of documents held out for validation (default 0.05)")
    parser.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                        help="tokens per shard file (default 67,108,864)")


def readable_dtype(dtype: str) -> str:
    """numpy's '<u2' as 'uint16 (2 bytes a token)'."""
    import numpy as np

    dt = np.dtype(dtype)
    return f"{dt.name} ({dt.itemsize} bytes a token)"


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from llama3.tokenizer import load_tokenizer
    from llama3.train.data import DataError, data_files, prepare

    if args.shard_tokens is not None and args.shard_tokens < 1:  # fail before the slow tokenizer load
        raise DataError(f"--shard-tokens {args.shard_tokens}: give a positive number of tokens per shard file")
    data_files(args.data)  # a missing path fails before the tokenizer loads
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"--out {args.out} is a file, not a folder; give a new or existing folder for the shards")
    tokenizer = load_tokenizer(args.tokenizer)
    manifest = prepare(args.data, args.out, tokenizer, args.tokenizer or "llama3", args.val_fraction,
                       args.shard_tokens)  # None: the default
    splits = manifest["splits"]
    print(f"{args.out}: {splits['train']['tokens']:,} training tokens ({splits['train']['documents']:,} documents), "
          f"{splits['val']['tokens']:,} validation tokens, stored as {readable_dtype(manifest['dtype'])}",
          file=sys.stderr)
    return 0
