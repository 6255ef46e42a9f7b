"""`llama3 train`: pretrain a (tiny) Llama 3 from scratch; the output folder is a model folder."""

from __future__ import annotations

import argparse

EXAMPLES = """\
what happens:
  1. data: --data is raw text (a .txt/.md file, a .jsonl file with a "text" field per line, or a folder
     of them), a folder made by `llama3 prepare`, or nothing: the built-in corpus (the King James Bible,
     public domain, ~1M tokens). Raw text is tokenized into OUT/data/, with --tokenizer or else a
     byte-level BPE of --vocab-size tokens learned from the same text.
  2. model: the --preset shape (default tiny-cpu: 6 layers, width 192, ~3M parameters), random init.
  3. training: AdamW (decay on matrices only), linear warmup then cosine decay, gradient accumulation
     and clipping; validation loss every --eval-interval steps; OUT/metrics.jsonl and OUT/loss.png;
     checkpoints in OUT/checkpoints/ every --checkpoint-interval steps (--resume continues exactly,
     and refuses settings that would change the run unless --allow-changes).
  4. OUT becomes a model folder: `llama3 generate --model OUT "..."` works on it.

examples:
  llama3 train --out kjv                         # the default: ~10 minutes on 2 CPU cores
  llama3 train --out kjv --resume                # continue after an interruption, same losses
  llama3 train --out kjv --overwrite             # start over in a folder that holds an earlier run
  llama3 train --data my_texts/ --out m --steps 5000 --vocab-size 8192
  llama3 train --config run.toml --out m         # settings from a file (flags win)
  torchrun --nproc-per-node 2 -m llama3 train --out m --strategy ddp    # several processes

global batch = batch-size x grad-accum x processes windows of seq-len tokens per step.
"""

FIELDS = ["data", "tokenizer", "vocab_size", "preset", "steps", "batch_size", "grad_accum", "seq_len", "lr",
          "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "seed", "eval_interval",
          "eval_batches", "log_interval", "checkpoint_interval", "keep_checkpoints", "val_fraction",
          "sample_prompt", "device", "amp_dtype", "compile", "strategy", "peak_flops", "resume",
          "allow_changes", "overwrite", "progress"]


def configure(parser: argparse.ArgumentParser) -> None:
    from llama3.train.config import add_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the folder to write: the trained model, checkpoints, metrics")
    parser.add_argument("--config", metavar="FILE", help="a .json or .toml file of settings (same names as the "
                                                         "flags, with underscores); flags given here win")
    add_arguments(parser, FIELDS)


def run(args: argparse.Namespace) -> int:
    import os

    from llama3.train import pretrain
    from llama3.train.config import config_from_args
    from llama3.train.trainer import describe

    cfg = config_from_args(args, FIELDS, out=args.out)
    result = pretrain(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        print(f"done: {describe(result)}; model folder {args.out}")
    return 0
