"""Chat templates are code from a model file: render them with a time and a size limit.

A GGUF file or tokenizer_config.json carries its chat template as Jinja2 source, and
rendering runs it.  jinja2's `ImmutableSandboxedEnvironment` (what transformers uses, and
our base) stops a template from reaching Python internals or mutating its inputs, but it
has no limit on time or memory.  With the sandbox alone (Python 3.11, jinja2 3.1):

    {% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}
        1e10 loop steps at 0.1 s per million (measured): ~17 minutes of a frozen thread,
        and a template can nest deeper
    {{ 'x' * 10000000000 }}      a 10 GB string: a MemoryError traceback (issue 14), or the
                                 OOM killer on a machine with that much memory to overcommit
    {{ 'x'|center(10**10) }}     the same through a filter, even at load time: jinja2 folds
                                 constant filter calls when it compiles a template

`LimitedSandbox` adds the missing limits without changing what a normal template renders
(the text stays byte-identical to transformers' `apply_chat_template`):

* time: a watchdog timer raises an exception in the rendering thread once the deadline
  has passed (CPython's PyThreadState_SetAsyncExc; it is delivered at the next bytecode, so
  a loop that makes no calls stops too, and a filter it calls runs to its end, bounded by
  the size limits).  A thread cannot be killed, and a process per render costs more than
  the render.  A first version traced every line (sys.settrace) and was 4x slower; measured
  on a 41-message chat through Llama 3.1's template (a busy 2-core machine): 0.26 ms in the
  bare sandbox, 0.75 ms with the size checks below, 0.77 ms with the watchdog too;
* size: every operation that can make a value much bigger than its inputs is checked
  before it runs (`*`, `**`, `%` formatting, `~` and `+` results, str methods and filters
  that take a width or a count, joins, replaces), and so is the total output; a value over
  `max_chars` characters is refused instead of allocated.

Limits come from the context (`render_limits(...)`), so the server can use its own
without threading them through every tokenizer: `with render_limits(seconds=2): ...`.
A limit hit raises `TemplateLimitError` (a `TokenizerError`: one line, exit 2 / HTTP 400).
"""

from __future__ import annotations

import ctypes
import json
import re
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import wraps

from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama3.tokenizer.base import TokenizerError


class TemplateLimitError(TokenizerError):
    """A chat template ran too long or built too big a value."""


@dataclass(frozen=True)
class RenderLimits:
    seconds: float = 5.0          # wall time of one render
    max_chars: int = 4_000_000    # the largest string/list a template may build, and its whole output


_LIMITS: ContextVar[RenderLimits] = ContextVar("llama3_render_limits", default=RenderLimits())
_INT_BITS = 1 << 16  # integers a template may build: ~20,000 decimal digits


@contextmanager
def render_limits(seconds: float | None = None, max_chars: int | None = None):
    """Use these limits for chat templates rendered inside the `with` block (this thread/task)."""
    current = _LIMITS.get()
    token = _LIMITS.set(replace(current, seconds=current.seconds if seconds is None else seconds,
                                max_chars=current.max_chars if max_chars is None else max_chars))
    try:
        yield
    finally:
        _LIMITS.reset(token)


def _too_big(what: str) -> TemplateLimitError:
    return TemplateLimitError(f"the chat template tried to build {what}, over its limit of "
                              f"{_LIMITS.get().max_chars:,} characters; the template in the model file is "
                              "broken or hostile (or the messages are too long)")


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_size(value):
    if _size(value) > _LIMITS.get().max_chars:
        raise _too_big(f"a value of {_size(value):,} items")
    if isinstance(value, int) and value.bit_length() > _INT_BITS:
        raise _too_big(f"an integer of {value.bit_length():,} bits")
    return value


def _check_count(n, what: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and n > _LIMITS.get().max_chars:
        raise _too_big(f"{what} of {n:,}")


_FORMAT_NUMBER = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d+))?|\{[^{}]*?(\d+)[^{}]*\}")


def _check_format_string(fmt: str) -> None:
    """Widths and precisions in a '%' or '{}' format string, e.g. '%99999999s', '{:>99999999}'."""
    for match in _FORMAT_NUMBER.finditer(fmt):
        for digits in match.groups():
            if digits:
                _check_count(int(digits[:12]), "a format width")


def _check_join(sep, items) -> list:
    items = list(items)
    total = sum(_size(item) or 8 for item in items) + _size(sep) * max(len(items) - 1, 0)
    _check_count(total, "a joined string")
    return items


def _check_replace(text, old, new, count=-1) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        hits = (len(text) + 1) if not old else len(text) // len(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        _check_count(len(text) + hits * len(new), "a replaced string")


def _check_call(func, args: tuple, kwargs: dict) -> tuple:
    """Before a method or global is called: widths, counts and sizes of the result.  Returns
    the arguments to call with (an iterator given to str.join is read once, here)."""
    for value in (*args, *kwargs.values()):
        _check_count(value, "a width or count")
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "")
    if isinstance(owner, str):
        if name == "join" and args:
            return (_check_join(owner, args[0]), *args[1:])
        elif name == "replace" and len(args) >= 2:
            _check_replace(owner, *args[:3])
        elif name == "expandtabs":
            _check_count(len(owner) * (args[0] if args else kwargs.get("tabsize", 8)), "an expanded string")
    elif name == "generate_lorem_ipsum":  # jinja2's lipsum(n=5, html=True, min=20, max=100)
        n, longest = (args[0] if args else kwargs.get("n", 5)), (args[3] if len(args) > 3 else kwargs.get("max", 100))
        if isinstance(n, int) and isinstance(longest, int):
            _check_count(n * max(longest, 1) * 12, "a lorem ipsum text")
    return args


