"""Log-probabilities over HTTP equal log_softmax of transformers' logits on the same GGUF (within 1e-3):
the chosen and the top-K tokens of /v1/completions and /v1/chat/completions, and the echoed prompt."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from llama3.server import create_app
from test_server import LiveServer

REAL = "smollm2-135m-instruct"
TOL = 1e-3


@pytest.fixture(scope="module")
def server(default_llm):
    live = LiveServer(create_app(default_llm, REAL))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reference_logprobs(transformers_gguf):
    """ids -> log_softmax [T, V] of transformers' own model, loaded from the same GGUF file (conftest's)."""
    model = transformers_gguf[0]

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return logprobs


def test_completion_logprobs_and_echo_equal_transformers(server, default_llm, reference_logprobs):
    tok = default_llm.tokenizer
    prompt = "The capital of France is"
    got = server.client().completions.create(model=REAL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                             echo=True)
    choice = got.choices[0]
    prompt_ids = tok.encode(prompt)
    new_ids = tok.encode(choice.text[len(prompt):])  # greedy text of these ids re-encodes to them here
    ids = prompt_ids + new_ids
    assert choice.text.startswith(prompt) and len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.tokens == [tok.decode([i]) for i in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    reference = reference_logprobs(ids)                                   # [T, V]: row t predicts token t+1
    for t in range(1, len(ids)):
        want = reference[t - 1]
        assert math.isclose(choice.logprobs.token_logprobs[t], want[ids[t]].item(), abs_tol=TOL), t
        best = want.topk(3)
        top = choice.logprobs.top_logprobs[t]
        assert list(top) == [tok.decode([i]) for i in best.indices.tolist()], t
        assert all(math.isclose(a, b, abs_tol=TOL) for a, b in zip(top.values(), best.values.tolist()))
        if t >= len(prompt_ids):  # a generated token: greedy, so it is the top one
            assert ids[t] == best.indices[0].item()
    offsets = choice.logprobs.text_offset
    assert [choice.text[a:b] for a, b in zip(offsets, offsets[1:] + [len(choice.text)])] == choice.logprobs.tokens


def test_echo_with_max_tokens_0_scores_the_prompt_only(server, default_llm, reference_logprobs):
    """What lm-evaluation-harness sends for a log-likelihood: token ids, echo, logprobs, no new tokens."""
    ids = default_llm.tokenizer.encode("Paris is the capital of France.")
    body = {"model": REAL, "prompt": [ids, ids[:4]], "max_tokens": 0, "echo": True, "logprobs": 1,
            "temperature": 0}
    got = httpx.post(server.url + "/v1/completions", json=body, timeout=300).json()
    assert [c["finish_reason"] for c in got["choices"]] == ["length", "length"]
    assert got["usage"]["completion_tokens"] == 0 and got["usage"]["prompt_tokens"] == len(ids) + 4
    reference = reference_logprobs(ids)
    for choice, n in zip(got["choices"], (len(ids), 4)):
        scores = choice["logprobs"]["token_logprobs"]
        assert len(scores) == n and scores[0] is None
        want = [reference[t - 1, ids[t]].item() for t in range(1, n)]
        assert all(math.isclose(a, b, abs_tol=TOL) for a, b in zip(scores[1:], want))
        assert choice["text"] == default_llm.tokenizer.decode(ids[:n])


def test_chat_logprobs_equal_transformers_streamed_or_not(server, default_llm, reference_logprobs):
    tok = default_llm.tokenizer
    messages = [{"role": "user", "content": "Name a colour."}]
    settings = dict(model=REAL, messages=messages, max_tokens=8, temperature=0.8, seed=3, logprobs=True,
                    top_logprobs=2)
    whole = server.client().chat.completions.create(**settings)
    content = whole.choices[0].logprobs.content
    assert b"".join(bytes(c.bytes) for c in content).decode() == whole.choices[0].message.content
    by_bytes = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    new_ids = [by_bytes[bytes(c.bytes)] for c in content]
    assert all(c.token == tok.decode([i]) for c, i in zip(content, new_ids))
    prompt = tok.encode_chat(messages)
    reference = reference_logprobs(prompt + new_ids)
    for k, entry in enumerate(content):
        want = reference[len(prompt) + k - 1]
        assert math.isclose(entry.logprob, want[new_ids[k]].item(), abs_tol=TOL)
        best = want.topk(2)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in best.indices.tolist()]
        assert all(math.isclose(t.logprob, b, abs_tol=TOL) for t, b in zip(entry.top_logprobs, best.values.tolist()))
    chunks = list(server.client().chat.completions.create(**settings, stream=True))
    streamed = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    # the same tokens; the log-probabilities agree to rounding (the second request reads the prompt's
    # KV blocks from the engine's prefix cache instead of prefilling them again)
    assert [c.token for c in streamed] == [c.token for c in content]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-5) for a, b in zip(streamed, content))
