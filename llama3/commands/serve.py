"""`llama3 serve`: an OpenAI-compatible HTTP API for any model the project loads.

    llama3 serve                                   # the default model on http://127.0.0.1:8000
    llama3 serve --model path/to/model --port 9000 --api-key secret

Then point any OpenAI client at it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="smollm2-135m-instruct",
                                   messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llama3.commands.common import add_listen_arguments, add_model_arguments, add_speed_arguments, check_port, listen
from llama3.parallel.launch import add_tp_argument


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Serve a model over HTTP with OpenAI's API, so existing clients and tools work unchanged:\n"
        "  GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions\n"
        "(streaming with \"stream\": true).  Requests run together: each step decodes every running\n"
        "one in one batch over a paged KV cache (--kv-memory), new ones join at the next step, a\n"
        "prompt prefix already seen is reused; a client that disconnects stops its generation.\n"
        "Ctrl-C (or SIGTERM) stops the server.")
    parser.epilog = (
        "example:\n"
        "  llama3 serve --api-key secret &\n"
        "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Authorization: Bearer secret' \\\n"
        "       -H 'Content-Type: application/json' \\\n"
        "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 20}'")
    add_model_arguments(parser)
    add_speed_arguments(parser)
    parser.add_argument("--name", default=None,
                        help="the model name clients must send in \"model\" (default: the folder or "
                             "file name of --model, or smollm2-135m-instruct)")
    add_listen_arguments(parser, port=8000)
    parser.add_argument("--lab", action="store_true",
                        help="also serve the Lab page at /lab (llama3 lab), with the same API key rule")
    add_limit_arguments(parser)
    add_tp_argument(parser)  # --tp N under torchrun: llama3/parallel/launch.py
    engine = parser.add_argument_group("engine (continuous batching)")
    engine.add_argument("--kv-memory", default=None, metavar="SIZE",
                        help="memory for the KV cache of all requests together: 2GB, 512MiB or 25%% of what "
                             "the process can take (RAM available, or the address space left under ulimit -v if "
                             "less; on CUDA the free device memory). Default: a quarter of that, at most 4 GiB on "
                             "the CPU; printed at start-up. More than that limit is refused")
    engine.add_argument("--parallel", type=int, default=None, metavar="N",
                        help="sequences decoded at once (default: what the KV budget holds at a quarter of "
                             "the context each, at most 16); more requests wait in the queue")
    engine.add_argument("--max-queued", type=int, default=256, metavar="N",
                        help="requests that may wait for a place; beyond it the server answers 429 (default 256)")
    engine.add_argument("--no-prefix-cache", action="store_true",
                        help="recompute every prompt instead of reusing the KV blocks of a prefix seen before")
    engine.add_argument("--stream-interval", type=_milliseconds, default=20, metavar="MS",
                        help="a stream's tokens are sent together at most every MS milliseconds (the first at "
                             "once): each send wakes the server's event loop, which on a small machine slows "
                             "the decoding threads; 0 sends every token as it comes (default 20)")


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds from 0 to 1000")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """What one request may ask for, and who may send requests (llama3/server_limits.py)."""
    from llama3.server_limits import ServerLimits

    d = ServerLimits()
    group = parser.add_argument_group("limits")
    group.add_argument("--max-body-bytes", type=_positive, default=d.max_body_bytes,
                       help=f"largest request body; larger ones get 413 (default {d.max_body_bytes})")
    group.add_argument("--max-tokens-cap", type=_positive, default=d.max_tokens_cap,
                       help=f"largest max_tokens a request may ask for; more is a 400 (default "
                            f"{d.max_tokens_cap}); chat's default is {d.default_chat_max_tokens} or this cap")
    group.add_argument("--max-prompts", type=_positive, default=d.max_prompts,
                       help=f"prompts in one /v1/completions request (default {d.max_prompts})")
    group.add_argument("--max-prompt-chars", type=_positive, default=None,
                       help="longest prompt in characters, checked before tokenizing "
                            "(default 32 per token of the model's context)")
    group.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web page origin (e.g. http://localhost:3000, or *) allowed to call the "
                            "server from a browser; repeatable (default: none)")
    group.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                       help="without --api-key, a Host name to serve besides 127.0.0.1, localhost, [::1] "
                            "and --host (e.g. the machine's name behind --host 0.0.0.0); repeatable")


def server_limits(args: argparse.Namespace):
    from llama3.server_limits import ServerLimits

    return ServerLimits(max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
                        max_prompts=args.max_prompts, max_prompt_chars=args.max_prompt_chars,
                        allowed_hosts=(args.host, *args.allow_host), cors_origins=tuple(args.cors_origin))


def model_name(source: str | None) -> str:
    """The name a model is served under: the built-in name, or the file/folder name without .gguf."""
    from llama3.llm import DEFAULT_MODEL

    if source is None:
        return DEFAULT_MODEL
    path = Path(source)
    return path.stem if path.suffix.lower() == ".gguf" else (path.name or str(source))


def run(args: argparse.Namespace) -> int:
    import signal
    import time

    from llama3.extras import require

    require("serve", "llama3 serve")  # fastapi and uvicorn come with llama3[serve]
    import uvicorn

    from llama3.fast import load_fast
    from llama3.server import Server, create_app

    check_port(args.port)
    from llama3.llm import parse_device

    device = parse_device(args.device)  # a bad --device is a one-line error before binding or loading
    import torch

    from llama3.engine import Engine, EngineConfig
    from llama3.engine.memory import parse_memory
    from llama3.server_queue import GenerationQueue

    engine_config = EngineConfig(kv_memory=args.kv_memory, parallel=args.parallel, max_queued=args.max_queued,
                                 prefix_cache=not args.no_prefix_cache,
                                 stream_interval=args.stream_interval / 1000)  # bad values: an error before loading
    parse_memory(args.kv_memory, device or torch.device("cpu"))
    sock = listen(args.host, args.port) if args.tp is None or os.environ.get("RANK", "0") == "0" else None  # rank 0's
    name = args.name or model_name(args.model)
    print(f"loading {args.model or name}...", file=sys.stderr)
    start = time.perf_counter()
    # llama3.load, then llama3.fast's inference speed-ups unless --plain (same tokens up to float rounding)
    if args.tp is not None:  # tensor parallel: only rank 0 returns (and serves); the other ranks follow its engine
        from llama3.parallel.launch import lead_engine

        llm = lead_engine(args, engine_config)
        engine = llm.engine
    else:
        llm = load_fast(args.model, dtype=args.dtype, quantize=args.quantize, fuse=not args.plain, device=device)
        engine = Engine(llm.model, llm.tokenizer, engine_config)
        engine.warm_up()  # the one-sequence decoding step recorded in the background, before the first request
    print(f"loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print(engine.describe(), file=sys.stderr)
    app = create_app(llm, name, api_key=args.api_key, limits=server_limits(args), queue=GenerationQueue(engine))
    if args.lab:  # the page's views hook the served (fast) model's modules, on their own thread
        from llama3.lab import mount_lab

        mount_lab(app, llm, source=args.model, name=name)
        print(f"the lab is on http://{args.host}:{args.port}/lab", file=sys.stderr)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}; Ctrl-C stops", file=sys.stderr)
    # uvicorn stops gracefully on Ctrl-C or SIGTERM, then raises the signal again; let both
    # arrive as KeyboardInterrupt so either ends the command quietly with status 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    print("server stopped", file=sys.stderr)
    return 0
