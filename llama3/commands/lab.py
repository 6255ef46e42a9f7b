"""`llama3 lab`: the Lab, a local web page that shows the loaded model working (llama3/lab).

    llama3 lab                                # the embedded model on http://127.0.0.1:8001/lab
    llama3 lab --model path/to/model --port 9000 --api-key secret

The readable model (llama3/model.py) runs as written, with no fast paths, so every view sees
the code the page quotes.  The OpenAI API of `llama3 serve` is served beside it at /v1.
"""

from __future__ import annotations

import argparse
import sys

from llama3.commands.common import add_listen_arguments, add_model_arguments, check_port, listen


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Open a local web page on the loaded model: chat or complete text, click a generated token to see "
        "its candidates, its attention per head and layer, the logit lens and the residual stream; walk one "
        "forward pass step by step with the code and the walkthrough's text (English/中文); run activation "
        "patching, attribution and ablation; compare the logits with transformers. Views are computed on "
        "request. Ctrl-C stops it.")
    add_model_arguments(parser)
    add_listen_arguments(parser, port=8001)
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")


def run(args: argparse.Namespace) -> int:
    import signal

    from llama3.extras import require

    require("serve", "llama3 lab")  # the lab is served by the same HTTP stack: llama3[serve]
    import uvicorn

    import llama3
    from llama3.commands.serve import model_name
    from llama3.lab import mount_lab
    from llama3.llm import parse_device
    from llama3.server import Server, create_app

    check_port(args.port)
    device = parse_device(args.device)
    sock = listen(args.host, args.port)  # before loading: a busy port is a one-line error at once
    name = model_name(args.model)
    print(f"loading {args.model or name}...", file=sys.stderr)
    llm = llama3.load(args.model, dtype=args.dtype, device=device)
    app = mount_lab(create_app(llm, name, api_key=args.api_key), llm, source=args.model, name=name)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/lab"
    print(f"the lab is on {url}{' (API key required)' if args.api_key else ''}; Ctrl-C stops", file=sys.stderr)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    print("lab stopped", file=sys.stderr)
    return 0
