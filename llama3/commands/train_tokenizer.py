"""`llama3 train-tokenizer`: learn a small byte-level BPE vocabulary from your text."""

from __future__ import annotations

import argparse

EXAMPLES = """\
Learns BPE merges the way Llama 3's tokenizer was built (same pre-tokenizer split, byte-level, so any
text encodes), with Llama 3's special tokens and chat template.  A few thousand tokens suit a tiny
model: Llama 3's own 128,256-entry table would be most of its parameters.

examples:
  llama3 train-tokenizer --data books/ --vocab-size 4096 --out tok
  llama3 tokenize --tokenizer tok "And God said, Let there be light"
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="a text file, a JSONL file (\"text\" field) or a folder of them")
    parser.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                        help="tokens in the vocabulary, incl. 256 bytes and 5 special tokens (default 4096)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for tokenizer.json and tokenizer_config.json")


def run(args: argparse.Namespace) -> int:
    import sys

    from llama3.tokenizer import load_tokenizer
    from llama3.train.bpe import train_bpe
    from llama3.train.data import iter_documents

    train_bpe(iter_documents(args.data), args.vocab_size, args.out)
    tokenizer = load_tokenizer(args.out)
    print(f"{args.out}: {tokenizer.vocab_size} tokens; load it with llama3.load_tokenizer({str(args.out)!r})",
          file=sys.stderr)
    return 0
