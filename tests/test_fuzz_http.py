"""An HTTP fuzzer that stays in the suite: random JSON shapes and values, broken bytes and odd
headers against every endpoint of a live server (no API key, so the Host/Origin/Content-Type
guards are in the path too).  The server (the tiny random model with a byte tokenizer) runs
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
          "response_format", "user", "metadata"]
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


def random_message(rng: random.Random):
    if rng.random() < 0.2:
        return random_value(rng)
    message = {"role": rng.choice(["user", "assistant", "system", "developer", "tool", "wizard", 3]),
               "content": rng.choice(["hello", "", None, [{"type": "text", "text": "hi"}],
                                      [{"type": "image_url", "image_url": {"url": "x"}}], random_value(rng)])}
    if rng.random() < 0.2:
        message[rng.choice(["name", "tool_calls", "content"])] = random_value(rng)
    return message


def random_body(rng: random.Random, path: str):
    body = {"model": "tiny", "max_tokens": rng.choice([1, 2, 4])}
    if path.endswith("chat/completions"):
        body["messages"] = [random_message(rng) for _ in range(rng.randrange(1, 4))]
    else:
        body["prompt"] = rng.choice(["Once", ["a", "b"], "x" * 500, random_value(rng)])
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        body[rng.choice(FIELDS)] = random_value(rng)
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
    app = create_app(LLM(make_model(config), config, ByteTokenizer(), source="tiny"), "tiny", limits=limits,
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
