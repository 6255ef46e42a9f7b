"""Tool calling (llama3/tools.py, chat.py, the server's tools fields).

References: transformers' apply_chat_template(tools=...) for a Llama 3.1 template and for the default
model's template (which has no tools section, so the tools are described in a system message first);
Meta's ChatFormat (llama_models) for token ids of dialogs with tool calls and ipython results, and
its decode_assistant_message for reading calls; Meta's prompt_format.md (shipped in llama_models) for
the tools prompt.  Forced calls (tool_choice required / named) are sampled at temperature 1 and must
parse and validate against the function's schema; the official openai client reads them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest

from llama3.tokenizer import llama3_tokenizer_path, load_tokenizer
from llama3.tokenizer.chat import calls_as_text, describe_tools
from llama3.tokenizer.llama3_tiktoken import Llama3Tokenizer
from llama3.tools import CallStream, ToolError, check_choice, check_messages, check_tools, parse_calls
from tokenizer_refs import smollm2_gguf, transformers_gguf_tokenizer, transformers_llama3_tokenizer

# Llama 3.1 8B Instruct's chat_template (tokenizer_config.json of meta-llama/Llama-3.1-8B-Instruct,
# the same in Llama 3.3 70B), transcribed for offline use.
LLAMA31_JINJA = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 999}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [call("call_1", "get_weather", {"city": "Paris", "unit": "C"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    {"role": "assistant", "content": "18 °C and sunny."},
    {"role": "user", "content": "And 2 + 3?"},
]


def with_argument_dicts(messages):
    """transformers' convention for tool_calls: arguments as a mapping."""
    out = []
    for m in messages:
        if "tool_calls" in m:
            m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


def ids_of(encoding):
    return encoding["input_ids"] if hasattr(encoding, "keys") else encoding


# ------------------------------------------------------------------ rendering
def test_llama31_template_with_tools_equals_transformers():
    ref = transformers_llama3_tokenizer()
    ours = Llama3Tokenizer(llama3_tokenizer_path(), chat_template=LLAMA31_JINJA)
    for messages in (CONVERSATION[1:2], CONVERSATION):
        for tools in (TOOLS, None):
            expected_text = ref.apply_chat_template(with_argument_dicts(messages), tools=tools, tokenize=False,
                                                    add_generation_prompt=True, chat_template=LLAMA31_JINJA)
            expected_ids = ids_of(ref.apply_chat_template(with_argument_dicts(messages), tools=tools, tokenize=True,
                                                          add_generation_prompt=True, chat_template=LLAMA31_JINJA))
            assert ours.render_chat(messages, tools=tools) == expected_text
            assert ours.encode_chat(messages, tools=tools) == expected_ids
    assert "Environment: ipython" in ours.render_chat(CONVERSATION, tools=TOOLS)


def test_default_model_template_has_no_tools_section_so_tools_are_described():
    """SmolLM2's template ignores `tools` (transformers renders the same prompt with or without them),
    so the tools are described in the system message and earlier calls/results written as text;
    the prompt is then what transformers renders for those messages."""
    smol = load_tokenizer(smollm2_gguf())
    ref = transformers_gguf_tokenizer(str(smollm2_gguf()))
    assert "tools" not in smol.chat_template
    plain = CONVERSATION[1:2]
    assert ref.apply_chat_template(plain, tools=TOOLS, tokenize=False) == ref.apply_chat_template(plain, tokenize=False)
    for messages in (plain, CONVERSATION):
        rewritten = describe_tools(calls_as_text(messages), TOOLS)
        assert smol.render_chat(messages, tools=TOOLS) == ref.apply_chat_template(
            rewritten, tokenize=False, add_generation_prompt=True)
        assert smol.encode_chat(messages, tools=TOOLS) == ids_of(ref.apply_chat_template(
            rewritten, tokenize=True, add_generation_prompt=True))
    text = smol.render_chat(CONVERSATION, tools=TOOLS)
    assert text.count("<|im_start|>system") == 1 and "You are terse.\n\n# Tools" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18 degrees, sunny\n</tool_response><|im_end|>" in text


def meta_ids(messages):
    from llama_models.datatypes import RawMessage, StopReason, ToolCall
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    raw = []
    for m in messages:
        calls = [ToolCall(call_id=c["id"], tool_name=c["function"]["name"],
                          arguments=json.loads(c["function"]["arguments"])) for c in m.get("tool_calls", [])]
        raw.append(RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m.get("content", ""),
                              tool_calls=calls,
                              stop_reason=StopReason.end_of_message if calls else None))
    return ChatFormat(MetaTokenizer(llama3_tokenizer_path())).encode_dialog_prompt(raw).tokens


