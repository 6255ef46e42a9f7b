"""Limits that keep the server alive, and the checks that keep web pages from driving it.

One request must not be able to freeze the server or take all its memory, and a web page
the user happens to visit must not be able to use a server listening on 127.0.0.1.

    install(app, limits, api_key)   ASGI middleware, outermost first:
      RequestGuard    without --api-key: the Host header must name this server (a DNS-
                      rebinding page sends its own name) and a browser Origin must be allowed
                      by --cors-origin (403 otherwise)
      CORSMiddleware  Starlette's: CORS headers and preflight answers for --cors-origin
      BodyGuard       without --api-key: POSTs must be Content-Type application/json (415;
                      a page can send text/plain cross-origin without asking); any request:
                      the body is counted while it is read and refused past --max-body-bytes
                      (413) before the app sees it, so a 20 MB body is never held or parsed
    parse_json(raw, limits)          invalid JSON, a lone surrogate, deep nesting, a huge or
                                     non-finite number -> 400 `json_invalid` (never a 500)
    limits.check_*                   max_tokens cap, prompts per request, prompt characters
                                     (before tokenizing)
    await off_loop(fn, ...)          parsing, chat templates and tokenizing on a small thread
                                     pool, inside the chat template's time/size limits

Every refusal is `LimitError`, answered in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

MB = 1 << 20
_pool: ThreadPoolExecutor | None = None


class LimitError(Exception):
    """A request refused by a limit: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for.  `llama3 serve` sets these from its flags."""

    max_body_bytes: int = 4 * MB            # --max-body-bytes
    max_tokens_cap: int = 4096              # --max-tokens-cap: a larger max_tokens is a 400
    default_chat_max_tokens: int = 1024     # chat's max_tokens when none is sent (at most the cap)
    max_prompts: int = 16                   # --max-prompts: prompts in one /v1/completions request
    max_prompt_chars: int | None = None     # --max-prompt-chars; None: 32 per token of the context
    max_json_depth: int = 64                # nesting of the request body
    max_number_digits: int = 100            # digits of one JSON number
    template_seconds: float = 5.0           # one chat-template render
    allowed_hosts: tuple[str, ...] = ()     # --allow-host: Host names besides loopback and the address
    cors_origins: tuple[str, ...] = ()      # --cors-origin: browser origins allowed ("*": any)

    def prompt_chars(self, context: int) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * context

    def max_new_tokens(self, requested: int | None, chat: bool, context: int) -> int:
        """The request's max_tokens (400 above the cap); chat's default when it sent none."""
        if requested is None:
            return min(self.default_chat_max_tokens, self.max_tokens_cap, context) if chat else 16
        if requested > self.max_tokens_cap:
            raise LimitError(400, f"max_tokens is {requested} but this server allows at most "
                             f"{self.max_tokens_cap} (llama3 serve --max-tokens-cap); ask for fewer",
                             param="max_tokens", code="invalid_value")
        return requested

    def check_prompts(self, texts: list, context: int, *, param: str, one_prompt: bool) -> None:
        """Before tokenizing: the number of prompts, and their length in characters
        (chat: all messages together are one prompt)."""
        if not one_prompt and len(texts) > self.max_prompts:
            raise LimitError(400, f"{len(texts)} prompts in one request; this server takes at most "
                             f"{self.max_prompts} (llama3 serve --max-prompts); send several requests",
                             param=param, code="invalid_value")
        limit = self.prompt_chars(context)
        lengths = [len(t) if isinstance(t, str) else 0 for t in texts]  # token-id prompts: fit_prompt counts them
        sizes = [sum(lengths)] if one_prompt else lengths
        if max(sizes, default=0) > limit:
            raise LimitError(400, f"the prompt is {max(sizes):,} characters; this server takes at most {limit:,} "
                             "(llama3 serve --max-prompt-chars) before tokenizing; shorten it",
                             param=param, code="context_length_exceeded")


# ------------------------------------------------------------------ JSON bodies
def _refuse(message: str) -> LimitError:
    return LimitError(400, f"the request body is not valid JSON ({message})", code="json_invalid")


def parse_json(raw: bytes, limits: ServerLimits) -> Any:
    """The body as JSON, or a 400 for anything Python's json would accept but we must not
    hand on: NaN/Infinity, numbers too long or too big for a float, lone surrogates
    (they cannot be encoded as UTF-8, so a tokenizer would fail on them), deep nesting."""
    def number(text: str, parse: Callable):
        if len(text.lstrip("-")) > limits.max_number_digits:
            raise _refuse(f"a number of {len(text)} digits; at most {limits.max_number_digits}")
        value = parse(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise _refuse(f"{text[:20]} does not fit a 64-bit float")
        return value

    def constant(name: str):
        raise _refuse(f"{name} is not a JSON value")

    try:
        body = json.loads(raw, parse_int=lambda s: number(s, int), parse_float=lambda s: number(s, float),
                          parse_constant=constant)
    except RecursionError:
        raise _refuse(f"nested deeper than {limits.max_json_depth} levels") from None
    except UnicodeDecodeError:
        raise _refuse("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise _refuse(str(e)) from None
    _check_tree(body, limits.max_json_depth)
    return body


def _check_tree(body: Any, max_depth: int) -> None:
    """Depth and strings of a parsed body, without recursion."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise _refuse("a string holds a lone UTF-16 surrogate such as \\ud800; send valid "
                                  "Unicode text") from None
            continue
        if isinstance(value, (dict, list)):
            if depth > max_depth:
                raise _refuse(f"nested deeper than {max_depth} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


# ------------------------------------------------------------- off the event loop
async def off_loop(fn: Callable, *args, limits: ServerLimits | None = None, max_chars: int | None = None):
    """`fn(*args)` on the server's small thread pool, inside the chat-template limits, so the
    event loop (and /health) keeps answering while a big request is parsed or tokenized."""
    from llama3.tokenizer.template_sandbox import render_limits

    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llama3-prepare")
    seconds = limits.template_seconds if limits is not None else None

    def run():
        with render_limits(seconds=seconds, max_chars=max_chars):
            return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_pool, run)