def _check_filter(name: str, args: tuple, kwargs: dict) -> tuple:
    """Before a filter runs (args[0] is the filtered value, after any context/environment)."""
    for value in (*args[1:], *kwargs.values()):
        _check_count(value, "a width or count")
    value, rest = (args[0] if args else None), args[1:]
    if name == "join" and not kwargs.get("attribute") and len(rest) <= 1:
        items = _check_join(rest[0] if rest else kwargs.get("d", ""), value)
        return (items, *rest)
    if name == "replace" and len(rest) >= 2:
        _check_replace(str(value), *rest[:3])
    if name == "format" and isinstance(value, str):
        _check_format_string(value)
    if name == "tojson":
        _check_json_indent(value, rest[1] if len(rest) > 1 else kwargs.get("indent"))
    if name == "indent" and isinstance(value, str):
        width = rest[0] if rest else kwargs.get("width", 4)
        _check_count((value.count("\n") + 1) * (len(width) if isinstance(width, str) else width), "an indent")
    return args


def _check_json_indent(value, indent) -> None:
    """`x|tojson(indent=N)`: N spaces per nesting level on every line.  The size at indent 1
    and its leading spaces give the size at any indent exactly."""
    if indent is None or not isinstance(indent, (int, str)) or isinstance(indent, bool):
        return
    width = len(indent) if isinstance(indent, str) else indent
    if width > 1:
        try:
            text = json.dumps(value, indent=1, ensure_ascii=False)
        except (TypeError, ValueError):
            return  # the filter itself will fail on it
        spaces = sum(len(line) - len(line.lstrip(" ")) for line in text.split("\n"))
        _check_count(len(text) + (width - 1) * spaces, "an indented JSON text")


def _limited_filter(name: str, func):
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # the context/environment

    @wraps(func)
    def filter_(*args, **kwargs):
        args = (*args[:skip], *_check_filter(name, args[skip:], kwargs))
        return _check_size(func(*args, **kwargs))
    return filter_


class _LimitedFilters(dict):
    """env.filters that checks every filter, including ones added later (transformers' tojson)."""

    def __setitem__(self, name, func):
        super().__setitem__(name, _limited_filter(name, func))


class _LimitedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b ~ c` to a call that checks the joined size (jinja2 calls str_join directly)."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.limited_concat(")
        super().visit_Concat(node, frame)
        self.write(")")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox plus the size checks above (the time limit is in `render`)."""

    # Intercepted operators are also never folded at compile time (jinja2 nodes.BinExpr.as_const).
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _LimitedCodeGenerator

    def __init__(self, **options):
        super().__init__(**options)
        filters, self.filters = self.filters, _LimitedFilters()
        for name, func in filters.items():
            self.filters[name] = func

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    _check_count(_size(seq) * n, "a repeated value")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > _INT_BITS:
                raise _too_big("an integer product")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right > 0 and left.bit_length() * right > _INT_BITS:
                raise _too_big(f"an integer power {left}**{right}")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left)
            for value in (right if isinstance(right, tuple) else (right,)):
                _check_count(value, "a format width")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        args = _check_call(__obj, args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        if isinstance(getattr(value, "__self__", None), str):
            _check_format_string(value.__self__)
        return super().wrap_str_format(value)

    @staticmethod
    def limited_concat(joined):
        return _check_size(joined)


class _Deadline(BaseException):
    """Raised in the rendering thread past the deadline; a BaseException, so no
    `except Exception` in jinja2 swallows it."""


class _Watchdog:
    """One render's deadline.  Past it, a timer thread raises `_Deadline` in the rendering
    thread (CPython's PyThreadState_SetAsyncExc: delivered at the next bytecode, so a pure
    loop stops too), again every 0.1 s until the render ends in case something in between
    (a `__del__`) swallowed it.  `stop()` ends it and withdraws an exception not yet delivered."""

    def __init__(self):
        self.thread_id, self.lock = threading.get_ident(), threading.Lock()
        self.done = self.fired = False
        self.timer: threading.Timer | None = None

    def start(self, seconds: float) -> None:  # inside the try whose finally calls stop()
        with self.lock:
            self._arm(seconds)

    def _arm(self, seconds: float) -> None:
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _raise(self, exception) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), exception)

    def _fire(self) -> None:
        with self.lock:
            if not self.done:
                self.fired = True
                self._raise(ctypes.py_object(_Deadline))
                self._arm(0.1)

    def stop(self) -> None:
        while True:
            try:
                with self.lock:
                    self.done = True
                    if self.timer is not None:
                        self.timer.cancel()
                    if self.fired:
                        self._raise(None)  # one set but not delivered yet
                return
            except _Deadline:  # delivered just now: it is withdrawn by the retry
                continue


def render(template, variables: dict) -> str:
    """`template.render(**variables)` within the current `render_limits`."""
    limits = _LIMITS.get()
    watchdog = _Watchdog()
    try:
        try:
            watchdog.start(limits.seconds)
            pieces, total = [], 0
            for piece in template.generate(**variables):
                total += len(piece)
                if total > limits.max_chars:
                    raise _too_big(f"an output of over {total:,} characters")
                pieces.append(piece)
            return "".join(pieces)
        finally:
            watchdog.stop()
    except _Deadline:
        raise TemplateLimitError(f"the chat template ran for more than {limits.seconds:g} s and was stopped; "
                                 "the template in the model file is broken or hostile") from None
