"""`llama3 inspect`: look inside a model with real tensors.

    llama3 inspect trace "The capital of France is" --layer 3
    llama3 inspect attention "The capital of France is" --layer -1 --out attention.png
    llama3 inspect logit-lens "The capital of France is" --out lens.png
    llama3 inspect rope --out rope.png
    llama3 inspect walkthrough --out docs/
    llama3 inspect patch | attribute | ablate ...   (causal experiments: commands/experiments.py)
"""

from __future__ import annotations

import argparse

from llama3.commands.common import add_model_arguments

DEFAULT_PROMPT = "The capital of France is"


def _prompt_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT,
                   help=f"the text to run through the model (default: {DEFAULT_PROMPT!r}); "
                        "special tokens such as <|im_start|> are kept as text, not interpreted")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Look inside the model while it reads a prompt. Everything is observed through forward hooks "
        "on one ordinary forward pass, so normal runs pay nothing.")
    sub = parser.add_subparsers(dest="view", metavar="VIEW", required=True)

    p = sub.add_parser("trace", help="follow the prompt through every step, with shapes and statistics",
                       description="Text -> tokens -> ids -> embedding -> blocks -> final norm -> logits -> next "
                                   "token. Each step shows its tensor's shape with named dimensions (B batch, T "
                                   "tokens, S keys, D width, H heads, Hkv key/value heads, Dh head width, F "
                                   "feed-forward width, V vocabulary) and mean/std/min/max. Blocks are one line "
                                   "each; --layer N redoes block N operation by operation (norm, q/k/v, heads, "
                                   "RoPE, KV repetition, scores, mask, softmax, values, wo, residual, SwiGLU) and "
                                   "checks the result against the model's own.")
    _prompt_arg(p)
    p.add_argument("--layer", type=int, default=None, help="show block N in full detail (-1: the last)")
    p.add_argument("--top", type=int, default=5, help="how many next-token candidates to list (default 5)")
    p.add_argument("--json", action="store_true", help="print the trace as JSON for programs")
    add_model_arguments(p)

    p = sub.add_parser("attention", help="heatmaps of attention weights with token labels",
                       description="Draw who attends to whom in one layer: row i is the query token, column j "
                                   "the key token, the colour how much of token j flows into token i. Rows sum "
                                   "to 1; the blank triangle is the causal mask. Without --head, a grid of every "
                                   "head; heads sharing a key/value head (grouped-query attention) say so.")
    _prompt_arg(p)
    p.add_argument("--layer", type=int, default=-1, help="which block (default -1: the last)")
    p.add_argument("--head", type=int, default=None, help="one head only (default: all heads in a grid)")
    p.add_argument("--out", default="attention.png", help="picture file to write (.png/.svg/.pdf)")
    add_model_arguments(p)

    p = sub.add_parser("logit-lens", help="the top next token read after every layer",
                       description="Apply the final norm and output head to the residual stream after the "
                                   "embedding and after every block, as if the model stopped there. The table "
                                   "shows the top token at each layer and position; the picture colours it by "
                                   "probability. The last row is the model's real prediction.")
    _prompt_arg(p)
    p.add_argument("--out", default=None, help="also draw the heatmap to this picture file")
    p.add_argument("--positions", type=int, default=8, help="table columns: the last N positions (default 8)")
    add_model_arguments(p)

    p = sub.add_parser("rope", help="RoPE frequencies and wavelengths with and without Llama 3.1 scaling",
                       description="How fast each channel pair of a query/key turns with position, and how "
                                   "Llama 3.1 (factor 8) and Llama 3.2 1B/3B (factor 32) scaling slow the slow "
                                   "pairs down to reach 128K tokens. Uses a preset's shape (default "
                                   "llama-3.1-8b), or --model's.")
    p.add_argument("--preset", default="llama-3.1-8b", help="config preset to draw (default llama-3.1-8b)")
    p.add_argument("--model", metavar="SOURCE", default=None,
                   help="use this checkpoint's config instead (a folder, .gguf file, or hf:ORG/NAME: of a Hub "
                        "model folder, config.json alone is fetched)")
    p.add_argument("--out", default=None, help="also draw the curves to this picture file")

    p = sub.add_parser("walkthrough", help="regenerate docs/walkthrough.md, walkthrough.zh.md and their pictures",
                       description="Run the default model on a prompt, trace it, and write the English and "
                                   "Chinese walkthroughs with live numbers and pictures.")
    p.add_argument("--out", default="docs", help="folder to write into (default docs/)")
    add_model_arguments(p)

    from llama3.commands import experiments

    experiments.configure(sub)


def _load(args):
    import llama3

    return llama3.load(args.model, dtype=args.dtype)


def run(args) -> int:
    from llama3.commands import experiments

    if args.view == "walkthrough" or (args.view != "trace" and getattr(args, "out", None)):
        from llama3.extras import require

        require("plot", f"llama3 inspect {args.view} --out")  # matplotlib comes with llama3[plot]
    if args.view in experiments.NAMES:
        return experiments.run(args)
    if args.view == "trace":
        import json

        from llama3.inspect.trace import trace

        result = trace(_load(args), args.prompt, layer=args.layer, top_k=args.top)
        print(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) if args.json else result.render())
    elif args.view == "attention":
        from llama3.inspect.attention import attention_maps, describe_attention, plot_attention

        maps = attention_maps(_load(args), args.prompt, layer=args.layer)
        print(describe_attention(maps, args.head))
        print(f"wrote {plot_attention(maps, args.out, head=args.head)}")
    elif args.view == "logit-lens":
        from llama3.inspect.logit_lens import logit_lens, plot_logit_lens, render_table

        lens = logit_lens(_load(args), args.prompt)
        print(render_table(lens, max_positions=args.positions))
        if args.out:
            print(f"wrote {plot_logit_lens(lens, args.out)}")
    elif args.view == "rope":
        from llama3.config import get_preset
        from llama3.inspect.rope import plot_rope, render_rope

        if args.model:
            from llama3.checkpoint import read_config
            from llama3.llm import resolve_source

            path = resolve_source(args.model, only="config")  # of a hf: folder, config.json alone
            config, name = read_config(path), args.model  # the config only, no weights
        else:
            config, name = get_preset(args.preset), args.preset
        print(render_rope(config))
        if args.out:
            print(f"wrote {plot_rope(config, args.out, title=f'RoPE of {name}')}")
    elif args.view == "walkthrough":
        from llama3.inspect.walkthrough import write_walkthrough

        for path in write_walkthrough(args.out, model=args.model, dtype=args.dtype):
            print(f"wrote {path}")
    return 0
