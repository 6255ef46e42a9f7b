"""`llama3 inspect patch | attribute | ablate`: the causal experiments of llama3.inspect, from the shell.

    llama3 inspect patch "The capital of France is" "The capital of Italy is" --out patch.png --json patch.json
    llama3 inspect attribute "The capital of France is" --target " Paris" --out attr.png
    llama3 inspect ablate "The capital of France is" --head 3.1 --block 5

Pictures are written with matplotlib (.png/.svg/.pdf), JSON atomically (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json

from llama3.commands.common import add_model_arguments
from llama3.errors import Llama3Error

NAMES = ("patch", "attribute", "ablate")


def _outputs(p: argparse.ArgumentParser, picture: str) -> None:
    p.add_argument("--out", default=None, help=f"draw the result to this picture file (e.g. {picture})")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON to FILE ('-': stdout)")
    add_model_arguments(p)


def configure(sub) -> None:
    """Add the three subcommands to `llama3 inspect`'s subparsers."""
    from llama3.inspect.patching import SITES

    p = sub.add_parser("patch", help="activation patching: which activations restore the clean answer",
                       description="Run a clean and a corrupted prompt of the same token length, then rerun the "
                                   "corrupted one with one activation copied from the clean run, at every "
                                   "(block, position), and report how much of the answer's logit difference "
                                   "(answer minus wrong) comes back: 1 = all of it, 0 = none. Sites: "
                                   + "; ".join(f"{k}: {v}" for k, v in SITES.items()) + ".")
    p.add_argument("clean", help="the clean prompt, e.g. 'The capital of France is'")
    p.add_argument("corrupted", help="the corrupted prompt with the same number of tokens, e.g. 'The capital of Italy is'")
    p.add_argument("--answer", default=None, help="the clean answer token, text of one token (' Paris') or #ID "
                                                   "(default: the clean run's top token)")
    p.add_argument("--wrong", default=None, help="the competing token (default: the corrupted run's top token)")
    p.add_argument("--site", default="resid", choices=list(SITES), help="what to patch (default resid)")
    _outputs(p, "patch.png")

    p = sub.add_parser("attribute", help="token attribution: integrated gradients or gradient x input",
                       description="How much each prompt token contributes to one next-token logit, by "
                                   "integrated gradients (the scores sum to the logit minus its value at a "
                                   "baseline) or gradient x input. Attention weights are not attribution: they "
                                   "say where a head looked, not what changed the answer.")
    p.add_argument("prompt")
    p.add_argument("--target", default=None, help="the token explained: text of one token or #ID "
                                                   "(default: the top next token)")
    p.add_argument("--method", default="integrated-gradients", choices=["integrated-gradients", "gradient-x-input"])
    p.add_argument("--steps", type=int, default=32, help="integration points (default 32)")
    p.add_argument("--baseline", default=None, help="integrated gradients' baseline: 'zero', a token's text or #ID "
                                                    "(default: the pad/end token at every position)")
    _outputs(p, "attribution.png")

    p = sub.add_parser("ablate", help="switch off heads or blocks and see the new top tokens",
                       description="Zero attention heads' outputs (before wo) or skip whole blocks (their "
                                   "output = their input) and compare the next-token candidates.")
    p.add_argument("prompt")
    p.add_argument("--head", action="append", default=[], metavar="LAYER.HEAD", help="a head to switch off (repeatable)")
    p.add_argument("--block", action="append", default=[], type=int, metavar="LAYER", help="a block to skip (repeatable)")
    p.add_argument("--top", type=int, default=5, help="candidates to list (default 5)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result as JSON to FILE ('-': stdout)")
    add_model_arguments(p)


def _head(text: str) -> tuple[int, int]:
    layer, dot, head = text.partition(".")
    try:
        return int(layer), int(head)
    except ValueError:
        raise Llama3Error(f"--head {text!r}: write LAYER.HEAD, e.g. 3.1 (layer 3, head 1)") from None


def write_json(data: dict, target: str) -> None:
    text = json.dumps(data, indent=1, ensure_ascii=False)
    if target == "-":
        print(text)
        return
    from pathlib import Path

    from llama3.checkpoint.files import atomic_file

    path = Path(target)
    if not path.parent.exists():
        raise Llama3Error(f"{path.parent}: no such folder; create it first")
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path}")


def run(args) -> int:
    import llama3

    llm = llama3.load(args.model, dtype=args.dtype)
    if args.view == "patch":
        from llama3.inspect.patching import patch, plot_patching

        result = patch(llm, args.clean, args.corrupted, answer=args.answer, wrong=args.wrong, site=args.site)
        print(f"logit[{result.answer[1]}] - logit[{result.wrong[1]}]: clean {result.clean_diff:.3f}, "
              f"corrupted {result.corrupted_diff:.3f}")
        best = result.restored.flatten().argmax()
        r, c = divmod(int(best), result.restored.shape[1])
        print(f"most restored: {result.rows[r]}, {result.columns[c]}: {result.restored[r, c]:.2f}")
        if args.out:
            print(f"wrote {plot_patching(result, args.out)}")
        data = result.to_dict()
    elif args.view == "attribute":
        from llama3.inspect.attribution import attribute, plot_attribution

        result = attribute(llm, args.prompt, target=args.target, method=args.method.replace("-", "_"),
                           steps=args.steps, baseline=args.baseline)
        print(f"contributions to logit[{result.target[1]}] = {result.output:.3f} ({args.method}):")
        for token, score in zip(result.tokens, result.scores.tolist()):
            print(f"  {token:<16} {score:+.4f}")
        if result.completeness_error is not None:
            print(f"sum {float(result.scores.sum()):.4f} vs f(x) - f(baseline) = "
                  f"{result.output - result.baseline_output:.4f} (error {result.completeness_error:.3g})")
        print("(attention is not attribution: these measure effect on the logit, not where heads looked)")
        if args.out:
            print(f"wrote {plot_attribution(result, args.out)}")
        data = result.to_dict()
    else:
        from llama3.inspect.patching import ablate

        result = ablate(llm, args.prompt, heads=[_head(h) for h in args.head], blocks=args.block, top_k=args.top)
        print(f"switched off: {', '.join(result.switched_off)}")
        print(f"{'before':<28}after")
        for b, a in zip(result.before, result.after):
            print(f"{b['token']:<16} {b['prob']:.3f}      {a['token']:<16} {a['prob']:.3f}")
        data = result.to_dict()
    if args.json:
        write_json(data, args.json)
    return 0
