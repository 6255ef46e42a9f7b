"""Structured output (llama3/structured.py, xgrammar): answers sampled at temperature 1 parse as JSON
and validate against their schema (nested objects, enums, arrays, required fields), from the
embedded model through the Python API and from a random model through the server; a schema the
engine cannot compile is a 400."""

from __future__ import annotations

import json

import jsonschema
import pytest

from conftest import make_config, make_model
from llama3.generate import GenerationSettings, TextGeneration
from llama3.llm import LLM
from llama3.server import create_app
from llama3.structured import SchemaError, compile_json, json_samplers
from test_server import KEY, ByteTokenizer, LiveServer, assert_error, post

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                 "zip": {"type": "string", "maxLength": 5}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "address"], "additionalProperties": False}
VERDICT = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                            "confidence": {"enum": ["low", "high"]}},
           "required": ["answer", "confidence"], "additionalProperties": False}
TAGS = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                  "minItems": 1, "maxItems": 3},
                                         "ok": {"type": "boolean"}},
        "required": ["tags", "ok"], "additionalProperties": False}
SCHEMAS = [PERSON, VERDICT, TAGS]


@pytest.fixture(scope="module")
def smollm2(default_llm):
    return default_llm  # llama3.load(): conftest's, loaded once per session


def test_embedded_model_answers_validate_at_temperature_one(smollm2):
    """One batch, one schema per row, each row with its own grammar matcher."""
    tokenizer = smollm2.tokenizer
    questions = ["Describe a person and where they live, as JSON.", "Is the sky green? Answer as JSON.",
                 "List some colours as JSON."]
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    # every value bounded (strings by maxLength, the rest enums), so each answer fits in 64 tokens
    settings = GenerationSettings(max_new_tokens=64, temperature=1.0, seed=3)
    samplers = [json_samplers(smollm2, [ids], settings, schema)[0] for ids, schema in zip(prompts, SCHEMAS)]
    completions = TextGeneration(smollm2.model, tokenizer, prompts, settings, samplers=samplers).run()
    for completion, schema in zip(completions, SCHEMAS):
        assert completion.finish_reason == "stop", completion.text       # the grammar closed the value
        jsonschema.validate(json.loads(completion.text), schema)


def test_llm_chat_json_object(smollm2):
    text = smollm2.chat([{"role": "user", "content": "Say hi as JSON."}], json_object=True, max_new_tokens=40,
                        temperature=1.0, seed=1)
    assert isinstance(json.loads(text), dict)


def test_uncompilable_schema_raises(smollm2):
    with pytest.raises(SchemaError, match="cannot compile"):
        compile_json(smollm2.tokenizer, smollm2.config.vocab_size, {"type": "no-such-type"})


# ---------------------------------------------------------------- the server, on a random model
class StoppingByteTokenizer(ByteTokenizer):
    stop_ids = [257]                     # <|im_end|>: the grammar ends the answer with it

    def token_bytes(self, i):
        return bytes([i]) if i < 256 else self.decode([i]).encode()


@pytest.fixture(scope="module")
def tiny():
    config = make_config(vocab_size=259, max_seq_len=2048)
    server = LiveServer(create_app(LLM(make_model(config, seed=1), config, StoppingByteTokenizer(), source="tiny"),
                                   "tiny", api_key=KEY))
    yield server
    server.stop()


def test_server_json_schema_chat_and_completions(tiny):
    """Random weights, temperature 1: whatever the model wants, the answer validates."""
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}
    chat = post(tiny, "/v1/chat/completions", {"messages": [{"role": "user", "content": "ok?"}], "n": 2,
                                               "temperature": 1.0, "seed": 5, "max_tokens": 200,
                                               "response_format": fmt})
    assert chat.status_code == 200, chat.text
    for choice in chat.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), VERDICT)
    completion = post(tiny, "/v1/completions", {"prompt": "x", "temperature": 1.0, "seed": 2, "max_tokens": 200,
                                                "response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "t", "schema": TAGS}}})
    assert completion.status_code == 200, completion.text
    jsonschema.validate(json.loads(completion.json()["choices"][0]["text"]), TAGS)


@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}, "response_format"),
    ({"type": "json_schema", "json_schema": "not an object"}, "response_format.json_schema"),
    ({"type": "xml"}, "response_format.type"),
])
def test_server_refuses_bad_response_format(tiny, fmt, param):
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
    assert_error(post(tiny, "/v1/chat/completions", body), 400, param=param)
