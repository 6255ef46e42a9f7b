"""`llama3 sft`: supervised fine-tuning on chat data, full or LoRA."""

from __future__ import annotations

import argparse
import re

EXAMPLES = """\
data: one conversation per line,
  {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
Each is rendered with the model's chat template; the loss counts only the assistant's tokens
(with the token that ends the turn).  Short conversations are packed into rows of --seq-len tokens
without attending across conversations (--no-pack: one per row).

output:
  full fine-tuning        DIR is a model folder (llama3 generate/chat --model DIR)
  --lora-rank R           DIR holds only the adapters (adapter_model.safetensors, adapter_config.json);
                          add --merge to also write the merged model folder into DIR

examples:
  llama3 sft --data chats.jsonl --out tuned --steps 200                   # the default model, full
  llama3 sft --model kjv --data chats.jsonl --out kjv-chat --lora-rank 8 --merge
  llama3 chat --model kjv-chat
"""

FIELDS = ["model", "data", "steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr", "warmup_steps",
          "weight_decay", "grad_clip", "seed", "eval_interval", "eval_batches", "log_interval",
          "checkpoint_interval", "keep_checkpoints", "val_fraction", "lora_rank", "lora_alpha", "lora_dropout",
          "lora_targets", "pack", "device", "amp_dtype", "compile", "strategy", "peak_flops", "resume",
          "allow_changes", "overwrite", "progress"]
SFT_DEFAULTS = dict(lr=1e-4, min_lr=1e-5, warmup_steps=10, batch_size=4, seq_len=512, eval_interval=50,
                    checkpoint_interval=100, log_interval=1, weight_decay=0.0, sample_prompt=None)


def configure(parser: argparse.ArgumentParser) -> None:
    from llama3.train.config import add_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--config", metavar="FILE", help="a .json or .toml file of settings; flags win")
    parser.add_argument("--epochs", type=float, default=1.0, metavar="X",
                        help="passes over the data, used when --steps is not given (default 1)")
    parser.add_argument("--merge", action="store_true", help="with LoRA: also write the merged model folder")
    add_arguments(parser, FIELDS)
    parser.set_defaults(model=None)
    for action in parser._actions:  # --help shows sft's own defaults, not train's
        if action.dest == "steps":   # not train's 700: it follows --epochs
            action.help = "optimizer steps (default: one pass over the data, see --epochs)"
        elif SFT_DEFAULTS.get(action.dest) is not None and action.help:
            action.help = re.sub(r"\(default: [^)]*\)", f"(default: {SFT_DEFAULTS[action.dest]})", action.help)
    parser.epilog += ("\nsft defaults that differ from train: "
                      + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SFT_DEFAULTS.items() if v is not None)
                      + "; LoRA default --lr 1e-3")


def run(args: argparse.Namespace) -> int:
    import os

    from llama3.llm import DEFAULT_MODEL
    from llama3.train.config import config_from_args, read_config_file
    from llama3.train.sft import finetune
    from llama3.train.trainer import describe

    defaults = dict(SFT_DEFAULTS, model=DEFAULT_MODEL)
    if args.lora_rank:
        defaults.update(lr=1e-3, min_lr=1e-4)
    cfg = config_from_args(args, FIELDS, defaults=defaults, out=args.out)
    steps_given = args.steps is not None or bool(args.config and "steps" in read_config_file(args.config))
    # without --steps, finetune counts the rows it builds and runs --epochs passes over them
    result = finetune(cfg, merge=args.merge, epochs=None if steps_given else args.epochs)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        print(f"done: {describe(result, val=False)}; wrote {args.out}")
    return 0