# ------------------------------------------------------------------ middleware
def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


class RequestGuard:
    """Without an API key: refuse a Host that is not this server and a browser Origin not allowed."""

    LOOPBACK = ("127.0.0.1", "localhost", "[::1]")

    def __init__(self, app, limits: ServerLimits, api_key: str | None):
        self.app, self.limits, self.open = app, limits, api_key is None
        self.origins = {o.rstrip("/").lower() for o in limits.cors_origins}

    def _allowed_hosts(self, scope) -> set[str]:
        """Host is name:port for the server's port (just the name on port 80), the name one of
        loopback, the address this connection reached, or an --allow-host name (which may
        carry its own port)."""
        address, port = (scope.get("server") or ("127.0.0.1", 80))[:2]
        allowed = set()
        for name in (*self.LOOPBACK, str(address), *self.limits.allowed_hosts):
            name = name.lower()
            if name in ("0.0.0.0", "::", "[::]"):
                continue
            if name.count(":") > 1 and not name.startswith("["):
                name = f"[{name}]"  # a bare IPv6 address
            if ":" in name.rsplit("]", 1)[-1]:  # it names its port
                allowed.add(name)
                continue
            allowed.add(f"{name}:{port}")
            if port == 80:
                allowed.add(name)
        return allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.open:
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        host, origin = headers.get("host", ""), headers.get("origin")
        error, hosts = None, self._allowed_hosts(scope)
        same_origin = origin is not None and origin.lower().removeprefix("http://") in hosts  # e.g. /docs
        if host.lower() not in hosts:
            error = LimitError(403, f"Host {host!r} is not this server's address; without --api-key only "
                               "requests to 127.0.0.1, localhost or the --host/--allow-host names are served",
                               code="host_not_allowed")
        elif origin is not None and not same_origin and "*" not in self.origins and \
                origin.rstrip("/").lower() not in self.origins:
            error = LimitError(403, f"requests from the web page {origin!r} are refused; allow it with "
                               "llama3 serve --cors-origin ORIGIN (or set --api-key)", code="origin_not_allowed")
        if error is not None:
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class BodyGuard:
    """The body read in full before the app runs, refused past `max_body_bytes` (413) as it
    arrives; without an API key, a POST must say Content-Type: application/json (415)."""

    def __init__(self, app, limits: ServerLimits, api_key: str | None):
        self.app, self.limit, self.open = app, limits.max_body_bytes, api_key is None

    def _too_large(self, size: str) -> LimitError:
        return LimitError(413, f"the request body is {size} bytes; this server takes at most {self.limit:,} "
                          "(llama3 serve --max-body-bytes)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        if self.open and scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                error = LimitError(415, f"Content-Type {kind or 'missing'!r}: send the body as JSON with the "
                                   "header 'Content-Type: application/json'", code="unsupported_media_type")
                return await error.response()(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(f"{int(declared):,}").response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(f"over {self.limit:,}").response()(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the disconnect, when it comes

        await self.app(scope, replay, send)


def install(app, limits: ServerLimits, api_key: str | None) -> None:
    """Add the guards to a FastAPI/Starlette app and answer LimitError in OpenAI's shape."""
    app.add_middleware(BodyGuard, limits=limits, api_key=api_key)
    if limits.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(limits.cors_origins), max_age=600,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestGuard, limits=limits, api_key=api_key)

    async def limit_error(request, error: LimitError):
        return error.response()
    app.add_exception_handler(LimitError, limit_error)
