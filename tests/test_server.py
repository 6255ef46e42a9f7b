"""The OpenAI-compatible server, over real HTTP on 127.0.0.1, with the official `openai` client.

Two live servers, each started once per module on a free port in a background thread:
  * `tiny`: a tiny random model with a byte-level tokenizer; fast enough for the error
    cases, 20 concurrent clients and the disconnect test;
  * `real`: the embedded default model (SmolLM2-135M-Instruct), whose answers must equal
    `LLM.generate` / `LLM.chat` with the same settings, streamed or not.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from conftest import make_config, make_model
from llama3.llm import LLM
from llama3.server import Server, create_app
from llama3.tokenizer.base import Tokenizer
from llama3.tokenizer.chat import CHATML_TEMPLATE, JinjaChatFormat

KEY = "test-key"


class ByteTokenizer(Tokenizer):
    """Token i < 256 is byte i; 256 <s>, 257 <|im_end|>, 258 <|im_start|>; the ChatML template.
    No stop ids, so a random model runs to max_tokens unless a stop string ends it."""

    vocab_size, bos_id, eos_id, stop_ids = 259, 256, 257, []
    special_tokens = {"<s>": 256, "<|im_end|>": 257, "<|im_start|>": 258}
    chat_format = JinjaChatFormat(CHATML_TEMPLATE)

    def _encode_text(self, text, allow_special):
        if not allow_special:
            return list(text.encode())
        parts = re.split("(" + "|".join(map(re.escape, self.special_tokens)) + ")", text)
        return [i for part in parts for i in ([self.special_tokens[part]] if part in self.special_tokens
                                              else list(part.encode()))]

    def decode(self, ids):
        names = {i: name for name, i in self.special_tokens.items()}
        return b"".join(bytes([i]) if i < 256 else names[i].encode() for i in ids).decode("utf-8", "replace")


class LiveServer:
    """uvicorn in a daemon thread on 127.0.0.1:<free port>; `stop()` shuts it down."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.app, self.url = app, f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "the server did not start within 10 s"

    def client(self, api_key=KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=600, **kwargs)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def wait_idle(self, timeout=120.0) -> dict:
        for _ in range(int(timeout / 0.05)):
            stats = self.health()
            if not stats["running"] and not stats["queued"]:
                return stats
            time.sleep(0.05)
        raise AssertionError("the server stayed busy")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def tiny_llm():
    config = make_config(vocab_size=259, max_seq_len=2048)
    return LLM(make_model(config), config, ByteTokenizer(), source="tiny")


@pytest.fixture(scope="module")
def tiny(tiny_llm):
    server = LiveServer(create_app(tiny_llm, "tiny", api_key=KEY))
    yield server
    server.stop()


# ------------------------------------------------------------------ tiny model
def test_health_and_models(tiny):
    assert tiny.health()["status"] == "ok"
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert tiny.client().models.retrieve("tiny").id == "tiny"


def test_completion_matches_engine_and_reports_usage(tiny, tiny_llm):
    ids = tiny_llm.tokenizer.encode("Once upon")
    want = tiny_llm.generate("Once upon", max_new_tokens=12, temperature=0)
    got = tiny.client().completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0)
    assert got.choices[0].text == want and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 12
    assert got.usage.total_tokens == len(ids) + 12


def test_stop_string_cuts_and_finishes_with_stop(tiny, tiny_llm):
    full = tiny_llm.generate("abc", max_new_tokens=30, temperature=0)
    stop = full[8:10]  # something the model does say
    got = tiny.client().completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == full[:full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_chat_streaming_equals_whole_and_ends_with_done(tiny, tiny_llm):
    messages = [{"role": "user", "content": "Hello there"}]
    want = tiny_llm.chat(messages, max_new_tokens=10, temperature=0.8, top_p=1.0, seed=7)
    client = tiny.client()
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.8, seed=7)
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.8,
                                                 seed=7, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    raw = httpx.post(tiny.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"prompt": "x", "max_tokens": 3, "stream": True}).text
    events = [line for line in raw.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_prompt_list_gives_one_choice_each(tiny, tiny_llm):
    prompts = ["first prompt", "second"]
    got = tiny.client().completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == tiny_llm.generate(prompts, max_new_tokens=6, temperature=0)


def post(server, path, body, key=KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers)


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and (code is None or error["code"] == code)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "n": 17}, "n"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "best_of": 0}, "best_of"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "top_p": 1e-300}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_values_are_400_naming_the_field(tiny, body, param):
    assert_error(post(tiny, "/v1/completions", body), 400, param)


