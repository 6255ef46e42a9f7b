"""Recorded decoding steps (llama3/fast/graph.py) replay exactly what model.py's forward computes:
the same logits bit for bit, the same cache contents, for one sequence and for a left-padded batch;
and they notice when what the forward would do has changed."""

import copy

import pytest
import torch

from conftest import make_config, make_model
from llama3.fast import graph, kernels, speed_up
from llama3.generate import GenerationSettings, generate_tokens
from llama3.model import KVCache, RMSNorm


def pair(dtype=torch.float32):
    if kernels.library() is None:
        pytest.skip(f"no C++ kernels here: {kernels.build_error()}")
    model = make_model(make_config(n_layers=3), seed=4).to(dtype)
    fast = speed_up(copy.deepcopy(model))
    assert graph.graphs_of(fast) is not None, "the C++ plan records decoding steps"
    eager = copy.deepcopy(fast)
    del eager.forward                                                 # the same kernels, model.py's forward each step
    assert graph.graphs_of(eager) is None
    return fast, eager


@pytest.fixture
def fast_and_eager():
    return pair()


def steps(model, cache, n=10, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        out = [model(torch.randint(0, 101, (batch, 4), generator=gen), 0, cache, last_only=True)]
        for pos in range(4, 4 + n):
            out.append(model(torch.randint(0, 101, (batch, 1), generator=gen), pos, cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_steps_equal_the_eager_forward_bit_for_bit(dtype):
    fast, eager = pair(dtype)
    caches = [KVCache(fast.config, 2, 24, dtype=dtype) for _ in range(2)]
    got, want = steps(fast, caches[0], batch=2), steps(eager, caches[1], batch=2)
    assert graph.graphs_of(fast).replays == 10
    assert torch.equal(got, want)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    longer = [KVCache(fast.config, 2, 40, dtype=dtype) for _ in range(2)]  # another cache length: the same record
    assert torch.equal(steps(fast, longer[0], batch=2, seed=1), steps(eager, longer[1], batch=2, seed=1))
    assert len(graph.graphs_of(fast).records) == 1


def test_generation_with_padding_and_sampling_gives_the_eager_tokens(fast_and_eager):
    fast, eager = fast_and_eager
    for prompts, settings in (([[3, 1, 4]], GenerationSettings(max_new_tokens=12)),
                              ([[3, 1, 4], [5], [9, 2]], GenerationSettings(max_new_tokens=8, temperature=0.9,
                                                                           top_p=0.9, seed=3))):
        want, got = generate_tokens(eager, prompts, settings), generate_tokens(fast, prompts, settings)
        list(want), list(got)
        assert got.tokens == want.tokens
    assert graph.graphs_of(fast).replays > 0


def test_a_changed_forward_a_refilled_slot_or_a_hook_is_seen(fast_and_eager, monkeypatch):
    fast, eager = fast_and_eager
    run = lambda m: steps(m, KVCache(m.config, 1, 16), n=4)
    before = run(fast)
    original = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: 2 * original(self, x))  # what model.py computes changed
    changed = run(fast)
    assert not torch.allclose(changed, before) and torch.equal(changed, run(eager))
    monkeypatch.undo()
    calls = []
    fast.layers[0].attention.attention_kernel = lambda q, k, v, mask: calls.append(1) or kernels.attention(q, k, v, mask)
    replays = graph.graphs_of(fast).replays
    run(fast)
    assert len(calls) == 5 and graph.graphs_of(fast).replays == replays  # the prompt, then eager each step
    fast.layers[0].attention.attention_kernel = kernels.attention
    seen = []
    handle = fast.layers[1].feed_forward.hidden.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    run(fast)
    assert len(seen) == 5                                             # the prompt and 4 steps, all eager
    handle.remove()
    assert torch.equal(run(fast), before) and graph.graphs_of(fast).replays > replays


def test_llama3_graph_0_runs_the_eager_forward(fast_and_eager, monkeypatch):
    fast, _ = fast_and_eager
    monkeypatch.setenv("LLAMA3_GRAPH", "0")
    steps(fast, KVCache(fast.config, 1, 16), n=3)
    assert graph.graphs_of(fast).replays == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_engine_replays_its_decoding_steps_with_the_eager_tokens(dtype):
    """The engine's decoding steps over its paged cache (three sequences of different lengths, one
    joining later, greedy and seeded sampling) are recorded and replayed: the same tokens as the
    eager forward over the same kernels, and as the readable model without any plan."""
    from llama3.engine import Engine, EngineConfig

    fast, eager = pair(dtype)
    plain = make_model(make_config(n_layers=3), seed=4).to(dtype)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6] * 20]
    graph.graphs_of(fast).paged_record_after = 4  # record after a few eager steps (the default)
    runs = {}
    for name, model in (("fast", fast), ("eager", eager), ("plain", plain)):
        engine = Engine(model, None, EngineConfig(kv_memory="4MB", parallel=4, step_tokens=8))
        try:
            greedy = [r.token_ids for r in engine.run(prompts, GenerationSettings(max_new_tokens=24))]
            seeded = [r.token_ids for r in engine.run(prompts[:2], GenerationSettings(
                max_new_tokens=16, temperature=0.9, top_p=0.9, seed=5))]
        finally:
            engine.close()
        runs[name] = (greedy, seeded)
    assert graph.graphs_of(fast).replays > 20 and graph.graphs_of(fast).records  # most steps were replayed
    assert runs["fast"] == runs["eager"]
    if dtype == torch.float32:  # bf16 kernels round differently from the readable functions
        assert runs["fast"] == runs["plain"]