@pytest.mark.parametrize("messages", [
    CONVERSATION,
    [{"role": "user", "content": "Latest price of gold?"},
     {"role": "assistant", "content": "", "tool_calls": [call("a", "brave_search", {"query": "price of 1oz gold"})]},
     {"role": "tool", "tool_call_id": "a", "content": '{"price": "2,650 USD"}'}],
    [{"role": "user", "content": "Is 7 prime? Use code."},
     {"role": "assistant", "content": "", "tool_calls": [call("c", "code_interpreter", {"code": "print(7 % 2)"})]},
     {"role": "ipython", "content": "1"}],
    [{"role": "user", "content": "Both, please."},
     {"role": "assistant", "content": "Calling both.", "tool_calls": [call("x", "add", {"a": 1, "b": 2}),
                                                                       call("y", "wolfram_alpha", {"query": "pi"})]},
     {"role": "tool", "tool_call_id": "x", "content": "3"}, {"role": "tool", "tool_call_id": "y", "content": "3.14"}],
])
def test_meta_format_dialogs_with_tool_calls_equal_chat_format(messages):
    llama3 = load_tokenizer()
    check_messages(messages)
    ids = llama3.encode_chat(messages)
    assert ids == meta_ids(messages)
    assert llama3.decode(ids) == llama3.render_chat(messages)


def _doc_prompt(section: str) -> str:
    import llama_models

    doc = (Path(llama_models.__file__).parent / "llama3_1" / "prompt_format.md").read_text()
    after = doc[doc.index(section):]
    after = after[after.index("##### Input Prompt Format\n```\n") + len("##### Input Prompt Format\n```\n"):]
    return after[:after.index("\n```")]


def test_meta_tools_prompt_follows_llama_models_prompt_format(monkeypatch):
    """Meta's format with tools: the system and tool-list messages of prompt_format.md."""
    import llama3.tokenizer.chat as chat

    monkeypatch.setattr(chat, "_today", lambda: "21 September 2024")
    llama3 = load_tokenizer()
    search = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}}}} for name in ("brave_search", "wolfram_alpha")]
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]
    assert llama3.render_chat(messages, tools=search).rstrip("\n") == _doc_prompt("## Builtin Tool Calling").rstrip("\n")

    songs = {"type": "function", "function": {"name": "trending_songs", "description": "Returns the trending songs on a "
             "Music site", "parameters": {"type": "object", "properties": [
                 {"n": {"type": "object", "description": "The number of songs to return"}},
                 {"genre": {"type": "object", "description": "The genre of the songs to return"}}],
                 "required": ["n"]}}}
    messages = [messages[0], {"role": "user", "content": "Use tools to get latest trending songs"}]
    ours, doc = llama3.render_chat(messages, tools=[songs]), _doc_prompt("## JSON based tool calling")
    head, tail = "Here is a list of functions in JSON format:\n", "\n\nReturn function calls in JSON format."
    # the text around the tool's JSON is Meta's to the byte; the JSON itself is the tool (Meta indents lists its own way)
    assert ours[:ours.index(head)] == doc[:doc.index(head)]
    assert ours[ours.index(tail):].rstrip("\n") == doc[doc.index(tail):].rstrip("\n")
    assert json.loads(ours[ours.index(head) + len(head):ours.index(tail)]) == songs
    assert json.loads(doc[doc.index(head) + len(head):doc.index(tail)]) == songs


# ------------------------------------------------------------------ parsing
META_ANSWERS = [  # prompt_format.md's model responses (without the end token), and one that is no call
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")',
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
    '        "n": "10",\n        "genre": "all"\n    }\n}',
    "<|python_tag|>def is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\n\nprint(is_prime(7))",
    "The 100th decimal of pi is 7.",
]


@pytest.mark.parametrize("text", META_ANSWERS)
def test_meta_calls_parse_as_chat_format_decodes_them(text):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    offered = [{"type": "function", "function": {"name": n, "parameters": {}}}
               for n in ("brave_search", "code_interpreter", "trending_songs")]
    meta = ChatFormat(MetaTokenizer(llama3_tokenizer_path())).decode_assistant_message_from_content(
        text, StopReason.end_of_message)
    content, calls = parse_calls(text, "meta", offered)
    expected = [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in meta.tool_calls]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
    assert (content is None) == bool(calls) and (calls or content == text)


def test_hermes_blocks_parse_and_other_text_stays_content():
    tools = check_tools(TOOLS)
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>\n[{"name": "add", "arguments": {"a": 1, "b": 2}}]\n</tool_call>')
    content, calls = parse_calls(text, "hermes", tools)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "C"}), ("add", {"a": 1, "b": 2})]
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    for not_a_call in ("no calls here", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
                       "<tool_call>\n{not json}\n</tool_call>"):
        assert parse_calls(not_a_call, "hermes", tools) == (not_a_call, [])


