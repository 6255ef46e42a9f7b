"""Tool calling: OpenAI's `tools` and `tool_choice` checked, the calls the model writes parsed
back into OpenAI's `tool_calls`, and (tool_choice "required" or a named function) a grammar that
makes the answer a valid call.

    tools = check_tools(request["tools"])                  # [{"type": "function", "function": {...}}]
    choice = check_choice(request.get("tool_choice"), tools)   # "auto" | "none" | "required" | a name
    check_messages(messages)                               # tool results answer an earlier call
    ids = tokenizer.encode_chat(messages, tools=tools)     # the chat format renders them (chat.py)
    style = call_style(tokenizer.chat_format)
    content, calls = parse_calls(answer_text, style, tools)

    plan = plan_tools(tokenizer, vocab_size, tools, tool_choice, messages=messages)  # all of the above
    plan.grammar, plan.message(answer_text)   # a forced call's grammar; {"role": "assistant", ...}

How a model writes a call depends on its chat format (`call_style`):

    "meta"     Llama 3.1 / 3.2 (Meta's header format, or a template that writes "parameters" or
               <|python_tag|>): one JSON object {"name": ..., "parameters": {...}} (Meta also writes
               "type": "function"), optionally after <|python_tag|>; a built-in tool as
               brave_search.call(query="..."); <|python_tag|> + code for code_interpreter
               (llama_models' ChatFormat.decode_assistant_message reads the same three forms).
    "hermes"   a template with a tools section that writes <tool_call> (Qwen2.5, Hermes, SmolLM3), and
               templates without a tools section (SmolLM2's), for which chat.py describes the tools in
               the system message in the same words as Qwen2.5's template: every call a block
               <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> (a JSON list of calls in one
               block is read too).

Text that is not a call stays the message's content; a call to a function that was not offered,
or a block that is not valid JSON, is content too (never a call the client cannot run).

An answer cut off by max_tokens (`cut`, finish_reason "length") in the middle of a call: the unfinished
call is dropped, neither a call nor content (never the raw <tool_call> text); the calls finished before
it are kept, and finish_reason stays "length" so the client knows (OpenAI and vLLM report "length" for
a cut call too).  A forced call's answer (tool_choice required / named) is only calls: no content at all.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from typing import TYPE_CHECKING

from llama3.errors import Llama3Error

if TYPE_CHECKING:  # structured.py (torch, xgrammar) is imported where a grammar is needed
    from llama3.structured import JsonGrammar

# Meta's built-in tools (llama_models.datatypes.BuiltinTool): offered as functions with these names.
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
PYTHON_TAG = "<|python_tag|>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 4  # a forced answer with parallel_tool_calls holds 1-4 calls (a small model repeats one forever)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")            # OpenAI's rule for function names
_BUILTIN_CALL = re.compile(r'^(?P<name>\w+)\.call\((?P<args>.*)\)$', re.S)
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.S)


class ToolError(Llama3Error):
    """A tools / tool_choice / message the server answers with 400 (param names the field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------ checking
def check_tools(tools) -> list[dict]:
    """OpenAI's `tools` -> the same list, each {"type": "function", "function": {"name", "description"?,
    "parameters"}} with parameters defaulting to an empty object schema.  Bad shapes, duplicate names and
    schemas the grammar engine cannot compile raise ToolError."""
    from llama3.structured import schema_problem

    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    checked, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"parameters\": {...}}}}", where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r:.40}",
                            f"{where}.function.name")
        if name in names:
            raise ToolError(f"two tools are named {name!r}; function names must be unique", f"{where}.function.name")
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
        problem = schema_problem(parameters)
        if problem:
            raise ToolError(f"{where}.function.parameters is not a JSON schema the grammar engine can use: {problem}",
                            f"{where}.function.parameters")
        checked.append({"type": "function", "function": {**function, "parameters": parameters}})
    return checked


