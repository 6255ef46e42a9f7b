"""`llama3 params`: where a model's parameters are, and how much memory its weights need."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  llama3 params llama-3-8b          a named preset (see the list below)
  llama3 params llama-3.2-1b        tied embeddings: the output head adds nothing
  llama3 params path/to/hf-folder   a checkpoint: reads only its config where it can
  llama3 params hf:meta-llama/Llama-3.1-8B   a model on the Hugging Face Hub: fetches config.json alone
  llama3 params llama-3.1-70b --tp 8 --context 8192 --batch 4
                                    memory per rank when split over 8 processes (docs/parallel.md)
"""


def configure(parser: argparse.ArgumentParser) -> None:
    from llama3.config import PRESETS

    parser.description = (
        "Print the parameter breakdown of a model: token embedding, attention (wq wk wv wo), "
        "feed-forward (w1 w2 w3), norms and output head, computed from the configuration alone, "
        "and the memory the weights need at float32, bfloat16 and int8.")
    parser.epilog = EXAMPLES + "presets: " + ", ".join(PRESETS)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("source", metavar="PRESET|SOURCE",
                        help="a preset name, a built-in model name, a HF/Meta folder, a .gguf file, or "
                             "hf:ORG/NAME (of a Hugging Face Hub model folder, only config.json is fetched)")
    tp = parser.add_argument_group("tensor parallelism (--tp N: plan the memory of each of N ranks)")
    tp.add_argument("--tp", type=int, default=None, metavar="N",
                    help="also print each rank's weights and KV cache when split over N processes "
                         "(N must divide the key/value heads)")
    tp.add_argument("--context", type=int, default=None, metavar="T",
                    help="tokens of KV cache per sequence for --tp (default: the model's full context)")
    tp.add_argument("--batch", type=int, default=1, metavar="B", help="sequences at once for --tp (default 1)")


def run(args: argparse.Namespace) -> int:
    from llama3.config import PRESETS, get_preset
    from llama3.errors import Llama3Error
    from llama3.params import BYTES_PER_PARAM, count_params, human_bytes, kv_cache_bytes_per_token

    for flag, value in (("--tp", args.tp), ("--context", args.context), ("--batch", args.batch)):
        if value is not None and value < 1:
            raise Llama3Error(f"{flag} {value}: give a positive whole number")

    if args.source.lower() in PRESETS:
        config = get_preset(args.source)
    else:
        import os

        from llama3.checkpoint import read_config
        from llama3.llm import BUILTIN_MODELS, resolve_source

        hub = args.source.startswith("hf:")
        if not hub and not os.path.exists(args.source) and args.source.lower() not in BUILTIN_MODELS:
            raise Llama3Error(f"{args.source}: no such file or folder, and not a preset ({', '.join(PRESETS)}) "
                              f"or a built-in model ({', '.join(BUILTIN_MODELS)})")
        config = read_config(resolve_source(args.source, only="config"))
    if args.tp is not None:  # a bad N: say which are possible before printing anything
        from llama3.parallel.tp import check_tp

        check_tp(config, args.tp)
    counts = count_params(config)
    print(f"{args.source}: D={config.dim} layers={config.n_layers} heads={config.n_heads} "
          f"kv_heads={config.n_kv_heads} F={config.hidden_dim} V={config.vocab_size}"
          f"{' (tied output head)' if config.tie_embeddings else ''}")
    for name, n in counts.rows():
        share = f"{100 * n / counts.total:5.1f}%" if name != "total" else ""
        print(f"  {name:<13} {n:>17,}  {share}")
    weights = ", ".join(f"{human_bytes(counts.total * b)} {name}" for name, b in BYTES_PER_PARAM.items())
    print(f"weights: {weights}")
    print(f"KV cache: {human_bytes(kv_cache_bytes_per_token(config))} per token at bfloat16 "
          f"({human_bytes(kv_cache_bytes_per_token(config) * config.max_seq_len)} "
          f"for the full {config.max_seq_len:,}-token context)")
    if args.tp is not None:  # tensor parallelism: llama3/params.py's per-rank plan
        from llama3.params import tp_plan_lines

        print("\n".join(tp_plan_lines(config, args.tp, args.context or config.max_seq_len, args.batch)))
    return 0
