"""`response_format` on both endpoints -> the compiled JSON grammar its choices follow (or None).

    {"type": "text"}                                          plain text (None)
    {"type": "json_object"}                                   any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}

A schema the grammar engine cannot compile is a 400 naming response_format.
"""

from __future__ import annotations

from llama3.server_api.fields import RequestError
from llama3.structured import JsonGrammar, SchemaError, compile_json

PARAM = "response_format"


def response_grammar(llm, response_format: dict | None) -> JsonGrammar | None:
    if not response_format:
        return None
    kind = response_format.get("type")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return compile_json(llm.tokenizer, llm.config.vocab_size, None)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise RequestError('response_format.json_schema must be an object {"name": ..., "schema": '
                                   '{...}, "strict": true}', param=f"{PARAM}.json_schema")
            return compile_json(llm.tokenizer, llm.config.vocab_size, spec.get("schema") or {"type": "object"},
                                strict=bool(spec.get("strict", True)))
    except SchemaError as error:
        raise RequestError(f"{PARAM}: {error}", param=PARAM) from None
    raise RequestError(f"response_format.type={kind!r} is not one of text, json_object, json_schema",
                       param=f"{PARAM}.type")