def check_choice(tool_choice, tools: list[dict]) -> str:
    """tool_choice -> "auto", "none", "required", or the name of the one function to call."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not tools:
            raise ToolError("tool_choice \"required\" needs tools to choose from", "tool_choice")
        return tool_choice
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or tool_choice.get("type") != "function":
        raise ToolError("tool_choice must be \"auto\", \"none\", \"required\" or "
                        "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in tool_names(tools):
        offered = ", ".join(tool_names(tools)) or "none"
        raise ToolError(f"tool_choice names the function {name!r}, which is not in tools (offered: {offered})",
                        "tool_choice")
    return name


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def arguments_of(call: dict, where: str) -> dict:
    """A tool call's arguments as a dict (OpenAI sends a JSON string; templates expect a mapping)."""
    arguments = call.get("function", {}).get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise ToolError(f"{where}.function.arguments is not valid JSON", f"{where}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"{where}.function.arguments must be a JSON object", f"{where}.function.arguments")
    return arguments


def check_messages(messages: list[dict], results: bool = True) -> None:
    """Assistant tool_calls well formed; (results) every `tool` message answers a call made before it
    (its tool_call_id; the chat formats render results without ids too, as Meta's ipython messages)."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is not None:
            if message.get("role") != "assistant" or not isinstance(calls, list):
                raise ToolError(f"messages.{i}.tool_calls: only assistant messages carry a list of tool calls",
                                f"messages.{i}.tool_calls")
            for j, call in enumerate(calls):
                where = f"messages.{i}.tool_calls.{j}"
                if not isinstance(call, dict) or not isinstance(call.get("function"), dict) or \
                        not isinstance(call["function"].get("name"), str):
                    raise ToolError(f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": "
                                    "{\"name\": ..., \"arguments\": \"{...}\"}}", where)
                arguments_of(call, where)
                if isinstance(call.get("id"), str):
                    called.add(call["id"])
        if results and message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in called:
                raise ToolError(f"messages.{i} is a tool result for tool_call_id {call_id!r}, but no earlier "
                                "assistant message made a call with that id", f"messages.{i}.tool_call_id")


# ------------------------------------------------------------------ styles
def call_style(chat_format) -> str:
    """"meta" or "hermes": how a model with this chat format writes calls (see the module docstring)."""
    template = getattr(chat_format, "template", None)
    if template is None:
        return "meta"  # Meta's header format
    if CALL_OPEN in template:
        return "hermes"
    if "tools" in template and (PYTHON_TAG in template or '"parameters"' in template):
        return "meta"
    return "hermes"


def new_call(name: str, arguments: dict) -> dict:
    """One entry of OpenAI's tool_calls."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _json_call(obj, names: set[str]) -> dict | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return new_call(obj["name"], arguments) if isinstance(arguments, dict) else None


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _builtin_call(text: str, names: set[str]) -> dict | None:
    """brave_search.call(query="...") -> a call of the offered built-in tool (keyword arguments, literals)."""
    import ast

    match = _BUILTIN_CALL.match(text)
    if not match or match["name"] not in names:
        return None
    try:
        node = ast.parse(f"f({match['args']})", mode="eval").body
        if node.args:
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError):
        return None
    return new_call(match["name"], arguments)


def _without_open_call(text: str) -> str:
    """(hermes) The text before a last <tool_call> block that was never closed (the answer was cut in it)."""
    start = text.rfind(CALL_OPEN)
    if start < 0 or CALL_CLOSE in text[start:]:
        return text
    return text[:start].rstrip()


def parse_calls(text: str, style: str, tools: list[dict], *, cut: bool = False,
                forced: bool = False) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a generated answer; no calls -> (text, []).
    cut: the answer stopped at max_tokens, so a call it was still writing is dropped (see the module
    docstring); forced: a forced call's answer, whose cut leaves no content."""
    if cut:
        before = _without_open_call(text) if style == "hermes" else text
        content, calls = parse_calls(before, style, tools)
        if forced:  # the grammar wrote calls only: what is not a finished call was the cut one
            return None, calls
        return (content or None, calls) if before != text else (content, calls)
    names = set(tool_names(tools))
    if style == "meta":
        body = text.strip()
        tagged = body.startswith(PYTHON_TAG)
        body = body.removeprefix(PYTHON_TAG).strip()
        call = _json_call(_loads(body), names) or _builtin_call(body, names)
        if call is None and tagged and "code_interpreter" in names:
            call = new_call("code_interpreter", {"code": body})
        return (None, [call]) if call else (text, [])
    calls = []
    for block in _BLOCK.findall(text):
        parsed = _loads(block.strip())
        for item in parsed if isinstance(parsed, list) else [parsed]:
            call = _json_call(item, names)
            if call is None:
                return text, []  # not all blocks are calls: the client gets the text as it is
            calls.append(call)
    if not calls:
        return text, []
    content = _BLOCK.sub("", text).strip()
    return content or None, calls


