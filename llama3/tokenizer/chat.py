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

Tools (OpenAI's `tools`, an assistant's `tool_calls`, `tool` results; `encode(..., tools=...)`):
Meta's format renders them as Meta's prompt format and ChatFormat do (`meta_tool_messages`,
`<|python_tag|>` before code_interpreter calls, <|eom_id|> after calls); a template with a tools
section gets them as transformers passes them; a template without one gets them described in the
system message and calls/results written as text (`describe_tools`, `calls_as_text`).  Parsing
what the model writes back is llama3/tools.py.

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
    def _calls(message: dict) -> list[str]:
        """An assistant message's tool calls as Meta writes them (llama_models ToolUtils.encode_tool_call,
        JSON format): built-in tools as brave_search.call(query="..."), code_interpreter as its code,
        other functions as {"type": "function", "name": ..., "parameters": {...}}."""
        from llama3.tools import BUILTIN_TOOLS, arguments_of

        texts = []
        for j, call in enumerate(message.get("tool_calls") or []):
            name, arguments = call["function"]["name"], arguments_of(call, f"tool_calls.{j}")
            if name in BUILTIN_TOOLS and name != "code_interpreter":
                texts.append(f'{name}.call(query="{arguments.get("query", "")}")')
            elif name == "code_interpreter":
                texts.append(str(arguments.get("code", "")))
            else:
                texts.append(json.dumps({"type": "function", "name": name, "parameters": arguments}))
        return texts

    @staticmethod
    def _python_tag(message: dict) -> bool:
        calls = message.get("tool_calls") or []
        return bool(calls) and calls[0]["function"]["name"] == "code_interpreter"

    def _end(self, message: dict) -> str:
        """<|eom_id|> after a message that waits for a tool's result: "stop_reason": "end_of_message"
        (Meta's name), and by default after tool calls (what the model writes in Environment: ipython)."""
        reason = message.get("stop_reason", "end_of_message" if message.get("tool_calls") else None)
        return "<|eom_id|>" if message["role"] == "assistant" and reason == "end_of_message" else "<|eot_id|>"

    def _messages(self, messages, tools) -> list[dict]:
        from llama3.tools import check_messages

        messages = validate_messages(messages, LLAMA3_ROLES)
        check_messages(messages, results=False)
        return meta_tool_messages(messages, tools) if tools else messages

    def render(self, messages, add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        parts = ["<|begin_of_text|>"]
        for m in self._messages(messages, tools):
            parts.append(f"<|start_header_id|>{self._role(m['role'])}<|end_header_id|>\n\n"
                         f"{'<|python_tag|>' if self._python_tag(m) else ''}{message_text(m.get('content'))}"
                         f"{''.join(self._calls(m))}{self._end(m)}")
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        """As Meta encodes (ChatFormat.encode_message): each piece on its own, contents as plain text
        (never special tokens); a code_interpreter call after <|python_tag|>, each tool call encoded alone."""
        def header(role: str) -> list[int]:
            return [self._token(tokenizer, "<|start_header_id|>"), *tokenizer.encode(role, bos=False),
                    self._token(tokenizer, "<|end_header_id|>"), *tokenizer.encode("\n\n", bos=False)]

        ids = [self._token(tokenizer, "<|begin_of_text|>")]
        for m in self._messages(messages, tools):
            ids += header(self._role(m["role"]))
            if self._python_tag(m):
                ids.append(self._token(tokenizer, "<|python_tag|>"))
            ids += tokenizer.encode(message_text(m.get("content")), bos=False)
            for call in self._calls(m):
                ids += tokenizer.encode(call, bos=False)
            ids.append(self._token(tokenizer, self._end(m)))
        if add_generation_prompt:
            ids += header("assistant")
        return ids


def _today() -> str:
    return datetime.now().strftime("%d %B %Y")


def meta_tool_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation with Meta's tool prompts added (llama_models' Llama 3.1 prompt format,
    prompt_format.md): a system message "Environment: ipython" (plus "Tools: brave_search, ..." for
    built-in tools), the date lines and the caller's system text; then, for other functions, a user
    message listing them as JSON ("JSON based tool calling"), before the first user message."""
    from llama3.tools import BUILTIN_TOOLS

    builtin = [t["function"]["name"] for t in tools if t["function"]["name"] in BUILTIN_TOOLS]
    custom = [t for t in tools if t["function"]["name"] not in builtin]
    shown = [name for name in builtin if name != "code_interpreter"]
    system = "Environment: ipython\n" + (f"Tools: {', '.join(shown)}\n" if shown else "\n")
    system += f"Cutting Knowledge Date: December 2023\nToday Date: {_today()}\n"
    rest = list(messages)
    text = message_text(rest.pop(0).get("content")) if rest and rest[0]["role"] == "system" else ""
    system += f"\n{text}\n" if text else ""
    added = [{"role": "system", "content": system}]
    if custom:
        added.append({"role": "user", "content": (
            "Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n"
            + "".join(json.dumps(t, indent=4) + "\n" for t in custom)
            + "\nReturn function calls in JSON format.")})
    return added + rest


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

    def _prepared(self, messages, tools) -> tuple[list[dict], list[dict] | None]:
        """(messages, tools) as this template takes them.  A template that renders tool_calls gets
        their arguments as mappings (transformers' convention; OpenAI sends JSON strings); one that
        does not gets calls and results written as text (`calls_as_text`); one without a tools
        section gets the tools described in the system message (`describe_tools`)."""
        from llama3.tools import check_messages

        messages = validate_messages(messages)
        if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            return messages, None
        check_messages(messages, results=False)
        if "tool_calls" in self.template:
            messages = [_arguments_as_dicts(m) for m in messages]
        else:
            messages = calls_as_text(messages)
        if tools and "tools" not in self.template:
            return describe_tools(messages, tools), None
        return messages, tools or None

    def _render(self, messages, add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        import jinja2

        from llama3.tokenizer.template_sandbox import render

        try:
            return render(compile_template(self.template), dict(
                messages=messages, tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, **self.variables))
        except TokenizerError:  # a time or size limit
            raise
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template rejected these messages: {e}") from None
        except Exception as e:  # `str + list`, a RecursionError, ... inside the template: its fault
            raise TokenizerError(f"the chat template failed on these messages ({type(e).__name__}: {str(e)[:200]}); "
                                 "check the messages' fields, or fix the template") from None

    def render(self, messages, add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        messages, tools = self._prepared(messages, tools)
        return self._render(messages, add_generation_prompt, tools)

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
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

        messages, tools = self._prepared(messages, tools)
        text = self._render(mark(messages), add_generation_prompt, mark(tools))
        # split -> [template text, marked token, template text, marked token, ..., template text]
        pieces = re.split(f"{_MARK_START}({control_re.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]", text)
        ids = tokenizer.encode(pieces[0], bos=False, allow_special=True)
        newline = tokenizer.encode("\n", bos=False)
        for i, piece in enumerate(pieces[1:], start=1):
            if piece:
                ids += _encode_continuation(tokenizer, piece, allow_special=(i % 2 == 0), newline=newline)
        return ids


def _arguments_as_dicts(message: dict) -> dict:
    from llama3.tools import arguments_of

    if not message.get("tool_calls"):
        return message
    calls = [{**call, "function": {**call["function"], "arguments": arguments_of(call, f"tool_calls.{j}")}}
             for j, call in enumerate(message["tool_calls"])]
    return {**message, "tool_calls": calls}


def calls_as_text(messages: list[dict]) -> list[dict]:
    """For a template that knows no tool calls: an assistant's calls appended to its content as
    <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> blocks, and tool results (consecutive
    ones together) as a user message of <tool_response>\n...\n</tool_response> blocks, as Qwen2.5's
    template writes them."""
    from llama3.tools import arguments_of

    out: list[dict] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": arguments_of(c, "tool_calls")}
                     for c in m["tool_calls"]]
            blocks = [f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls]
            content = message_text(m.get("content"))
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            out.append({**m, "content": "\n".join(([content] if content else []) + blocks)})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{message_text(m.get('content'))}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]


def describe_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a template without a tools section: the tools described at the end of the system message
    (a new one if there is none) in the words of Qwen2.5's template, asking for <tool_call> blocks."""
    text = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
            + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    if messages and messages[0]["role"] == "system":
        first = message_text(messages[0].get("content"))
        return [{**messages[0], "content": f"{first}\n\n{text}" if first else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


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