def test_error_cases(tiny):
    assert_error(post(tiny, "/v1/completions", '{"prompt": "hi",'), 400, code="json_invalid")
    assert_error(post(tiny, "/v1/chat/completions", "[1, 2]"), 400, code="json_invalid")
    assert_error(post(tiny, "/v1/completions", {"model": "gpt-4", "prompt": "hi"}), 404, "model", "model_not_found")
    assert_error(post(tiny, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}), 400)
    assert_error(post(tiny, "/v1/chat/completions", {"messages": []}), 400, "messages")
    too_long = "x" * 2100  # 2100 byte tokens > the 2048-token context
    assert_error(post(tiny, "/v1/completions", {"prompt": too_long}), 400, "prompt", "context_length_exceeded")
    assert_error(httpx.get(tiny.url + "/v1/nothing"), 404)
    with pytest.raises(openai.NotFoundError):
        tiny.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        tiny.client().completions.create(model="tiny", prompt="hi", temperature=5)


def test_api_key_required(tiny):
    assert_error(post(tiny, "/v1/completions", {"prompt": "hi"}, key=None), 401, code="invalid_api_key")
    assert_error(post(tiny, "/v1/completions", {"prompt": "hi"}, key="wrong"), 401)
    assert_error(post(tiny, "/v1/completions", "{not json", key=None), 401)  # the key is checked first
    assert httpx.get(tiny.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        tiny.client(api_key="wrong").models.list()
    assert httpx.get(tiny.url + "/health").status_code == 200  # liveness needs no key


def test_twenty_concurrent_clients_each_get_their_own_answer(tiny, tiny_llm):
    prompts = [f"client {i}: tell me about {i * 7}" for i in range(20)]
    want = [tiny_llm.generate(p, max_new_tokens=8, temperature=0) for p in prompts]
    assert len(set(want)) > 10  # the answers differ, so a mix-up would show

    def ask(i):
        client = tiny.client()
        if i % 2:
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=8, temperature=0,
                                               stream=True)
            return "".join(chunk.choices[0].text for chunk in stream)
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(ask, range(20)))
    assert got == want


