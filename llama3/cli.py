"""The `llama3` command: a thin layer that parses arguments and calls library functions.

Each subcommand lives in `llama3/commands/<name>.py` with two functions:
    configure(parser)  add its arguments to an argparse parser
    run(args) -> int   do the work, return the exit status
Only the chosen subcommand's module is imported, so `llama3 --help` is instant
and no subcommand pays for another's imports.

Errors the user can fix (`Llama3Error`) print one line `error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llama3.errors import Llama3Error

# name -> (module, one-line help).  Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("llama3.commands.generate", "continue a prompt, streaming the new text"),
    "chat": ("llama3.commands.chat", "talk to a chat model in the terminal"),
    "serve": ("llama3.commands.serve", "serve an OpenAI-compatible HTTP API"),
    "tokenize": ("llama3.commands.tokenize", "show how text becomes token ids"),
    "params": ("llama3.commands.params", "parameter breakdown of a preset or checkpoint"),
    "inspect": ("llama3.commands.inspect", "look inside: trace, attention maps, logit lens, rope, patching, attribution"),
    "lab": ("llama3.commands.lab", "a local web page that shows the model working, with experiments"),
    "doctor": ("llama3.commands.doctor", "identify a checkpoint and check it against a reference"),
    "prepare": ("llama3.commands.prepare", "tokenize text into training shards"),
    "train-tokenizer": ("llama3.commands.train_tokenizer", "train a small byte-level BPE vocabulary"),
    "train": ("llama3.commands.train", "pretrain a (tiny) Llama 3 from scratch"),
    "sft": ("llama3.commands.sft", "supervised fine-tuning on chat data, full or LoRA"),
    "perplexity": ("llama3.commands.perplexity", "sliding-window perplexity of a text"),
    "eval": ("llama3.commands.eval", "score a model on lm-evaluation-harness tasks"),
    "bench": ("llama3.commands.bench", "measure load time, prefill and decode speed here"),
    "convert": ("llama3.commands.convert", "convert a checkpoint between HF, Meta and GGUF formats"),
    "download": ("llama3.commands.download", "fetch a model from the Hugging Face Hub into its cache"),
}


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama3",
        description="Llama 3 from scratch: run, chat, serve, train and look inside Llama 3 models. "
                    "Without --model, commands use the embedded SmolLM2-135M-Instruct; --model takes a model "
                    "folder, a .gguf file or hf:ORG/NAME from the Hugging Face Hub (llama3 download).",
        epilog="Run 'llama3 COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen = chosen if chosen in COMMANDS else None
    parser = build_parser(chosen)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except Llama3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `llama3 generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