@pytest.mark.parametrize("style, text", [
    ("hermes", 'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    ("hermes", "a < b and <tool_ is not a call <tool_call"),
    ("hermes", "plain answer, with trailing space  "),
    ("meta", '<|python_tag|>{"name": "add", "parameters": {"a": 4, "b": 5}}'),
    ("meta", '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "F"}}'),
    ("meta", "<b>bold</b> not a call"),
])
def test_streamed_calls_equal_whole_parse(style, text):
    tools = check_tools(TOOLS)
    whole_content, whole_calls = parse_calls(text, style, tools)
    rng = random.Random(0)
    for _ in range(20):
        stream, sent, cuts = CallStream(style, tools), "", sorted(rng.sample(range(1, len(text)), 5))
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            sent += stream.feed(text[a:b])
        rest, calls = stream.finish()
        assert sent + rest == (whole_content or "")
        assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]


# ------------------------------------------------------------------ bad tools
@pytest.mark.parametrize("tools, param", [
    ("not a list", "tools"),
    ([{"type": "function"}], "tools.0"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools.0.function.name"),
    ([WEATHER, WEATHER], "tools.1.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}],
     "tools.0.function.parameters"),
])
def test_bad_tools_raise(tools, param):
    with pytest.raises(ToolError) as error:
        check_tools(tools)
    assert error.value.param == param


def test_bad_choice_and_orphan_tool_result_raise():
    with pytest.raises(ToolError, match="not in tools"):
        check_choice({"type": "function", "function": {"name": "nope"}}, check_tools(TOOLS))
    with pytest.raises(ToolError, match="needs tools"):
        check_choice("required", [])
    with pytest.raises(ToolError, match="no earlier"):
        check_messages([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}])


# ------------------------------------------------------------------ forced calls, Python API
def validate(message, allowed):
    assert message["tool_calls"], message
    for c in message["tool_calls"]:
        assert c["function"]["name"] in allowed and c["id"].startswith("call_")
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])


@pytest.fixture(scope="module")
def smollm2(default_llm):
    return default_llm  # llama3.load(): conftest's, loaded once per session


def test_llm_chat_forced_calls_validate_at_temperature_one(smollm2):
    question = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
    for seed in range(3):
        validate(smollm2.chat(question, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
                              max_new_tokens=160), {"get_weather", "add"})
    named = smollm2.chat(question, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                         temperature=1.0, seed=7, max_new_tokens=64)
    validate(named, {"add"})
    assert named["content"] is None and len(named["tool_calls"]) == 1
    cut = smollm2.chat(question, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                       temperature=0, max_new_tokens=6)  # max_new_tokens ends it inside the call
    assert cut == {"role": "assistant", "content": None}


def test_meta_format_forced_call_on_a_random_llama3_model():
    """Meta's style: the grammar writes {"name": ..., "parameters": ...} with Llama 3's 128k vocabulary."""
    from conftest import make_config, make_model
    from llama3.llm import LLM

    config = make_config(vocab_size=128256, max_seq_len=2048, dim=32, hidden_dim=48)
    llm = LLM(make_model(config, seed=2), config, load_tokenizer(), source="tiny-llama3")
    message = llm.chat([{"role": "user", "content": "2 + 3?"}], tools=TOOLS, tool_choice="required",
                       temperature=1.0, seed=1, max_new_tokens=64)
    validate(message, {"get_weather", "add"})


# ------------------------------------------------------------------ the server, with the openai client
@pytest.fixture(scope="module")
def server(smollm2):
    from llama3.server import create_app
    from test_server import KEY, LiveServer

    live = LiveServer(create_app(smollm2, "smollm2-135m-instruct", api_key=KEY))
    yield live
    live.stop()


def test_openai_client_gets_forced_tool_calls(server):
    client = server.client()
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, tools=TOOLS,
                                           tool_choice="required", temperature=1.0, seed=3, n=3, max_tokens=160)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        validate(choice.message.model_dump(), {"get_weather", "add"})
    named = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False, temperature=1.0, seed=4, max_tokens=64)
    message = named.choices[0].message
    assert len(message.tool_calls) == 1 and message.tool_calls[0].function.name == "get_weather"
    validate(message.model_dump(), {"get_weather"})

    # the call and its result go back into the conversation
    follow = question + [message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 C, sunny"}]
    answer = client.chat.completions.create(model="smollm2-135m-instruct", messages=follow, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=16)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")


def test_openai_client_streams_tool_calls(server):
    stream = server.client().chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Add 2 and 3."}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, temperature=1.0, seed=5, max_tokens=64,
        stream=True)
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert calls[0]["name"] == "add" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["add"])


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]},
     "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "1"}]},
     "messages.1.tool_call_id"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_requests_are_openai_shaped_400s(server, extra, param):
    from test_server import assert_error, post

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    assert_error(post(server, "/v1/chat/completions", body), 400, param=param)


