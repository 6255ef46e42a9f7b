"""Chat formats: how a list of messages becomes one prompt.

Two kinds:

* `Llama3HeaderFormat`, Meta's own format for Llama 3 instruct models, encoded
  exactly as Meta's `ChatFormat.encode_dialog_prompt` does (llama-models):

      <|begin_of_text|>
      <|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
      <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
      <|start_header_id|>assistant<|end_header_id|>\\n\\n            <- generation prompt

  (no line breaks between the parts).  Roles: system, user, assistant, ipython
  ("tool" is written as ipython).  An assistant message that called a tool and
  waits for its result ends in <|eom_id|> instead of <|eot_id|>: mark it with
  `"stop_reason": "end_of_message"` (Meta's name).

* `JinjaChatFormat`, a Jinja2 chat template from tokenizer_config.json or GGUF
  metadata, rendered the way transformers' `apply_chat_template` renders it
  (sandboxed environment, trim_blocks + lstrip_blocks, `raise_exception`,
  `strftime_now`, a `tojson` that does not escape HTML).

In both, text inside a message that looks like a control token ("<|im_end|>",
"<|eot_id|>") is encoded as plain text: a user cannot end a turn or forge a system
message by typing one.  For ordinary messages the ids equal transformers'
`apply_chat_template(..., tokenize=True)`; for such injection attempts they equal
its `sanitize_control_tokens=True` mode.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

from llama3.tokenizer.base import TokenizerError

# Roles a message may have.  Llama 3's header format writes "tool" as "ipython".
ROLES = ("system", "user", "assistant", "tool", "ipython", "developer")
LLAMA3_ROLES = ("system", "user", "assistant", "tool", "ipython")

# ChatML, the format of SmolLM2, Qwen and many others; the documented default for a
# vocabulary that has <|im_start|>/<|im_end|> but no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta's header format as a Jinja template (for files that can only carry a template, like GGUF).
# Unlike Llama 3 Instruct's published template it does not trim message contents, matching Meta's code.
LLAMA3_HEADER_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def message_text(content) -> str:
    """A message's content as text: a str, or OpenAI content parts [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise TokenizerError(f"message content must be a string or a list of text parts, got {content!r:.80}")


def validate_messages(messages, roles=ROLES) -> list[dict]:
    """Check an OpenAI-style message list; return it with None-valued keys dropped (as transformers does)
    and each content given as text parts joined into one string (other parts raise TokenizerError)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in roles:
            raise TokenizerError(f"message {i} has unknown role {m['role']!r}; use one of {', '.join(roles)}")
        if "content" not in m and not m.get("tool_calls"):
            raise TokenizerError(f"message {i} ({m['role']}) has no 'content'")
        cleaned = {k: v for k, v in m.items() if v is not None}
        if "content" in cleaned:  # content parts -> one string, as templates expect
            try:
                cleaned["content"] = message_text(cleaned["content"])
            except TokenizerError as e:
                raise TokenizerError(f"message {i}: {e}") from None
        clean.append(cleaned)
    return clean


# ------------------------------------------------------------------ Llama 3
class Llama3HeaderFormat:
    """Meta's Llama 3 dialog format (see the module docstring)."""

    def _token(self, tokenizer, name: str) -> int:
        if name not in tokenizer.special_tokens:
            raise TokenizerError(f"this vocabulary has no {name} token, so it cannot use the Llama 3 chat format")
        return tokenizer.special_tokens[name]

    @staticmethod
    def _role(role: str) -> str:
        return "ipython" if role == "tool" else role

    @staticmethod
    def _end(message: dict) -> str:
        eom = message["role"] == "assistant" and message.get("stop_reason") == "end_of_message"
        return "<|eom_id|>" if eom else "<|eot_id|>"

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        parts = ["<|begin_of_text|>"]
        for m in validate_messages(messages, LLAMA3_ROLES):
            parts.append(f"<|start_header_id|>{self._role(m['role'])}<|end_header_id|>\n\n"
                         f"{message_text(m.get('content'))}{self._end(m)}")
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
        """As Meta encodes: each piece on its own, contents as plain text (never special tokens)."""
        def header(role: str) -> list[int]:
            return [self._token(tokenizer, "<|start_header_id|>"), *tokenizer.encode(role, bos=False),
                    self._token(tokenizer, "<|end_header_id|>"), *tokenizer.encode("\n\n", bos=False)]

        ids = [self._token(tokenizer, "<|begin_of_text|>")]
        for m in validate_messages(messages, LLAMA3_ROLES):
            ids += header(self._role(m["role"]))
            ids += tokenizer.encode(message_text(m.get("content")), bos=False)
            ids.append(self._token(tokenizer, self._end(m)))
        if add_generation_prompt:
            ids += header("assistant")
        return ids


