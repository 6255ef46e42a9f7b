"""The sampling controls and tokenizer endpoints of the server on a tiny random model:
n choices, logit_bias, presence/frequency penalties, seeds, token-id prompts, /tokenize, /detokenize,
the model card, and the refusals that go with them."""

from __future__ import annotations

import httpx
import pytest

from conftest import make_config, make_model
from llama3.generate import GenerationSettings, TextGeneration, row_seeds
from llama3.llm import LLM
from llama3.sampling import Sampler
from llama3.server import create_app
from test_server import KEY, ByteTokenizer, LiveServer, assert_error, post


class PiecesByteTokenizer(ByteTokenizer):
    def id_to_piece(self, i):
        return self.decode([i])

    def token_bytes(self, i):
        return bytes([i]) if i < 256 else self.decode([i]).encode()


@pytest.fixture(scope="module")
def tiny_llm():
    config = make_config(vocab_size=259, max_seq_len=2048)
    return LLM(make_model(config, seed=1), config, PiecesByteTokenizer(), source="tiny")


@pytest.fixture(scope="module")
def tiny(tiny_llm):
    server = LiveServer(create_app(tiny_llm, "tiny", api_key=KEY))
    yield server
    server.stop()


def complete(server, **body) -> dict:
    response = post(server, "/v1/completions", {"max_tokens": 8, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_n_choices_share_the_prompt_and_differ(tiny):
    one = complete(tiny, prompt="hello", temperature=1.0, seed=4)
    three = complete(tiny, prompt="hello", temperature=1.0, seed=4, n=3)
    texts = [c["text"] for c in three["choices"]]
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert texts[0] == one["choices"][0]["text"] and len(set(texts)) == 3
    assert three["usage"] == {"prompt_tokens": 5, "completion_tokens": 24, "total_tokens": 29,
                              "prompt_tokens_details": {"cached_tokens": 0}}  # 5 tokens: no full block to cache
    two_by_two = complete(tiny, prompt=["hello", "other"], temperature=1.0, seed=4, n=2)
    other = complete(tiny, prompt="other", temperature=1.0, seed=4)
    assert [c["text"] for c in two_by_two["choices"]][:2] == texts[:2]
    assert two_by_two["choices"][2]["text"] == other["choices"][0]["text"]


def test_streamed_chat_choices_equal_whole(tiny):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 1.0, "seed": 2, "n": 2}
    whole = post(tiny, "/v1/chat/completions", body).json()
    with httpx.stream("POST", tiny.url + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        import json
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = ["", ""]
    for event in events:
        for choice in event["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content") or ""
    assert streamed == [c["message"]["content"] for c in whole["choices"]]
    assert {e["choices"][0]["index"] for e in events if e["choices"][0]["delta"].get("role")} == {0, 1}


def test_logit_bias_bans_and_forces(tiny):
    banned = complete(tiny, prompt="abc", max_tokens=300, temperature=1.5, seed=0, logit_bias={"97": -100})
    assert "a" not in banned["choices"][0]["text"] and len(banned["choices"][0]["text"]) > 100
    forced = complete(tiny, prompt="abc", max_tokens=40, temperature=1.5, seed=0, logit_bias={"98": 100})
    assert forced["choices"][0]["text"] == "b" * 40
    assert_error(post(tiny, "/v1/completions", {"prompt": "x", "logit_bias": {"999": 1}}), 400, "logit_bias")
    assert_error(post(tiny, "/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}), 400, "logit_bias")
    assert_error(post(tiny, "/v1/completions", {"prompt": "x", "logit_bias": {"1": 101}}), 400, "logit_bias")


def test_penalties_reach_each_sequence_sampler(tiny, tiny_llm):
    body = dict(prompt="the the the", temperature=0.9, seed=7, presence_penalty=1.5, frequency_penalty=0.8, n=2,
                max_tokens=12)
    got = [c["text"] for c in complete(tiny, **body)["choices"]]
    settings = GenerationSettings(max_new_tokens=12, temperature=0.9, seed=7, presence_penalty=1.5,
                                  frequency_penalty=0.8)
    ids = tiny_llm.tokenizer.encode(body["prompt"])
    samplers = [Sampler.from_settings(settings, 259, prompt_ids=ids, seed=s) for s in row_seeds(7, 2)]
    want = [c.text for c in TextGeneration(tiny_llm.model, tiny_llm.tokenizer, [ids, ids], settings,
                                           samplers=samplers).run()]
    assert got == want
    plain = [c["text"] for c in complete(tiny, **{**body, "presence_penalty": 0, "frequency_penalty": 0})["choices"]]
    assert plain != got
    assert_error(post(tiny, "/v1/completions", {"prompt": "x", "presence_penalty": 2.5}), 400, "presence_penalty")


def test_token_id_prompts_equal_text_prompts(tiny, tiny_llm):
    ids = tiny_llm.tokenizer.encode("Once upon")
    text = complete(tiny, prompt="Once upon", temperature=0)["choices"][0]["text"]
    assert complete(tiny, prompt=ids, temperature=0)["choices"][0]["text"] == text
    both = complete(tiny, prompt=[ids, ids[:4]], temperature=0)
    assert both["choices"][0]["text"] == text and both["usage"]["prompt_tokens"] == len(ids) + 4
    assert_error(post(tiny, "/v1/completions", {"prompt": [1, 2, 999]}), 400, "prompt")
    assert_error(post(tiny, "/v1/completions", {"prompt": [[]]}), 400, "prompt")
    assert_error(post(tiny, "/v1/completions", {"prompt": [1, True]}), 400, "prompt")


def test_logprobs_cover_the_text_cut_by_a_stop_string(tiny, tiny_llm):
    full = complete(tiny, prompt="abc", max_tokens=30, temperature=0)["choices"][0]["text"]
    stop = full[10:12]
    got = complete(tiny, prompt="abc", max_tokens=30, temperature=0, stop=[stop], logprobs=2)["choices"][0]
    assert "".join(got["logprobs"]["tokens"]).startswith(got["text"]) and got["finish_reason"] == "stop"
    assert len(got["logprobs"]["tokens"]) <= len(got["text"].encode()) + len(stop.encode())
    assert all(len(top) == 2 for top in got["logprobs"]["top_logprobs"])


def test_refusals_name_the_field(tiny):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(tiny, "/v1/chat/completions", {**chat, "top_logprobs": 2}), 400, "top_logprobs")
    assert_error(post(tiny, "/v1/chat/completions", {**chat, "echo": True}), 400, "echo")
    assert_error(post(tiny, "/v1/chat/completions", {**chat, "top_logprobs": 21, "logprobs": True}), 400,
                 "top_logprobs")
    assert_error(post(tiny, "/v1/completions", {"prompt": "x", "temperature": 1e-300}), 400, "temperature")


def test_tokenize_detokenize_round_trip_and_model_card(tiny, tiny_llm):
    tok = tiny_llm.tokenizer
    got = post(tiny, "/tokenize", {"prompt": "héllo<|im_end|>"}).json()
    assert got["tokens"] == tok.encode("héllo<|im_end|>", allow_special=True) and got["tokens"][-1] == 257
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 2048
    assert got["pieces"] == [tok.id_to_piece(i) for i in got["tokens"]]
    assert post(tiny, "/detokenize", {"tokens": got["tokens"]}).json() == {"prompt": "héllo<|im_end|>"}
    messages = [{"role": "user", "content": "hi"}]
    assert post(tiny, "/tokenize", {"messages": messages}).json()["tokens"] == tok.encode_chat(messages)
    assert_error(post(tiny, "/tokenize", {"prompt": "a", "messages": messages}), 400)
    assert_error(post(tiny, "/detokenize", {"tokens": [5, 300]}), 400, "tokens")
    assert_error(post(tiny, "/tokenize", {"prompt": "a"}, key=None), 401)
    info = httpx.get(tiny.url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<s>" and "im_start" in info["chat_template"]
    card = httpx.get(tiny.url + "/v1/models/tiny", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert card["max_model_len"] == card["context_length"] == 2048


def test_metrics_parse_as_prometheus_text(tiny):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(tiny.url + "/metrics").text  # no key needed, like /health
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.labels.get("endpoint", "completions") == "completions" and not s.labels.get("le")}

    before = scrape()
    complete(tiny, prompt="hello", max_tokens=5, temperature=0, stream=False)
    tiny.wait_idle()
    after = scrape()
    assert after["llama3_requests_total"] == before.get("llama3_requests_total", 0) + 1
    assert after["llama3_prompt_tokens_total"] - before.get("llama3_prompt_tokens_total", 0) == 5
    assert after["llama3_cache_kv_blocks_total"] > 0 and "llama3_cache_prefix_cache_hits" in after
    assert after["llama3_generation_tokens_total"] - before.get("llama3_generation_tokens_total", 0) == 5
    assert after["llama3_time_to_first_token_seconds_count"] == before.get(
        "llama3_time_to_first_token_seconds_count", 0) + 1
    assert after["llama3_time_per_output_token_seconds_count"] >= 1
    assert after["llama3_queue_depth"] == 0 and after["llama3_running_sequences"] == 0
    # the engine's KV memory (the cache_stats hook): nothing held once idle; a repeated prompt hits the prefix cache
    assert after["llama3_cache_kv_blocks_used"] == 0
    assert after["llama3_cache_kv_blocks_free"] == after["llama3_cache_kv_blocks_total"] > 0
    for _ in range(2):
        complete(tiny, prompt="a prompt longer than one block of sixteen", max_tokens=2, temperature=0)
    tiny.wait_idle()
    assert scrape()["llama3_cache_prefix_cache_hits"] >= after["llama3_cache_prefix_cache_hits"] + 1


def test_metrics_count_the_kernel_pools_calls_and_calls_on_one_thread():
    """/metrics carries the C++ kernels' thread-pool counters once they are loaded (a busy machine
    shows as calls run on one thread): each kernel call counts, and the four are counters."""
    from prometheus_client.parser import text_string_to_metric_families

    from llama3.fast import kernels
    from llama3.server_api.metrics import Metrics

    ops = kernels.library()
    if ops is None:
        pytest.skip(f"C++ kernels not built: {kernels.build_error()}")

    class Idle:
        def stats(self):
            return {"queued": 0, "running": 0}

    metrics = Metrics(Idle())

    def scrape() -> dict:
        families = text_string_to_metric_families(metrics.exposition().decode())
        return {f.name: (f.type, f.samples[0].value) for f in families if f.name.startswith("llama3_kernel")}

    before = scrape()
    assert set(before) == {"llama3_kernel_calls", "llama3_kernel_calls_one_thread", "llama3_kernel_waits",
                           "llama3_kernel_lost_seconds"} and all(kind == "counter" for kind, _ in before.values())
    for _ in range(3):
        ops.pool_cover(4096, 64, 2)                     # three calls through the pool
    after = scrape()
    assert after["llama3_kernel_calls"][1] >= before["llama3_kernel_calls"][1] + 3
    assert after["llama3_kernel_calls_one_thread"][1] >= before["llama3_kernel_calls_one_thread"][1]
