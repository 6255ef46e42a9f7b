"""Arguments that several subcommands share, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse
import os

DTYPE_CHOICES = ["float32", "bfloat16", "float16"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model SOURCE and --dtype, for every command that runs a model."""
    parser.add_argument("--model", metavar="SOURCE", default=None,
                        help="a Hugging Face folder, a Meta folder (consolidated.*.pth + params.json), a .gguf "
                             "file, hf:ORG/NAME or hf:ORG/NAME/FILE.gguf (fetched from the Hugging Face Hub into "
                             "its cache: see `llama3 download --help`), or a built-in name (default: the embedded "
                             "smollm2-135m-instruct)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                        help="weights' dtype in memory (default float32; bfloat16 halves memory and the bytes "
                             "each decoded token reads; `llama3 bench` shows what it gains on this CPU)")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize and --plain, for commands that generate (llama3.fast is on unless --plain)."""
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="weight-only quantization for faster decoding at a small accuracy cost "
                             "(`llama3 perplexity --quantize` measures it). int8: a scale per 32 weights (GGUF's Q8_0), "
                             "about a quarter of the float32 bytes. int4: a scale and offset per 32 weights (CPU only); the "
                             "embedded model's own Q4_1 weights run as they are. From a .gguf, Q8_0 and Q4_0/Q4_1 "
                             "blocks are read directly")
    parser.add_argument("--plain", action="store_true",
                        help="run the readable model exactly as written: no fused projections, no lean "
                             "decoding step, no C decoding step, no packed weights (slower; the same tokens up "
                             "to float rounding). LLAMA3_NATIVE=0 turns off only the C step, which is compiled "
                             "with the machine's C compiler on first use and cached in ~/.cache/llama3 (or $LLAMA3_CACHE)")



def add_listen_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """--host, --port, --api-key and --device, for the commands that serve HTTP (serve, lab)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 exposes the server to your network, so set --api-key)")
    parser.add_argument("--port", type=int, default=port, help=f"TCP port (default {port})")
    parser.add_argument("--api-key", default=os.environ.get("LLAMA3_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 requests (and the Lab's) "
                             "(default: $LLAMA3_API_KEY; unset = no key needed)")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default cpu)")


def check_port(port: int) -> None:
    from llama3.errors import Llama3Error

    if not 0 < port < 65536:
        raise Llama3Error(f"--port {port} is not a TCP port; use 1..65535")


def listen(host: str, port: int):
    """Bind host:port now, so a bad or busy port is a one-line error before the model loads -> the socket."""
    import socket

    from llama3.errors import Llama3Error

    check_port(port)
    try:
        return socket.create_server((host, port))
    except OSError as e:
        reason = (e.strerror or str(e)).split(" (while attempting")[0]
        raise Llama3Error(f"cannot listen on {host}:{port} ({reason}); check --host, or pick "
                          "another --port (or stop the program using this one)") from None
