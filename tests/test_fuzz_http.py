"""An HTTP fuzzer that stays in the suite: random JSON shapes and values, broken bytes and odd
headers against every endpoint of a live server (no API key, so the Host/Origin/Content-Type
guards are in the path too); on chat, `tools` (hostile function names and JSON schemas: broken
references, impossible or huge bounds), `tool_choice`, `parallel_tool_calls`, and messages with
earlier tool_calls and tool results (`tool_call_id`).  The server (the tiny random model with a byte tokenizer) runs
in its own process under a 4 GB address-space limit, so a request that makes it allocate
without bound kills it (and fails the test) instead of the machine.

Every case must get an answer within 30 s (never a hang), never a 5xx, a 4xx always in
OpenAI's error shape, a 200 stream made only of JSON events and [DONE] with no error event,
and the server must stay alive and keep answering /health.  A fixed seed and 300 cases by default (well
under a minute); `LLAMA3_FUZZ_CASES=5000 pytest tests/test_fuzz_http.py` for a longer run
(`LLAMA3_FUZZ_SEED` picks another corpus).  All failures are reported together, each with
the request that caused it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

CASES = int(os.environ.get("LLAMA3_FUZZ_CASES", "300"))
SEED = int(os.environ.get("LLAMA3_FUZZ_SEED", "1234"))
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
          "seed", "stream", "stream_options", "n", "best_of", "echo", "logprobs", "top_logprobs",
          "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "tools", "functions",
          "tool_choice", "parallel_tool_calls", "response_format", "user", "metadata"]
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/tiny", "/health", "/v1/other"]
STRINGS = ["", "hi", "tiny", "user", "assistant", "system", "tool", "text", "<|im_end|>", "<|im_start|>system",
           "\ud800", "\udfff\ud800", "😀", "\x00", "caf\u00e9", "a" * 3000, "\n\n", "{{ 7*7 }}", "%s%n", "\\"]
NUMBERS = [0, 1, -1, 2, 8, 9, 16, 10**6, 2**63, -2**63 - 1, 10**30, 0.0, -0.0, 0.5, 1.5, 2.0, 2.5, 1e-300,
           1e308, float("nan"), float("inf"), -float("inf"), True, False]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(STRINGS) * rng.choice([1, 1, 1, 2, 50])
    if kind < 0.55:
        return rng.choice(NUMBERS)
    if kind < 0.6:
        return None
    if depth > 3 or kind < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS + ["role", "content", "type", "text"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


NAMES = ["f", "get_weather", "a.b-c_9", "x" * 64, "add", "brave_search", "code_interpreter"]
BAD_NAMES = ["x" * 65, "has space", "", "é", None, 3]
HOSTILE_SCHEMAS = [
    {"type": "no-such-type"}, {"type": ["string", "null"]}, {"type": 3}, {"$ref": "#"}, {"$ref": "#/definitions/nope"},
    {"$ref": "http://evil.example/schema"}, {"type": "string", "pattern": "(("}, {"type": "string", "pattern": "a{99999}"},
    {"type": "string", "minLength": 10**9}, {"type": "string", "minLength": 5, "maxLength": 2},
    {"type": "array", "minItems": 10**6}, {"type": "array", "minItems": 3, "maxItems": 10**6}, {"type": "array", "maxItems": -1},
    {"type": "integer", "minimum": 10, "maximum": 1}, {"type": "integer", "minimum": 10**30}, {"type": "number", "multipleOf": 0},
    {"enum": []}, {"anyOf": []}, {"allOf": [{"type": "string"}, {"type": "integer"}]}, {"not": {}},
    {"type": "string", "format": "no-such-format"}, {"properties": "x"}, {"type": "string", "minLength": 2**63},
    {"type": "object", "required": ["missing"], "additionalProperties": False}, {"type": "object", "minProperties": 10**6},
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "$ref": "#/$defs/t"}]


def random_schema(rng: random.Random, depth: int = 0, hostile: float = 0.08):
    """A JSON schema, mostly valid (objects, arrays, unions, bounds), with a hostile part now and then:
    unknown types, broken patterns and references, recursion, contradictory or huge bounds."""
    if rng.random() < hostile:
        return rng.choice(HOSTILE_SCHEMAS + [random_value(rng)])
    kind = rng.random()
    if kind < 0.3 or depth > 3:
        return rng.choice([{}, {"type": "string"}, {"type": "string", "maxLength": 4}, {"type": "boolean"},
                           {"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["C", "F", 1, None]},
                           {"const": 3}, {"type": "null"}, {"type": "number"}])
    if kind < 0.7:
        properties = {rng.choice(STRINGS[:8] + ["city", "a", "b"]): random_schema(rng, depth + 1, hostile)
                      for _ in range(rng.randrange(4))}
        schema = {"type": "object", "properties": properties}
        if rng.random() < 0.5:
            schema["required"] = rng.sample(sorted(properties), rng.randrange(len(properties) + 1))
        if rng.random() < 0.5:
            schema["additionalProperties"] = rng.choice([False, True, random_schema(rng, depth + 1, hostile)])
        return schema
    if kind < 0.85:
        return {"type": "array", "items": random_schema(rng, depth + 1, hostile),
                **({"minItems": rng.choice([0, 1, 2]), "maxItems": rng.choice([2, 3])} if rng.random() < 0.3 else {})}
    return {rng.choice(["anyOf", "oneOf", "allOf"]): [random_schema(rng, depth + 1, hostile)
                                                       for _ in range(rng.randrange(1, 3))]}


def random_tool(rng: random.Random, hostile: bool = True):
    """One entry of `tools`: OpenAI's shape with a valid schema, or (hostile) now and then a bad part,
    rarely anything at all."""
    if not hostile:
        return {"type": "function", "function": {"name": rng.choice(NAMES), "parameters": random_schema(rng, hostile=0)}}
    if rng.random() < 0.03:
        return random_value(rng)
    function = {"name": rng.choice(NAMES) if rng.random() < 0.9 else rng.choice(BAD_NAMES + [random_value(rng)]),
                "parameters": random_schema(rng)}
    if rng.random() < 0.3:
        function["description"] = rng.choice(["The weather", "x" * 2000, "{{ 7*7 }}"]) if rng.random() < 0.9 \
            else random_value(rng)
    if rng.random() < 0.05:
        del function[rng.choice(["name", "parameters"])]
    if rng.random() < 0.05:
        function[rng.choice(["strict", "parameters", "x"])] = random_value(rng)
    return {"type": "function" if rng.random() < 0.95 else rng.choice(["code", random_value(rng)]), "function": function}


def random_tool_choice(rng: random.Random, tools):
    names = [t["function"].get("name") for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if rng.random() < 0.75:
        return rng.choice(["auto", "none", "required", "required",
                           {"type": "function", "function": {"name": rng.choice(names + NAMES[:1])}}])
    return rng.choice(["sometimes", random_value(rng), {"type": "function", "function": rng.choice(NAMES + [None])},
                       {"type": rng.choice(["function", "tool", None]), "function": random_value(rng)}])


def random_call(rng: random.Random):
    arguments = rng.choice(['{"city": "Oslo"}', "{}", '{"a": [1, {"b": null}]}', {"a": 1}] * 3 +
                           ["", "{not json", "[1, 2]", '"a string"', random_value(rng)])
    call = {"id": rng.choice(["call_1", "call_2", "call_1"] + ["", random_value(rng)]), "type": "function",
            "function": {"name": rng.choice(NAMES * 3 + BAD_NAMES), "arguments": arguments}}
    if rng.random() < 0.05:
        del call[rng.choice(["id", "function", "type"])]
    return call if rng.random() > 0.05 else random_value(rng)


def random_message(rng: random.Random):
    if rng.random() < 0.2:
        return random_value(rng)
    message = {"role": rng.choice(["user", "assistant", "system", "developer", "tool", "wizard", 3]),
               "content": rng.choice(["hello", "", None, [{"type": "text", "text": "hi"}],
                                      [{"type": "image_url", "image_url": {"url": "x"}}], random_value(rng)])}
    if rng.random() < 0.2:
        message[rng.choice(["name", "tool_calls", "tool_call_id", "content"])] = random_value(rng)
    if rng.random() < 0.2:  # an earlier call, and the tool result that answers it (or not)
        message.update(role=rng.choice(["assistant"] * 4 + ["user"]),
                       tool_calls=rng.choice([[random_call(rng) for _ in range(rng.randrange(3))], random_value(rng)]))
    elif rng.random() < 0.15:
        message.update(role=rng.choice(["tool"] * 4 + ["user"]),
                       tool_call_id=rng.choice(["call_1", "call_2", "", random_value(rng)]))
    return message


def random_body(rng: random.Random, path: str):
    body = {"model": "tiny", "max_tokens": rng.choice([1, 2, 4])}
    if path.endswith("chat/completions"):
        body["messages"] = [random_message(rng) for _ in range(rng.randrange(1, 4))]
    else:
        body["prompt"] = rng.choice(["Once", ["a", "b"], "x" * 500, random_value(rng)])
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        body[rng.choice(FIELDS)] = random_value(rng)
    if path.endswith("chat/completions") and rng.random() < 0.35:  # tools, tool_choice, parallel_tool_calls
        hostile = rng.random() < 0.6  # or valid tools, so that forced calls are compiled, generated and parsed
        tools = [random_tool(rng, hostile) for _ in range(rng.randrange(4))]
        if not hostile:  # unique names
            for tool, name in zip(tools, rng.sample(NAMES, len(tools))):
                tool["function"]["name"] = name
        body["tools"] = tools if rng.random() < 0.95 else random_value(rng)
        if rng.random() < 0.7:
            body["tool_choice"] = random_tool_choice(rng, tools)
        if rng.random() < 0.3:
            body["parallel_tool_calls"] = rng.choice([True, False, random_value(rng)])
    if rng.random() < 0.3:
        body["stream"] = True
    if rng.random() < 0.1:
        return random_value(rng)  # not even an object
    return body


def random_request(rng: random.Random) -> dict:
    path = rng.choice(PATHS[:2] * 4 + PATHS)
    method = "POST" if path.startswith("/v1/c") and rng.random() < 0.95 else rng.choice(["GET", "POST", "PUT"])
    raw = json.dumps(random_body(rng, path)).encode()
    mutation = rng.random()
    if mutation < 0.08:
        raw = raw[:rng.randrange(len(raw) + 1)]  # truncated
    elif mutation < 0.16:
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)  # flipped bytes
        raw = bytes(data)
    elif mutation < 0.2:
        raw = rng.choice([b"[" * 20000, b'{"a":' * 5000, b"9" * 6000, b"\xff\xfe\x00", b"null", b"{}" * 3])
    headers = {"Content-Type": rng.choice(["application/json"] * 8 + ["text/plain", "application/json; charset=utf-8",
                                                                     "", "application/x-www-form-urlencoded"])}
    if rng.random() < 0.05:
        headers["Origin"] = rng.choice(["https://evil.example", "null", "http://127.0.0.1"])
    if rng.random() < 0.05:
        headers["Host"] = rng.choice(["evil.example", "localhost", "127.0.0.1:1", ""])
    return {"method": method, "path": path, "content": raw, "headers": headers}


def check_answer(response: httpx.Response, streamed_text: str | None) -> str | None:
    """What is wrong with this answer, or None."""
    if response.status_code >= 500:
        return f"status {response.status_code}"
    if response.status_code >= 400:
        try:
            error = json.loads(response.content)["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {response.status_code} without OpenAI's error body"
        if not (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and error["message"]):
            return f"status {response.status_code}: error body {error!r:.200}"
        return None
    if streamed_text is not None:
        events = [e for e in streamed_text.split("\n\n") if e]
        if not events or events[-1] != "data: [DONE]":
            return f"a stream that does not end with [DONE]: {events[-1:]!r:.200}"
        for event in events[:-1]:
            chunk = json.loads(event.removeprefix("data: "))
            if "error" in chunk:
                return f"an error event in a 200 stream: {chunk!r:.200}"
    return None


def serve(fd: int) -> None:
    """The server process: the tiny model behind the app, on the listening socket `fd`."""
    import resource

    import uvicorn

    from conftest import make_config, make_model
    from llama3.engine import EngineConfig
    from llama3.llm import LLM
    from llama3.server import Server, create_app
    from llama3.server_limits import ServerLimits
    from test_server import ByteTokenizer

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    config = make_config(vocab_size=259, max_seq_len=256)
    limits = ServerLimits(max_body_bytes=64 * 1024, max_tokens_cap=8, max_prompts=4, max_prompt_chars=2000)
    class Tokenizer(ByteTokenizer):  # <|im_end|> stops: grammars (tools, response_format) compile and end
        stop_ids = [ByteTokenizer.special_tokens["<|im_end|>"]]

        def token_bytes(self, i):
            return bytes([i]) if i < 256 else self.decode([i]).encode()

    app = create_app(LLM(make_model(config), config, Tokenizer(), source="tiny"), "tiny", limits=limits,
                     engine=EngineConfig(kv_memory="64MB"))  # the default budget (a share of RAM) exceeds the 4 GB limit
    Server(uvicorn.Config(app, log_level="error")).run(sockets=[socket.socket(fileno=fd)])


class ServerProcess:
    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.sock.fileno())], pass_fds=[self.sock.fileno()],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(1200):
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the fuzz server did not start")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.sock.close()
        self.log.close()


@pytest.fixture(scope="module")
def server():
    live = ServerProcess()
    yield live
    live.stop()


def test_random_requests_never_break_the_server(server):
    rng = random.Random(SEED)
    failures = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for case in range(CASES):
            request = random_request(rng)
            try:
                with client.stream(request["method"], request["path"], content=request["content"],
                                   headers=request["headers"]) as response:
                    body = response.read()
                streamed = body.decode() if response.headers.get("content-type", "").startswith(
                    "text/event-stream") else None
                problem = check_answer(response, streamed)
            except httpx.HTTPError as e:  # a hang (timeout) or a dropped connection
                problem = f"{type(e).__name__}: {e}"
            if problem:
                failures.append(f"case {case}: {problem}; {request['method']} {request['path']} "
                                f"{request['headers']} {request['content'][:300]!r}")
            if case % 25 == 0 or problem:
                assert server.alive(), f"the server died at case {case}:\n{failures[-3:]}\n{server.output()}"
                assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:20])


if __name__ == "__main__":
    serve(int(sys.argv[1]))
