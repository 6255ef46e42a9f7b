"""The engine (llama3.engine) against the readable model: many sequences in one batch give
each one's tokens alone; paged attention, prefix-cache hits and preemption change no numbers."""

from __future__ import annotations

import pytest
import torch

from conftest import make_config, make_model
from llama3.engine import Engine, EngineConfig, QueueFull
from llama3.engine.blocks import BlockPool, NoFreeBlock
from llama3.errors import Llama3Error
from llama3.generate import GenerationSettings, generate_tokens

GREEDY = GenerationSettings(max_new_tokens=10)
SEEDED = GenerationSettings(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95, seed=3)


def alone(model, prompt, settings):
    """The reference: the readable model with its contiguous KVCache, this prompt by itself."""
    run = generate_tokens(model, [prompt], settings)
    for _ in run:
        pass
    return run.tokens[0]


def prompts_of(lengths, vocab=101):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def collect(events):
    return lambda delivered: events.extend(delivered)   # the engine hands over a list at a time


@pytest.fixture
def model():
    return make_model(make_config(max_seq_len=256))


def test_crowd_equals_alone_joining_at_different_steps_one_cancelled(model):
    engine = Engine(model, None, EngineConfig(kv_memory="4MB", block_size=8, step_tokens=24))
    prompts = prompts_of([3, 17, 40, 9, 60])
    settings = [GREEDY, SEEDED, GREEDY, SEEDED, GenerationSettings(max_new_tokens=10, temperature=1.0, seed=9)]
    requests = []
    for i, (prompt, s) in enumerate(zip(prompts, settings)):  # a new request joins every other step
        requests.append(engine.submit([prompt], s, collect([])))
        engine.step()
        engine.step()
        if i == 3:
            requests[2].cancel()                                  # mid-way through its answer
    victim = engine.submit([prompts[0]], GenerationSettings(max_new_tokens=50), collect([]))
    engine.step()
    victim.cancel()
    while engine.step():
        pass
    for i in (0, 1, 3, 4):
        assert requests[i].results[0].token_ids == alone(model, prompts[i], settings[i]), i
    assert requests[2].results[0].finish_reason == "cancelled"
    assert 0 < len(requests[2].results[0].token_ids) < 10
    assert victim.results[0].finish_reason == "cancelled"
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["cancelled"] == 2


def test_paged_attention_equals_the_readable_forward(model):
    """Two sequences side by side in scattered blocks, prefilled in uneven chunks: every
    position's logits equal the readable model's forward over each sequence alone (no cache)."""
    engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=4))
    a, b = prompts_of([23, 14])
    tables = [[9, 2, 30, 5, 17, 11], [1, 40, 22, 8]]
    got_a, got_b = [], []
    # chunk plan: (a's range, b's range or None) per forward
    plan = [((0, 5), (0, 9)), ((5, 6), (9, 14)), ((6, 23), None)]
    for ra, rb in plan:
        rows, tokens = [(tables[0], *ra)], a[ra[0]:ra[1]]
        if rb is not None:
            rows.append((tables[1], *rb))
            tokens = tokens + b[rb[0]:rb[1]]
        logits = engine.forward(torch.tensor([tokens]), rows, list(range(len(tokens))))
        got_a.append(logits[:ra[1] - ra[0]])
        if rb is not None:
            got_b.append(logits[ra[1] - ra[0]:])
    with torch.no_grad():
        want_a, want_b = model(torch.tensor([a]))[0], model(torch.tensor([b]))[0]
    torch.testing.assert_close(torch.cat(got_a), want_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(got_b), want_b, atol=2e-5, rtol=1e-4)


def first_logits(engine: Engine, prompt):
    """Run prompt for one token through the engine; the logits its first token came from."""
    seen = []
    forward = engine.forward
    engine.forward = lambda *args: seen.append(forward(*args)) or seen[-1]
    request = engine.submit([prompt], GenerationSettings(max_new_tokens=1), collect([]))
    while engine.step():
        pass
    engine.forward = forward
    return seen[-1][0], request.results[0]


