"""`tools`, `tool_choice` and `parallel_tool_calls` on /v1/chat/completions (the work: llama3.tools).

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

from llama3.server_api.fields import RequestError
from llama3.tools import ToolError, ToolPlan, check_messages, plan_tools


def tool_plan(llm, req, messages: list[dict]) -> ToolPlan | None:
    """The request's tools, checked; None when it offers none (its tool messages are still checked)."""
    try:
        if not req.tools and req.tool_choice in (None, "none", "auto"):
            check_messages(messages)
            return None
        plan = plan_tools(llm.tokenizer, llm.config.vocab_size, req.tools, req.tool_choice,
                          parallel=req.parallel_tool_calls, messages=messages)
    except ToolError as error:
        raise RequestError(str(error), param=error.param) from None
    if plan.grammar is not None and (req.response_format or {}).get("type", "text") != "text":
        raise RequestError("a forced tool call (tool_choice required or a function) and a JSON response_format "
                           "cannot both hold; leave one out", param="response_format")
    return plan