def test_reply_parses_an_auto_answer_whole_and_streamed():
    """The server's response objects for an answer the model wrote itself (tool_choice auto): the
    same content and calls whole and streamed; finish_reason tool_calls; parallel_tool_calls false keeps one."""
    from llama3.server_api.reply import Reply
    from llama3.tokenizer.chat import JinjaChatFormat
    from llama3.tools import plan_tools

    class Chat:  # what plan_tools reads of a tokenizer: the chat format (a template without tools)
        chat_format = JinjaChatFormat("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    text = ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    for parallel, expected in ((True, ["get_weather", "add"]), (False, ["get_weather"])):
        plan = plan_tools(Chat(), 0, TOOLS, "auto", parallel)
        whole, streamed = Reply("m", True, [[1]], tools=plan), Reply("m", True, [[1]], tools=plan)
        chunks = []
        for i in range(0, len(text), 7):  # the engine's events: text pieces, then the end
            whole.add(("text", 0, text[i:i + 7]))
            chunks.append(streamed.add(("text", 0, text[i:i + 7])))
        whole.add(("end", 0, "stop", 30, 0))
        chunks.append(streamed.add(("end", 0, "stop", 30, 0)))
        message = whole.whole()["choices"][0]
        assert message["finish_reason"] == "tool_calls" and message["message"]["content"] == "Checking both."
        assert [c["function"]["name"] for c in message["message"]["tool_calls"]] == expected
        deltas = [c["choices"][0] for c in chunks if c is not None]
        assert "".join(d["delta"].get("content", "") for d in deltas) == "Checking both."
        assert deltas[-1]["finish_reason"] == "tool_calls"
        streamed_calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
        assert [c["index"] for c in streamed_calls] == list(range(len(expected)))
        assert [c["function"] for c in streamed_calls] == [c["function"] for c in message["message"]["tool_calls"]]


CUT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'   # max_tokens ended it mid-call
ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'


@pytest.mark.parametrize("choice, style, text, content, calls", [
    ("required", "hermes", CUT, None, []),
    ("required", "hermes", "<tool_c", None, []),
    ("required", "hermes", ADD + CUT, None, ["add"]),          # the finished call is kept, finish stays length
    ("get_weather", "meta", '{"name": "get_weather", "parameters": {"ci', None, []),
    ("auto", "hermes", "Let me check. " + CUT, "Let me check.", []),
    ("auto", "hermes", CUT, None, []),
    ("auto", "hermes", "a plain answer, cut", "a plain answer, cut", []),
])
def test_a_call_cut_by_max_tokens_is_dropped_whole_and_streamed(choice, style, text, content, calls):
    """finish_reason "length" inside a call: no raw <tool_call> text as content, the unfinished call is
    not a call, finish_reason stays "length" (as OpenAI and vLLM answer a cut call); streamed = whole."""
    from llama3.server_api.reply import Reply
    from llama3.tools import ToolPlan

    plan = ToolPlan(check_tools(TOOLS), choice, style, grammar=None)  # the grammar only steers sampling
    whole, streamed = Reply("m", True, [[1]], tools=plan), Reply("m", True, [[1]], tools=plan)
    chunks = []
    for i in range(0, len(text), 5):
        whole.add(("text", 0, text[i:i + 5]))
        chunks.append(streamed.add(("text", 0, text[i:i + 5])))
    whole.add(("end", 0, "length", 16, 0))
    chunks.append(streamed.add(("end", 0, "length", 16, 0)))
    choice_ = whole.whole()["choices"][0]
    assert choice_["finish_reason"] == "length"
    assert choice_["message"]["content"] == content
    assert [c["function"]["name"] for c in choice_["message"].get("tool_calls", [])] == calls
    deltas = [c["choices"][0] for c in chunks if c is not None]
    assert "".join(d["delta"].get("content", "") for d in deltas) == (content or "")
    assert deltas[-1]["finish_reason"] == "length"
    assert [c["function"] for d in deltas for c in d["delta"].get("tool_calls", [])] == \
        [c["function"] for c in choice_["message"].get("tool_calls", [])]


def test_openai_client_gets_no_tag_text_for_a_forced_call_cut_by_max_tokens(server):
    """The same cut, through the server and the official client, streamed and not: finish_reason length,
    no content (never the raw <tool_call> text) and no unfinished call."""
    body = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Weather in Paris?"}],
                tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0,
                max_tokens=6)
    client = server.client()
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.finish_reason == "length" and whole.message.content is None and whole.message.tool_calls is None
    content, finish, calls = "", None, []
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "length" and content == "" and calls == []
    answer = server.client().chat.completions.create(**{**body, "max_tokens": 64}).choices[0]
    assert answer.finish_reason == "tool_calls"  # the same request with room for the call makes it
