"""Attention over the paged KV cache (llama3/engine/paged_cache.py, llama3/fast/paged_attention.cpp)
against the readable model: the C++ kernel and its PyTorch twin give model.py's attention, for
sequences of different lengths in one call, prompt chunks, decoding steps and prefix-cache hits."""

from __future__ import annotations

import pytest
import torch

from conftest import make_config, make_model
from llama3.engine import Engine, EngineConfig
from llama3.engine.paged_cache import PagedKVCache, paged_attention_torch, paged_kernel
from llama3.generate import GenerationSettings
from llama3.model import Attention

KERNEL = paged_kernel(torch.device("cpu"), torch.float32)
PATHS = [pytest.param(True, id="C++", marks=pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")),
         pytest.param(False, id="PyTorch")]


# Pool layouts the kernel reads: the engine's (each head's blocks one after the other, indexed
# block-first through a transposed view) and a contiguous [n_blocks, Hkv, block_size, Dh]
LAYOUTS = ["head-major", "by-block"]


def pool_of(layout, n_blocks, kv_heads, size, dh, gen, dtype):
    """Random keys [n_blocks, Hkv, block_size, Dh] stored in `layout`."""
    if layout == "head-major":
        return torch.randn(kv_heads, n_blocks, size, dh, generator=gen).to(dtype).transpose(0, 1)
    return torch.randn(n_blocks, kv_heads, size, dh, generator=gen).to(dtype)


def prompts_of(lengths, vocab=101, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_steps(engine, seqs, tables, steps):
    """Each step's spans (or None) of each sequence through engine.forward side by side -> each
    sequence's logits rows, in position order."""
    got = [[] for _ in seqs]
    for step in steps:
        rows, tokens, owners = [], [], []
        for i, span in enumerate(step):
            if span is not None:
                rows.append((tables[i], *span))
                tokens += seqs[i][span[0]:span[1]]
                owners += [i] * (span[1] - span[0])
        logits = engine.forward(torch.tensor([tokens]), rows, list(range(len(tokens))))
        for i, row_logits in zip(owners, logits):
            got[i].append(row_logits)
    return got


def reference(attention: Attention, q, k, v):
    """model.py's explicit attention of one sequence: q [T, H, Dh] the last T of k, v [S, Hkv, Dh]."""
    return attention.explicit_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                        v.transpose(0, 1)[None])[0].transpose(0, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernel", PATHS)
def test_paged_attend_equals_model_attention_per_sequence(use_kernel, dtype, layout):
    """Three sequences in scattered blocks of 4: one decoding token, a prompt chunk mid-way, a
    first chunk; grouped-query heads (H 6, Hkv 2); the pool in either layout."""
    config = make_config(dim=48, n_heads=6, n_kv_heads=2)
    attention = Attention(config, 0)
    size, heads, kv_heads, dh = 4, 6, 2, 8
    gen = torch.Generator().manual_seed(0)
    keys = pool_of(layout, 40, kv_heads, size, dh, gen, dtype)              # [n_blocks, Hkv, block_size, Dh]
    values = pool_of(layout, 40, kv_heads, size, dh, gen, dtype)
    rows = [([7, 3, 33, 12, 20], 17, 18), ([0, 25, 9], 5, 11), ([38, 14], 0, 6)]  # (table, begin, end)
    n = sum(end - begin for _, begin, end in rows)
    q = torch.randn(n, heads, dh, generator=gen).to(dtype)
    if use_kernel:
        tables = torch.tensor([t + [0] * (5 - len(t)) for t, _, _ in rows])
        query_row = torch.tensor([r for r, (_, b, e) in enumerate(rows) for _ in range(b, e)])
        query_pos = torch.tensor([p for _, b, e in rows for p in range(b, e)])
        got = KERNEL.paged_attend(q, keys, values, tables, query_row, query_pos, size)
    else:
        got = paged_attention_torch(q, keys, values, rows, size)
    first = 0
    for table, begin, end in rows:
        blocks, offsets = [table[p // size] for p in range(end)], [p % size for p in range(end)]
        k, v = keys[blocks, :, offsets].float(), values[blocks, :, offsets].float()     # [S, Hkv, Dh]
        want = reference(attention, q[first:first + end - begin].float(), k, v)
        tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got[first:first + end - begin].float(), want, **tol)
        first += end - begin


@pytest.mark.parametrize("use_kernel", PATHS)
def test_engine_prefill_chunks_and_decoding_equal_the_readable_forward(use_kernel):
    """Three prompts of different lengths prefilled in uneven chunks, then decoded together
    token by token (teacher-forced): every position's logits equal the readable model over each
    sequence alone, with no cache."""
    model = make_model(make_config(max_seq_len=256))
    engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=4))
    if not use_kernel:
        engine.cache.kernel = None
    seqs = prompts_of([30, 9, 17])
    prompt_len = [21, 5, 11]                                # the rest is decoded one token at a time
    tables = [[9, 2, 30, 5, 17, 11, 50, 41], [1, 40, 22], [3, 60, 61, 7, 8]]
    steps = [[(0, 13), (0, 5), None], [(13, 21), None, (0, 11)]]    # prompt chunks
    steps += [[(p, p + 1) if p < len(s) else None for p, s in zip(pos, seqs)]
              for pos in zip(*(range(n, n + 9) for n in prompt_len))]  # decoding steps
    got = run_steps(engine, seqs, tables, steps)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            n = len(got[i])
            torch.testing.assert_close(torch.stack(got[i]), model(torch.tensor([s[:n]]))[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("use_kernel", PATHS)
def test_prefix_hit_then_decoding_equals_a_cold_run(use_kernel):
    """A second request that starts with a cached prefix decodes the same greedy tokens, from the
    same logits, as a cold engine and as the readable model's own generation."""
    from llama3.generate import generate_tokens

    model = make_model(make_config(max_seq_len=256))
    system, question = prompts_of([37, 6])
    settings = GenerationSettings(max_new_tokens=12)
    engines = []
    for cache in (True, False):
        engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=8, prefix_cache=cache))
        if not use_kernel:
            engine.cache.kernel = None
        engine.run([system + [5]], GenerationSettings(max_new_tokens=1))
        engines.append(engine)
    warm, cold = (e.run([system + question], settings)[0] for e in engines)
    assert warm.cached_tokens == 32 and cold.cached_tokens == 0
    run = generate_tokens(model, [system + question], settings)
    for _ in run:
        pass
    assert warm.token_ids == cold.token_ids == run.tokens[0]


def test_explicit_attention_path_still_reads_the_blocks():
    """With `Attention.fused = False` (inspection hooks) the engine falls back to `update` and the
    step's mask: the same tokens as the fused path."""
    model = make_model(make_config(max_seq_len=256))
    prompts = prompts_of([11, 26])
    settings = GenerationSettings(max_new_tokens=8)
    fused = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=4)).run(prompts, settings)
    for layer in model.layers:
        layer.attention.fused = False
    explicit = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=4)).run(prompts, settings)
    assert [r.token_ids for r in fused] == [r.token_ids for r in explicit]


@pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")
def test_recorded_engine_steps_equal_the_readable_forward():
    """The engine's decoding steps replayed from a record (llama3/fast/graph.py over the pool's
    per-layer views) give the readable model's logits, for one sequence and for two side by side,
    across a block boundary; and they did replay."""
    import copy

    from llama3.fast import graph
    from llama3.fast.plan import apply_plan, choose_plan

    readable = make_model(make_config(max_seq_len=256))
    model = apply_plan(copy.deepcopy(readable), choose_plan(readable))
    records = graph.graphs_of(model)
    assert records is not None
    records.paged_record_after = 0
    engine = Engine(model, None, EngineConfig(kv_memory="1MB", block_size=4))
    seqs = prompts_of([14, 12])
    tables = [[9, 2, 30, 5], [1, 40, 22]]
    steps = [[(0, 6), None], [None, (0, 5)]]                                       # prompts, eager
    steps += [[(p, p + 1), None] for p in range(6, 9)]                             # one sequence
    steps += [[(p, p + 1), (q, q + 1)] for p, q in zip(range(9, 14), range(5, 10))]  # two
    got = run_steps(engine, seqs, tables, steps)
    assert records.replays >= 6
    with torch.no_grad():
        for i, s in enumerate(seqs):
            n = len(got[i])
            torch.testing.assert_close(torch.stack(got[i]), readable(torch.tensor([s[:n]]))[0],
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_store_attend_is_indexing_in_then_paged_attend(cache_dtype, new_dtype, layout):
    """The recorded step's one call takes q [1, N, H, Dh], k, v [1, N, Hkv, Dh] tokens first, as
    model.py hands them (k, v: views of the fused projection's output, strided), writes k, v at their
    slots exactly as indexing them in does (cast to the cache's type), then attends -> [1, N, H, Dh];
    a slot outside the pool, and heads first tensors, are refused."""
    gen = torch.Generator().manual_seed(3)
    n_blocks, kv_heads, size, dh, heads = 12, 2, 4, 8, 4
    keys = pool_of(layout, n_blocks, kv_heads, size, dh, gen, cache_dtype)
    values = pool_of(layout, n_blocks, kv_heads, size, dh, gen, cache_dtype)
    qkv = torch.randn(1, 2, heads + 2 * kv_heads, dh, generator=gen).to(new_dtype)     # [1, N, H + 2 Hkv, Dh]
    q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)                            # strided views
    write_block, write_offset = torch.tensor([5, 9]), torch.tensor([2, 0])
    tables, row, pos = torch.tensor([[1, 5, 0], [3, 7, 9]]), torch.tensor([0, 1]), torch.tensor([6, 8])
    want_k, want_v = keys.clone(), values.clone()
    want_k[write_block, :, write_offset] = k[0].to(cache_dtype)
    want_v[write_block, :, write_offset] = v[0].to(cache_dtype)
    want = KERNEL.paged_attend(q[0], want_k, want_v, tables, row, pos, size)            # [N, H, Dh]
    got = KERNEL.paged_store_attend(q, keys, values, k, v, write_block, write_offset, tables, row, pos, size)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert got.shape == (1, 2, heads, dh) and torch.equal(got[0], want)
    with pytest.raises(RuntimeError, match="outside the pool"):
        KERNEL.paged_store_attend(q, keys, values, k, v, torch.tensor([5, 12]), write_offset, tables, row, pos, size)
    with pytest.raises(RuntimeError, match=r"k, v \[1, N, Hkv, Dh\]"):  # heads first (N != Hkv here)
        three = torch.randn(1, kv_heads, 3, dh).to(new_dtype)
        KERNEL.paged_store_attend(q, keys, values, three, three, write_block, write_offset, tables, row, pos, size)


