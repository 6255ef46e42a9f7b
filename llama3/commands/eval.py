"""`llama3 eval`: score a model on lm-evaluation-harness tasks, no server to start yourself.

    llama3 eval evals/llama3_facts.yaml evals/llama3_capitals.yaml     # the repository's tiny tasks
    llama3 eval hellaswag --limit 100 --model path/to/model           # any lm-eval task (lm-eval fetches its data)
    llama3 eval evals/llama3_capitals.yaml --chat                      # through the chat template

It serves the model in-process and runs lm-eval's own `local-completions` backend against it
(`llama3.evaluation`), so the numbers are those of `lm_eval --model local-completions` pointed at
`llama3 serve`.
"""

from __future__ import annotations

import argparse
import json
import sys

from llama3.commands.common import add_model_arguments, add_speed_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Evaluate a model with lm-evaluation-harness: each TASK is an lm-eval task name or a "
                          "task YAML file (relative data_files are read next to it).")
    parser.add_argument("tasks", nargs="+", metavar="TASK_OR_FILE")
    add_model_arguments(parser)
    add_speed_arguments(parser)
    parser.add_argument("--chat", action="store_true",
                        help="send the prompts through the chat template (lm-eval's local-chat-completions; "
                             "generation tasks only)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per request (default 8)")
    parser.add_argument("--output", default=None, metavar="FILE.json", help="also write the results as JSON")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default cpu)")


def run(args: argparse.Namespace) -> int:
    from llama3.checkpoint.files import atomic_file
    from llama3.commands.serve import model_name
    from llama3.errors import Llama3Error
    from llama3.evaluation import evaluate, task_config
    from llama3.fast import load_fast
    from llama3.llm import parse_device

    if args.limit is not None and args.limit < 1:
        raise Llama3Error(f"--limit {args.limit}: give a positive number of items")
    tasks = [task_config(t) for t in args.tasks]  # a missing or broken task file fails before the model loads
    device = parse_device(args.device)
    name = model_name(args.model)
    print(f"loading {args.model or name}...", file=sys.stderr)
    llm = load_fast(args.model, dtype=args.dtype, quantize=args.quantize, fuse=not args.plain, device=device)
    results = evaluate(llm, name, tasks, chat=args.chat, limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size)
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        with atomic_file(args.output) as tmp:
            tmp.write_text(json.dumps({"results": results["results"], "config": results.get("config", {})},
                                      indent=2, default=str))
    return 0
