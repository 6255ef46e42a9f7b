"""The engine behind the server, `llama3 chat` and LLM: 429 on a full queue, /health's counters,
memory back to its level after many requests and abrupt disconnects, a chat's earlier turns reused."""

from __future__ import annotations

import gc
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import make_config, make_model
from llama3.commands.chat import answer
from llama3.engine import EngineConfig
from llama3.engine.sequence import Sequence
from llama3.generate import GenerationSettings, generate_tokens
from llama3.llm import LLM
from llama3.server import create_app
from test_server import KEY, ByteTokenizer, LiveServer

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tiny_llm():
    config = make_config(vocab_size=259, max_seq_len=4096)
    return LLM(make_model(config), config, ByteTokenizer(), source="tiny")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_full_queue_is_429_in_openai_shape(tiny_llm):
    server = LiveServer(create_app(tiny_llm, "tiny", api_key=KEY, engine=EngineConfig(parallel=1, max_queued=1)))
    long = {"prompt": "a long story", "max_tokens": 3000, "temperature": 1.0, "seed": 1, "stream": True}
    slow = tiny_llm.model.norm.register_forward_hook(lambda *_: time.sleep(0.01))  # a step as slow as a real one
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=long, headers=AUTH, timeout=60) as first:
            lines = first.iter_lines()                                    # kept: closing it hangs up
            next(line for line in lines if line)                          # running
            with httpx.stream("POST", server.url + "/v1/completions", json=long, headers=AUTH, timeout=60):
                for _ in range(400):                                      # the second one waits
                    if server.health()["queued"] == 1:
                        break
                    threading.Event().wait(0.05)
                health = server.health()
                assert health["running"] == 1 and health["queued"] == 1
                third = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                                   json={"prompt": "hi", "max_tokens": 2})
                assert third.status_code == 429
                error = third.json()["error"]
                assert error["code"] == "rate_limit_exceeded" and "--max-queued" in error["message"]
        health = server.wait_idle()
        assert health["kv_blocks_used"] == 0 and {"kv_blocks_free", "prefix_cache_hits"} <= set(health)
    finally:
        slow.remove()
        server.stop()


def test_memory_returns_after_200_requests_and_20_disconnects(tiny_llm):
    server = LiveServer(create_app(tiny_llm, "tiny", api_key=KEY, engine=EngineConfig(kv_memory="2MB")))
    engine = server.app.state.queue.engine
    client = httpx.Client(base_url=server.url, headers=AUTH, timeout=120)  # one client: no TLS set-up per request

    def ask(i):
        body = {"prompt": f"request {i}: tell me", "max_tokens": 3, "temperature": 0.7, "seed": i}
        return client.post("/v1/completions", json=body).status_code

    try:
        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(ask, range(20))) == {200}                 # warm-up
        gc.collect()
        before = rss_bytes()
        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(ask, range(200))) == {200}
        cancelled = server.health()["cancelled"]
        for i in range(20):                                               # read one event, hang up
            body = {"prompt": f"gone {i}", "max_tokens": 3000, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as r:
                next(line for line in r.iter_lines() if line)
        health = server.wait_idle()
        gc.collect()
        after = rss_bytes()
        assert health["cancelled"] == cancelled + 20
        assert health["kv_blocks_used"] == 0 and not engine.running and not engine.waiting
        assert not [o for o in gc.get_objects() if type(o) is Sequence]
        assert after - before < 32 << 20, f"RSS grew by {(after - before) >> 20} MiB"
    finally:
        client.close()
        server.stop()


def test_chat_turn_two_reuses_turn_one(tiny_llm):
    settings = GenerationSettings(max_new_tokens=20, temperature=0)
    messages = [{"role": "system", "content": "You are terse. " * 4}, {"role": "user", "content": "Hello there"}]
    record: dict = {}
    reply = answer(tiny_llm, messages, settings, out=io.StringIO(), record=record)
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And again?"}]
    turn_one = len(record["prompt_ids"])
    reply = answer(tiny_llm, messages, settings, out=io.StringIO(), record=record)
    assert record["cached_tokens"] >= turn_one - 16                       # all its full blocks
    want = generate_tokens(tiny_llm.model, [record["prompt_ids"]], settings)
    for _ in want:
        pass
    assert record["answer_ids"] == want.tokens[0]


def test_real_model_crowd_equals_each_alone(default_llm):
    """SmolLM2: three prompts of different lengths decoded together give each one's greedy answer alone."""
    tok, settings = default_llm.tokenizer, GenerationSettings(max_new_tokens=6)
    prompts = [tok.encode(text) for text in ("The capital of France is", "1, 2, 3,",
                                             "A very long time ago, in a small village by the sea, there lived")]
    got = default_llm.engine.run(prompts, settings)
    for prompt, result in zip(prompts, got):
        want = generate_tokens(default_llm.model, [prompt], settings, tok.stop_ids)
        for _ in want:
            pass
        assert result.token_ids == want.tokens[0]
