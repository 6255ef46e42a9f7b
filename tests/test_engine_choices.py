"""n choices of one prompt (llama3/engine/scheduler.py `_fork`): the prompt is prefilled once and
its KV blocks shared; each choice gives the tokens of the same prompt run alone with its seed,
and the request holds ~1 prompt + n continuations of KV, not n prompts."""

from __future__ import annotations

import pytest
import torch

from conftest import make_config, make_model
from llama3.engine import Engine, EngineConfig
from llama3.generate import GenerationSettings, generate_tokens, row_seeds
from llama3.sampling import Sampler


def prompt_of(n, seed=1):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def samplers(settings, prompt, seeds):
    return [Sampler.from_settings(settings, 101, prompt_ids=prompt, seed=seed) for seed in seeds]


def alone(model, prompt, settings, seed):
    """The reference: the readable model's own generation (contiguous KVCache), one sequence."""
    run = generate_tokens(model, [prompt], settings, samplers=samplers(settings, prompt, [seed]))
    for _ in run:
        pass
    return run.tokens[0]


@pytest.mark.parametrize("length", [37, 32])   # a partial last prompt block (copied), or none
@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=12),
                                      GenerationSettings(max_new_tokens=12, temperature=1.0, top_k=30, seed=7)],
                         ids=["greedy", "seeded"])
def test_n_choices_equal_separate_requests_and_share_the_prompt(settings, length):
    model = make_model(make_config(max_seq_len=256))
    prompt = prompt_of(length)
    seeds = row_seeds(settings.seed, 4)
    engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=8, prefix_cache=False))
    request = engine.submit([prompt] * 4, settings, lambda events: None, samplers=samplers(settings, prompt, seeds))
    computed, peak = [], 0
    forward = engine.forward
    engine.forward = lambda tokens, rows, want: computed.append(tokens.shape[1]) or forward(tokens, rows, want)
    while engine.step():
        peak = max(peak, engine.pool.held)
    engine.forward = forward
    got = [r.token_ids for r in request.results]
    assert got == [alone(model, prompt, settings, seed) for seed in seeds]
    if settings.seed is not None:
        assert len({tuple(t) for t in got}) > 1           # seeded choices differ from each other
    # the prompt went through the model once: its tokens, then one token per choice per step
    assert computed[0] == length and all(n <= 4 for n in computed[1:])
    full = length // 8
    continuation = -(-(length + 11) // 8) - full          # each choice's own blocks (the 12th token is never fed)
    assert peak == full + 4 * continuation                # one prompt + 4 continuations
    assert engine.pool.held == 0


def test_n_choices_report_the_prompts_cached_tokens_once_and_survive_a_tiny_budget():
    """A cached prefix is reported once per choice by the engine (the server counts a prompt once),
    and with too few blocks to fork the choices still each give their own answer."""
    model = make_model(make_config(max_seq_len=256))
    prompt = prompt_of(40)
    settings = GenerationSettings(max_new_tokens=6)
    engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=8))
    engine.run([prompt + [3]], GenerationSettings(max_new_tokens=1))
    results = engine.run([prompt + [4]] * 3, settings)
    assert [r.cached_tokens for r in results] == [40] * 3
    assert engine.stats()["prefix_cache_hits"] == 1
    want = alone(model, prompt + [4], settings, None)
    assert all(r.token_ids == want for r in results)
    # 8 blocks of 4 tokens: the 3 choices of a 14-token prompt cannot all fork and hold their own
    small = Engine(model, None, EngineConfig(kv_memory=8 * 4 * 2 * 2 * 2 * 16 * 4, block_size=4, parallel=3))
    assert small.pool.n_blocks == 8
    prompt = prompt_of(14, seed=2)
    seeds = row_seeds(5, 3)
    sampled = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=5)
    results = small.run([prompt] * 3, sampled, samplers=samplers(sampled, prompt, seeds))
    assert [r.token_ids for r in results] == [alone(model, prompt, sampled, seed) for seed in seeds]
    assert small.pool.held == 0


@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=40),
                                      GenerationSettings(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=11)],
                         ids=["greedy", "seeded"])
def test_engine_sized_for_one_request_gives_the_one_batch_generators_tokens(settings):
    """`llama3 generate`'s engine (Engine.sized_for: KV for just this request) runs it to the end
    without preempting and gives what TokenGeneration (the path before the engine) gives."""
    model = make_model(make_config(max_seq_len=256))
    prompt = prompt_of(29, seed=4)
    engine = Engine.sized_for(model, None, [prompt], settings)
    assert engine.pool.n_blocks * engine.pool.block_size < 29 + 40 + 2 * engine.pool.block_size
    result = engine.run([prompt], settings)[0]
    assert result.token_ids == alone(model, prompt, settings, settings.seed)
    assert result.finish_reason == "length" and engine.preemptions == 0
    assert result.decode_steps == 39 and result.prefill_seconds > 0