class CallStream:
    """One streamed choice: `feed(piece)` -> the content that can be sent now (text that may still
    turn out to be a call is held back), `finish()` -> (the rest of the content, the calls)."""

    def __init__(self, style: str, tools: list[dict], parallel: bool = True, forced: bool = False):
        self.style, self.tools, self.parallel, self.forced = style, tools, parallel, forced
        self.text, self.sent = "", ""
        self.builtins = [n for n in tool_names(tools) if n in BUILTIN_TOOLS]

    def _may_be_call(self, text: str) -> bool:
        """(meta) a call is the whole message: hold it while its start could still be one."""
        head = text.lstrip()
        if not head:
            return True
        starts = [PYTHON_TAG, "{"] + [f"{n}.call(" for n in self.builtins]
        return any(head.startswith(s) or s.startswith(head) for s in starts)

    def _sendable(self) -> str:
        """The longest start of the text that is content whatever comes next (trailing whitespace
        is held too: a call may follow it, and then the content is stripped)."""
        if self.style == "meta":
            return "" if self._may_be_call(self.text) else self.text
        cut = self.text.find(CALL_OPEN)
        if cut < 0:  # hold a tail that could be the start of "<tool_call>"
            cut = next((len(self.text) - k for k in range(min(len(CALL_OPEN), len(self.text)), 0, -1)
                        if CALL_OPEN.startswith(self.text[-k:])), len(self.text))
        ready = self.text[:cut].rstrip()
        return ready if ready.strip() else ""

    def feed(self, piece: str) -> str:
        self.text += piece
        ready = self._sendable()
        if len(ready) <= len(self.sent) or not ready.startswith(self.sent):
            return ""
        new, self.sent = ready[len(self.sent):], ready
        return new

    def finish(self, cut: bool = False) -> tuple[str, list[dict]]:
        """cut: the answer stopped at max_tokens (finish_reason "length"; see parse_calls)."""
        content, calls = parse_calls(self.text, self.style, self.tools, cut=cut, forced=self.forced)
        calls, content = calls if self.parallel else calls[:1], content or ""
        rest = content[len(self.sent):] if content.startswith(self.sent) else ""
        return rest, calls


# ------------------------------------------------------------------ one request
@dataclass
class ToolPlan:
    """One request's tools: what is rendered and parsed, and a forced call's grammar."""

    tools: list[dict]              # as rendered and parsed (empty with tool_choice "none")
    choice: str                    # auto / none / required / a function's name
    style: str                     # call_style: "meta" or "hermes"
    grammar: "JsonGrammar | None"  # tool_choice required / named
    parallel: bool = True          # False: only the first call is kept

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")

    def parse(self, text: str, cut: bool = False) -> tuple[str | None, list[dict]]:
        """cut: the answer stopped at max_tokens (finish_reason "length"; see parse_calls)."""
        if not self.tools:
            return text, []
        content, calls = parse_calls(text, self.style, self.tools, cut=cut, forced=self.forced)
        return content, calls if self.parallel else calls[:1]

    def stream(self) -> CallStream:
        return CallStream(self.style, self.tools, self.parallel, self.forced)

    def message(self, text: str, cut: bool = False) -> dict:
        """The answer as OpenAI's assistant message (with tool_calls when it made calls)."""
        content, calls = self.parse(text, cut)
        return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}


def plan_tools(tokenizer, vocab_size: int, tools, tool_choice=None, parallel: bool = True,
               messages: list[dict] | None = None) -> ToolPlan:
    """Check tools, tool_choice and the messages' calls and results (ToolError), and make the grammar
    of a forced call.  tool_choice "none": nothing is rendered or parsed."""
    check_messages(messages or [])
    tools = check_tools(tools)
    choice = check_choice(tool_choice, tools)
    style = call_style(tokenizer.chat_format)
    if choice == "none":
        return ToolPlan([], choice, style, None)
    return ToolPlan(tools, choice, style, call_grammar(tokenizer, vocab_size, tools, choice, style, parallel),
                    parallel)


# ------------------------------------------------------------------ grammar
def call_schema(tools: list[dict], style: str) -> dict:
    """The JSON schema of one call of (one of) `tools`, as the style writes it."""
    key = "parameters" if style == "meta" else "arguments"
    shapes = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 key: t["function"]["parameters"]},
               "required": ["name", key], "additionalProperties": False} for t in tools]
    return shapes[0] if len(shapes) == 1 else {"anyOf": shapes}


def call_grammar(tokenizer, vocab_size: int, tools: list[dict], choice: str, style: str,
                 parallel: bool = True) -> "JsonGrammar | None":
    """tool_choice "required" or a function's name -> the grammar the answer must follow
    ("meta": one JSON call alone, Meta's format has one call per message; "hermes": the JSON inside
    <tool_call>\n ... \n</tool_call>, 1 to MAX_PARALLEL_CALLS such blocks on their own lines with
    `parallel`); otherwise None."""
    if choice in ("auto", "none"):
        return None
    from llama3.structured import SchemaError, compile_json

    chosen = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice]
    schema = call_schema(chosen, style)
    if not tokenizer.stop_ids:
        raise ToolError("a forced tool call needs a tokenizer with a stop token", "tool_choice")
    if style == "hermes" and CALL_OPEN in tokenizer.special_tokens:  # the grammar engine never allows those
        raise ToolError(f"this vocabulary has {CALL_OPEN} as a special token, which the grammar engine cannot "
                        "write; use tool_choice auto", "tool_choice")
    blocks = {}
    if style == "hermes":
        blocks = {"before": f"{CALL_OPEN}\n", "after": f"\n{CALL_CLOSE}",
                  "most": MAX_PARALLEL_CALLS if parallel and choice == "required" else 1}
    try:
        return compile_json(tokenizer, vocab_size, schema, **blocks)
    except SchemaError as error:
        raise ToolError(f"a forced call of these tools needs a grammar: {error}", "tools") from None
