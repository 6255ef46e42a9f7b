"""Text from the command line, standard input and files, decoded strictly as UTF-8.

Bad bytes are one clear `error:` line naming where they came from (the argument, standard
input, a file and line) and the byte offset, never `TypeError: TextInputSequence must be str`
from the tokenizer.  `--errors replace` turns each bad byte into U+FFFD instead, for a user who
wants the rest of the text anyway.

Standard input is read with a bound (a prompt of 64 MiB is far beyond any context, and
`generate - < /dev/zero` must end), and a closed standard input (`<&-`, `sys.stdin is None`)
is an error that says to pass the text as an argument.
"""

from __future__ import annotations

import argparse
import sys

from llama3.errors import Llama3Error

MAX_STDIN_BYTES = 64 << 20
ERRORS = ("strict", "replace")


def add_errors_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--errors", choices=ERRORS, default="strict",
                        help="text that is not valid UTF-8: 'strict' refuses it with the byte offset (default); "
                             "'replace' turns each bad byte into U+FFFD and goes on")


def _bad_utf8(what: str, data: bytes, error: UnicodeDecodeError) -> Llama3Error:
    return Llama3Error(f"{what} is not valid UTF-8 (byte {error.start}: {data[error.start:error.start + 4]!r}); "
                       "pass UTF-8 text, or --errors replace to replace the bad bytes")


def decode(data: bytes, what: str, errors: str = "strict") -> str:
    """`data` as UTF-8; strict decoding raises Llama3Error naming `what` and the byte offset."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise _bad_utf8(what, data, e) from None


def argument_text(value: str, what: str, errors: str = "strict") -> str:
    """A command-line argument as text.  Python hands undecodable argv bytes over as lone surrogates
    (the 'surrogateescape' handler), which the tokenizers cannot take: refuse them (or replace them)."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return decode(value.encode("utf-8", "surrogateescape"), what, errors)


def stdin_text(errors: str = "strict", why: str = "the text", limit: int = MAX_STDIN_BYTES) -> str:
    """All of standard input (at most `limit` bytes) as text."""
    stream = sys.stdin
    if stream is None:
        raise Llama3Error(f"standard input is closed, so '-' cannot read {why}; pass it as an argument instead")
    raw = getattr(stream, "buffer", None)
    if raw is None:  # a text stream without bytes underneath (tests, embedding): already decoded
        text = stream.read(limit + 1)
        data = text.encode("utf-8", "surrogateescape")
    else:
        data = raw.read(limit + 1)
    if len(data) > limit:
        raise Llama3Error(f"standard input holds more than {limit >> 20} MiB, far more than any model's context; "
                          "give a shorter text (or a file through a tool that cuts it)")
    return decode(data, "standard input", errors)


def text_or_stdin(value: str, what: str, errors: str = "strict") -> str:
    """An argument that may be '-' (read standard input) or the text itself."""
    return stdin_text(errors, why=what) if value == "-" else argument_text(value, what, errors)