def test_the_pool_keeps_each_heads_blocks_one_after_the_other():
    """The engine's pool is head-major: kv head g's positions of block b + 1 follow its positions of
    block b in memory, so a sequence holding blocks in order is one stream per head (what the
    kernel reads fastest); indexed [n_layers, n_blocks, Hkv, block_size, Dh] all the same."""
    config = make_config(n_layers=2, n_kv_heads=2)
    pool = PagedKVCache(config, n_blocks=6, block_size=4, dtype=torch.float32)
    row = 4 * config.head_dim * pool.k.element_size()                     # one head's block, in bytes
    for cache in (pool.k, pool.v):
        assert cache.shape == (2, 6, 2, 4, config.head_dim)
        for g in range(2):
            assert cache[1, 3, g].data_ptr() + row == cache[1, 4, g].data_ptr()
    assert pool.layers[1][0].shape == (6, 2, 4, config.head_dim)


@pytest.mark.skipif(KERNEL is None, reason="C++ kernels not built")
def test_paged_attend_refuses_a_pool_whose_rows_are_not_contiguous():
    """A block's positions for a head must be rows Dh apart (e.g. not a Dh-major transpose), and
    keys and values must share one layout: else a one-line RuntimeError, not wrong reads."""
    gen = torch.Generator().manual_seed(5)
    q, tables, row, pos = torch.randn(1, 4, 8, generator=gen), torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([5])
    keys = torch.randn(3, 2, 4, 8, generator=gen)
    transposed = torch.randn(3, 2, 8, 4, generator=gen).transpose(2, 3)     # [n_blocks, Hkv, 4, 8], rows strided
    with pytest.raises(RuntimeError, match="contiguous"):
        KERNEL.paged_attend(q, transposed, transposed, tables, row, pos, 4)
    with pytest.raises(RuntimeError, match="one type and layout"):
        KERNEL.paged_attend(q, keys, keys.transpose(0, 1).contiguous().transpose(0, 1), tables, row, pos, 4)