def test_disconnect_stops_the_generation(tiny):
    before = tiny.wait_idle()
    body = {"prompt": "go on and on", "max_tokens": 2000, "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.stream("POST", tiny.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        events = (line for line in response.iter_lines() if line)  # events are separated by blank lines
        for _ in range(3):
            assert next(events).startswith("data: ")
    # the connection is closed now; the worker must notice and stop long before 2000 tokens
    after = tiny.wait_idle()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < 1000

    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        post_timeout = httpx.Timeout(10.0, read=0.3)
        httpx.post(tiny.url + "/v1/completions", json={**body, "stream": False}, timeout=post_timeout,
                   headers={"Authorization": f"Bearer {KEY}"})
    final = tiny.wait_idle()
    assert final["cancelled"] == after["cancelled"] + 1
    assert final["completion_tokens"] - after["completion_tokens"] < 2000


def test_shutdown_ends_open_streams_at_once(tiny_llm):
    """What Ctrl-C / SIGTERM do (Server.handle_exit): running streams end with an error event."""
    server = LiveServer(create_app(tiny_llm, "tiny"))
    body = {"prompt": "long story", "max_tokens": 2000, "temperature": 1.0, "seed": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        events = (line for line in response.iter_lines() if line)
        assert next(events).startswith("data: ")
        server.server.handle_exit(signal.SIGINT, None)
        rest = list(events)
    assert json.loads(rest[-1].removeprefix("data: "))["error"]["code"] == "cancelled"
    assert "data: [DONE]" not in rest
    server.thread.join(30)
    assert not server.thread.is_alive()
    queue = server.app.state.queue
    assert not queue._thread.is_alive() and queue.stats()["completion_tokens"] < 2000


def test_a_failed_collective_is_a_503_whole_and_streamed(tiny_llm):
    """A tensor-parallel rank that dies mid-request is the server's failure, not the client's: a 503
    (streamed: an error event after the text sent so far, no [DONE]) saying what failed and to restart."""
    from llama3.parallel.tp import collective_error

    server = LiveServer(create_app(tiny_llm, "tiny"))
    engine = server.app.state.queue.engine
    forward, calls = engine.forward, []

    def dies_at_the_fourth_step(*args):  # as lockstep.lead's forward raises when rank 1 is gone
        calls.append(1)
        if len(calls) % 4 == 0:
            raise collective_error(RuntimeError("Connection closed by peer [127.0.0.1]:29500"), 0)
        return forward(*args)

    engine.forward = dies_at_the_fourth_step
    try:
        body = {"prompt": "hi", "max_tokens": 50, "temperature": 0, "stream": True}  # prefill, 2 tokens, the failure
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as streamed:
            assert streamed.status_code == 200
            events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line]
        assert "[DONE]" not in events and len(events) >= 2
        assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]]  # the text before the failure
        error = json.loads(events[-1])["error"]
        assert error["code"] == "service_unavailable" and error["type"] == "server_error"
        assert "\n" not in error["message"]
        assert error["message"].startswith("rank 0: a tensor-parallel collective failed (Connection closed by peer")
        assert "restart" in error["message"]
        health = httpx.get(server.url + "/health")  # every request would fail now: a supervisor restarts it
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert health.json()["error"] == error["message"]

        calls[:] = [1, 1, 1]  # the next forward fails
        response = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, key=None)
        assert_error(response, 503, code="service_unavailable")
        assert response.json()["error"]["message"] == error["message"]
        assert response.json()["error"]["type"] == "server_error"
    finally:
        server.stop()


# ------------------------------------------------------------------ real model
REAL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def real(default_llm):
    server = LiveServer(create_app(default_llm, REAL))
    yield server
    server.stop()


def check_finish(choice_finish, usage, max_tokens):
    assert choice_finish == ("length" if usage.completion_tokens == max_tokens else "stop")


def test_real_completions_equal_llm_generate(real, default_llm):
    prompt = "The capital of France is"
    want = default_llm.generate(prompt, max_new_tokens=12, temperature=0)
    client = real.client()
    whole = client.completions.create(model=REAL, prompt=prompt, max_tokens=12, temperature=0)
    assert whole.choices[0].text == want
    assert whole.usage.prompt_tokens == len(default_llm.tokenizer.encode(prompt))
    check_finish(whole.choices[0].finish_reason, whole.usage, 12)
    stream = client.completions.create(model=REAL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == want


def test_real_chat_equals_llm_chat(real, default_llm):
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Name a colour."}]
    client = real.client()
    sampled = default_llm.chat(messages, max_new_tokens=12, temperature=0.7, top_p=0.9, seed=11)
    whole = client.chat.completions.create(model=REAL, messages=messages, max_tokens=12, temperature=0.7,
                                           top_p=0.9, seed=11)
    assert whole.choices[0].message.content == sampled
    assert whole.usage.prompt_tokens == len(default_llm.tokenizer.encode_chat(messages))
    check_finish(whole.choices[0].finish_reason, whole.usage, 12)
    greedy = default_llm.chat(messages, max_new_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=REAL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy
    check_finish([c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage, 24)


def test_real_serve_command_stops_cleanly_on_sigterm(tmp_path):
    """`llama3 serve` in its own process: answers, then SIGTERM ends an open stream and the process."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "llama3", "serve", "--port", str(port), "--api-key", KEY],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # loading takes a while on a busy machine: up to 5 minutes
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            events = (line for line in response.iter_lines() if line)
            assert next(events).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = list(events)
        assert "data: [DONE]" not in rest  # cut short, not run to the end
        assert proc.wait(timeout=60) == 0
        assert "server stopped" in open(tmp_path / "serve.log").read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