# -------------------------------------------------------------------- Jinja
# Private-use characters that bracket control-token text found in user strings,
# so that after rendering we know which "<|im_end|>" came from the user.
_MARK_START, _MARK_END = "\U000F0000", "\U000F0001"


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A Jinja2 chat template compiled in transformers' environment (chat_template_utils.py),
    with a time and size limit on rendering (template_sandbox.py)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols

    from llama3.tokenizer.template_sandbox import LimitedSandbox

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        rendering just outputs the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not parse (line {e.lineno}: {e.message}); "
                             "fix chat_template in tokenizer_config.json") from None


class JinjaChatFormat:
    """A Jinja2 chat template.  `variables`: bos_token, eos_token, ... as strings."""

    def __init__(self, template: str, variables: dict[str, str] | None = None):
        if not isinstance(template, str) or not template.strip():
            raise TokenizerError("chat_template must be a non-empty Jinja2 string")
        self.template = template
        self.variables = {k: v for k, v in (variables or {}).items() if v is not None}
        compile_template(template)  # fail early on a broken template

    def _render(self, messages, add_generation_prompt: bool) -> str:
        import jinja2

        from llama3.tokenizer.template_sandbox import render

        try:
            return render(compile_template(self.template), dict(
                messages=messages, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.variables))
        except TokenizerError:  # a time or size limit
            raise
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template rejected these messages: {e}") from None
        except Exception as e:  # `str + list`, a RecursionError, ... inside the template: its fault
            raise TokenizerError(f"the chat template failed on these messages ({type(e).__name__}: {str(e)[:200]}); "
                                 "check the messages' fields, or fix the template") from None

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        return self._render(validate_messages(messages), add_generation_prompt)

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
        """Render with control-token text in the messages marked, then encode: the template's
        own special tokens as special tokens, the marked user text as plain text."""
        control = sorted(tokenizer.special_tokens, key=len, reverse=True)
        control_re = re.compile("|".join(map(re.escape, control)) or "(?!)")

        def mark(obj):
            if isinstance(obj, str):
                obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
                return control_re.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, obj)
            if isinstance(obj, dict):
                return {k: mark(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [mark(v) for v in obj]
            return obj

        text = self._render(mark(validate_messages(messages)), add_generation_prompt)
        # split -> [template text, marked token, template text, marked token, ..., template text]
        pieces = re.split(f"{_MARK_START}({control_re.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]", text)
        ids = tokenizer.encode(pieces[0], bos=False, allow_special=True)
        newline = tokenizer.encode("\n", bos=False)
        for i, piece in enumerate(pieces[1:], start=1):
            if piece:
                ids += _encode_continuation(tokenizer, piece, allow_special=(i % 2 == 0), newline=newline)
        return ids


def _encode_continuation(tokenizer, piece: str, allow_special: bool, newline: list[int]) -> list[int]:
    """Encode text that continues a longer text.  SentencePiece-style vocabularies add a space
    before the first word of an input; encoding "\\n" + piece and dropping the newline's ids
    avoids that (transformers does the same)."""
    ids = tokenizer.encode("\n" + piece, bos=False, allow_special=allow_special)
    if ids[:len(newline)] == newline:
        return ids[len(newline):]
    return tokenizer.encode(piece, bos=False, allow_special=allow_special)


def default_chat_format(special_tokens: dict[str, int], template: str | None, variables: dict[str, str]):
    """The chat format a tokenizer uses: its own template if it has one; otherwise ChatML when the
    vocabulary has <|im_start|>/<|im_end|>, Meta's header format when it has Llama 3's header
    tokens, and None (encode_chat then raises) when it has neither."""
    if template:
        return JinjaChatFormat(template, variables)
    if "<|im_start|>" in special_tokens and "<|im_end|>" in special_tokens:
        return JinjaChatFormat(CHATML_TEMPLATE, variables)
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"} <= set(special_tokens):
        return Llama3HeaderFormat()
    return None