def test_the_engine_replays_from_its_first_steps_by_default():
    """With the default threshold a one-off request replays almost every decoding step (what
    LLM.generate and `llama3 generate` run), with the eager tokens."""
    from llama3.engine import Engine, EngineConfig

    fast, eager = pair()
    runs = {}
    for name, model in (("fast", fast), ("eager", eager)):
        engine = Engine(model, None, EngineConfig(kv_memory="4MB"))
        try:
            runs[name] = engine.run([[3, 1, 4, 1, 5]], GenerationSettings(max_new_tokens=20))[0].token_ids
        finally:
            engine.close()
    assert graph.PAGED_RECORD_AFTER <= 8
    assert graph.graphs_of(fast).replays >= 19 - graph.PAGED_RECORD_AFTER - 1
    assert runs["fast"] == runs["eager"]


def test_a_request_during_the_engine_warm_up_gets_the_eager_tokens():
    """warm_up records the one-sequence step in the engine's thread; a request submitted at once
    waits for it and runs after, replayed from its first decoding step, with the eager tokens."""
    from llama3.engine import Engine, EngineConfig

    fast, eager = pair()
    engine = Engine(fast, None, EngineConfig(kv_memory="4MB"))
    try:
        engine.warm_up()
        got = engine.run([[9, 2, 6]], GenerationSettings(max_new_tokens=12))[0].token_ids
        assert graph.graphs_of(fast).records                     # the warm-up's record (or the request's)
    finally:
        engine.close()
    reference = Engine(eager, None, EngineConfig(kv_memory="4MB"))
    try:
        want = reference.run([[9, 2, 6]], GenerationSettings(max_new_tokens=12))[0].token_ids
    finally:
        reference.close()
    assert got == want
    assert graph.graphs_of(fast).replays >= 10


def recorded_ops(model) -> list[str]:
    record = next(r for r in graph.graphs_of(model).records.values() if r is not False)
    return [n.kind() for n in record.graph.nodes()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_record_stores_and_attends_in_one_call_a_layer(dtype):
    """The record's cache writes each layer's new key/value and attends in one operator call
    (store_attend), q, k, v taken tokens first: no index_copy_ or transpose is replayed.  With an
    attention slot that is not the C++ kernel's (model.py's own SDPA), the record writes with
    index_copy_ and runs that slot over every slot, the unwritten ones masked off (SDPA rounds a
    longer row differently: the eager numbers within rounding)."""
    from llama3 import model as readable

    fast, eager = pair(dtype)
    caches = [KVCache(fast.config, 2, 24, dtype=dtype) for _ in range(2)]
    assert torch.equal(steps(fast, caches[0], batch=2), steps(eager, caches[1], batch=2))
    ops = recorded_ops(fast)
    assert ops.count("llama3::store_attend") == fast.config.n_layers
    assert "aten::index_copy_" not in ops and "aten::transpose" not in ops and "llama3::attend" not in ops
    for m in (fast, eager):
        for layer in m.layers:
            layer.attention.attention_kernel = readable.fused_attention
    caches = [KVCache(fast.config, 2, 24, dtype=dtype) for _ in range(2)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(steps(fast, caches[0], batch=2), steps(eager, caches[1], batch=2), rtol=tol, atol=tol)
    assert graph.graphs_of(fast).replays == 20
    ops = recorded_ops(fast)
    assert "llama3::store_attend" not in ops and ops.count("aten::index_copy_") == 2 * fast.config.n_layers