def test_prefix_cache_hit_gives_the_logits_of_a_cold_prefill(model):
    system, question = prompts_of([37, 6])
    warm = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=8))
    first_logits(warm, system + [5])                       # computes and caches the blocks of `system`
    hit, result = first_logits(warm, system + question)
    cold, cold_result = first_logits(Engine(model, None, EngineConfig(kv_memory="1MB", block_size=8,
                                                                      prefix_cache=False)), system + question)
    assert result.cached_tokens == 32 and cold_result.cached_tokens == 0   # 4 full blocks of the 37
    assert warm.stats()["prefix_cache_hits"] == 1
    torch.testing.assert_close(hit, cold, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(hit, model(torch.tensor([system + question]))[0, -1], atol=2e-5, rtol=1e-4)


def test_tiny_budget_preempts_and_evicts_without_corrupting_anyone(model):
    """10 blocks of 4 tokens for 4 requests of ~30 tokens each: sequences are preempted and
    recomputed, cached blocks are evicted, and every answer is still its answer alone."""
    engine = Engine(model, None, EngineConfig(kv_memory=10 * 4 * 2 * 2 * 2 * 16 * 4, block_size=4, parallel=4))
    assert engine.pool.n_blocks == 10
    prompts = prompts_of([7, 12, 5, 9])
    settings = GenerationSettings(max_new_tokens=18)
    requests = [engine.submit([p], settings if i % 2 else SEEDED, collect([])) for i, p in enumerate(prompts)]
    while engine.step():
        pass
    for i, (request, prompt) in enumerate(zip(requests, prompts)):
        want = alone(model, prompt, settings if i % 2 else SEEDED)
        assert request.results[0].token_ids == want, i
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_evictions"] > 0 and stats["kv_blocks_used"] == 0


def test_a_sequence_bigger_than_the_whole_budget_ends_with_length(model):
    engine = Engine(model, None, EngineConfig(kv_memory=3 * 4 * 2 * 2 * 2 * 16 * 4, block_size=4))
    request = engine.submit(prompts_of([5]), GenerationSettings(max_new_tokens=40), collect([]))
    while engine.step():
        pass
    # 12 positions: the 5 of the prompt and 7 answer tokens fill them; the 8th is sampled, not stored
    assert request.results[0].finish_reason == "length" and len(request.results[0].token_ids) == 12 - 5 + 1
    with pytest.raises(Llama3Error, match="KV cache holds 12"):
        engine.submit(prompts_of([20]), GREEDY, collect([]))


def test_queue_full_and_bad_values(model):
    engine = Engine(model, None, EngineConfig(kv_memory="1MB", max_queued=2))
    engine.submit([[1, 2]], GREEDY, collect([]))
    engine.submit([[3]], GREEDY, collect([]))
    with pytest.raises(QueueFull, match="--max-queued"):
        engine.submit([[4]], GREEDY, collect([]))
    for bad in ("lots", "0", "150%"):
        with pytest.raises(Llama3Error, match="--kv-memory"):
            Engine(model, None, EngineConfig(kv_memory=bad))
    with pytest.raises(Llama3Error, match="parallel"):
        EngineConfig(parallel=0)


def test_kv_memory_grows_with_tokens_not_with_the_context(model):
    """32 short prompts hold ~32x the blocks of one, not 32 contexts' worth."""
    engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=8, parallel=32))
    engine.submit(prompts_of([10]), GREEDY, collect([]))
    engine.step()
    one = engine.stats()["kv_blocks_used"]
    engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=8, parallel=32, prefix_cache=False,
                                             step_tokens=512))
    engine.submit(prompts_of([10] * 32), GREEDY, collect([]))
    engine.step()
    assert one == 2 and engine.stats()["kv_blocks_used"] == 32 * one


def test_block_pool_refcounts_and_lru():
    pool = BlockPool(3, 4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    with pytest.raises(NoFreeBlock):
        pool.allocate()
    pool.register(a, b"A")
    pool.register(b, b"B")
    pool.release(a)
    pool.release(b)                          # both idle now, a the least recently used
    assert pool.lookup(b"B") == b            # held again
    assert pool.allocate() == a and pool.lookup(b"A") is None   # a evicted for a new block
    pool.release(b)
    pool.release(c)
    assert pool.available == 2 and pool.stats()["prefix_cache_blocks"] == 1


def test_a_streams_events_are_handed_over_together_within_the_interval(model):
    """The first event goes at once, later ones wait up to stream_interval and go together (one
    wake-up of the reader for several tokens), the end flushes what waits; the events are the
    same, in the same order, as when every one is handed over alone (interval 0)."""
    import time

    def deliveries(interval, pause_after_step=None):
        engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=8, stream_interval=interval))
        got = []
        request = engine.submit(prompts_of([5]), GREEDY, got.append)
        step = 0
        while engine.step():
            step += 1
            if step == pause_after_step:
                time.sleep(interval + 0.01)   # the interval is up: the next step hands the waiting over
        assert not engine._undelivered and request.closed
        return got

    each = deliveries(0.0)
    assert [len(d) for d in each] == [1] * len(each) and len(each) == 10 + 2   # 10 tokens, the end, None
    held = deliveries(1.0)   # the tiny model's 10 steps take far less than a second
    assert [len(d) for d in held] == [1, 11]
    assert sum(held, []) == sum(each, []) and each[-1] == [None]
    assert each[-2][0][:3] == ("end", 0, "length")
    due = deliveries(0.05, pause_after_step=3)   # tokens 2-3 wait; after the pause step 4 hands over 2-4
    assert [len(d) for d in due][:2] == [1, 3] and sum(due, []) == sum(each, [])
    with pytest.raises(Llama3Error, match="stream_interval"):
        EngineConfig(stream_interval=-1)
