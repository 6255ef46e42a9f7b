"""`tools`, `tool_choice` and `parallel_tool_calls` on /v1/chat/completions (parsing and grammar: llama3.tools).

    plan = tool_plan(llm, req, messages)        # 400 for bad tools, an unknown named function,
                                                # a tool result without its call; None: no tools
    ids = tokenizer.encode_chat(messages, True, tools=plan.tools if plan else None)
    plan.grammar                                # tool_choice required / named: the call's grammar
    plan.parse(text) -> (content, tool_calls)   # a whole answer
    plan.stream()    -> tools.CallStream        # one streamed choice

tool_choice "none": the tools are not shown to the model and nothing is parsed.  A forced call
(required / named) and a JSON response_format cannot both hold, so that pair is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama3.server_api.fields import RequestError
from llama3.tools import (CallGrammar, CallStream, ToolError, call_grammar, call_style, check_choice, check_messages,
                          check_tools, parse_calls)


@dataclass
class ToolPlan:
    tools: list[dict]              # as rendered and parsed (empty with tool_choice "none")
    choice: str                    # auto / none / required / a function's name
    style: str                     # llama3.tools.call_style: "meta" or "hermes"
    grammar: CallGrammar | None    # the forced call's grammar

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        return parse_calls(text, self.style, self.tools) if self.tools else (text, [])

    def stream(self) -> CallStream:
        return CallStream(self.style, self.tools)


def tool_plan(llm, req, messages: list[dict]) -> ToolPlan | None:
    """The request's tools, checked; None when it neither offers tools nor carries tool messages."""
    try:
        check_messages(messages)
        tools = check_tools(req.tools)
        if not tools and req.tool_choice in (None, "none", "auto"):
            return None
        choice = check_choice(req.tool_choice, tools)
        style = call_style(llm.tokenizer.chat_format)
        if choice == "none":
            return ToolPlan([], choice, style, None)
        grammar = call_grammar(llm.tokenizer, llm.config.vocab_size, tools, choice, style,
                               parallel=req.parallel_tool_calls)
    except ToolError as error:
        raise RequestError(str(error), param=error.param) from None
    if grammar is not None and (req.response_format or {}).get("type", "text") != "text":
        raise RequestError("a forced tool call (tool_choice required or a function) and a JSON response_format "
                           "cannot both hold; leave one out", param="response_format")
    return ToolPlan(tools, choice, style, grammar)
