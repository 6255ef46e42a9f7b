"""The attention loop both C++ attention kernels run (llama3/fast/attend_core.h): `attend` over a
KVCache's rows and `paged_attend` over the engine's blocks, at contexts long enough to be cut into
spans (256 positions each) and joined, against float64 softmax(q kᵀ / √Dh) v; the two kernels give
the same bits on the same keys, and a query's answer does not depend on the batch around it."""

from __future__ import annotations

import pytest
import torch

from llama3.model import fused_attention

SPAN = 256  # attend_core.h's SPAN


def want(q, k, v):
    """q [H, Dh]; k, v [S, Hkv, Dh] -> float64 [H, Dh]: model.py's SDPA attention of one query row."""
    kk, vv = k.double().transpose(0, 1)[None], v.double().transpose(0, 1)[None]       # [1, Hkv, S, Dh]
    return fused_attention(q.double()[None, :, None], kk, vv, None)[0, :, 0]


def paged(keys_seq, values_seq, size, n_blocks, gen):
    """Sequences' keys [S_i, Hkv, Dh] scattered over a pool of blocks in shuffled order -> pool k, v
    [n_blocks, Hkv, size, Dh] and each sequence's block table."""
    Hkv, Dh = keys_seq[0].shape[1:]
    pool_k = torch.randn(n_blocks, Hkv, size, Dh, generator=gen).to(keys_seq[0].dtype)   # junk where unused
    pool_v = torch.randn(n_blocks, Hkv, size, Dh, generator=gen).to(keys_seq[0].dtype)
    free = torch.randperm(n_blocks, generator=gen).tolist()
    tables = []
    for k, v in zip(keys_seq, values_seq):
        table = [free.pop() for _ in range(-(-k.shape[0] // size))]
        for p in range(k.shape[0]):
            pool_k[table[p // size], :, p % size] = k[p]
            pool_v[table[p // size], :, p % size] = v[p]
        tables.append(table)
    width = max(len(t) for t in tables)
    return pool_k, pool_v, torch.tensor([t + [0] * (width - len(t)) for t in tables])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dh", [(9, 3, 64), (8, 2, 40), (4, 4, 128), (6, 1, 8), (72, 1, 16)])
def test_long_contexts_in_spans_are_softmax_attention(ops, dtype, heads, kv_heads, dh):
    """Queries seeing 1, 255, 256, 257, 700 and 1029 keys (one span, exactly one, one and a bit,
    several with a partial last) in one paged call; the same keys through attend as a KVCache."""
    gen = torch.Generator().manual_seed(heads * 100 + dh)
    lengths = [1, 255, SPAN, SPAN + 1, 700, 1029]
    ks = [torch.randn(n, kv_heads, dh, generator=gen).to(dtype) for n in lengths]
    vs = [torch.randn(n, kv_heads, dh, generator=gen).to(dtype) for n in lengths]
    ks[4][300] *= 40  # one key far above the rest in a later span: the join must rescale the others
    q = (torch.randn(len(lengths), heads, dh, generator=gen) * 2).to(dtype)
    pool_k, pool_v, tables = paged(ks, vs, 16, 200, gen)
    rows = torch.arange(len(lengths))
    got = ops.paged_attend(q, pool_k, pool_v, tables, rows, torch.tensor(lengths) - 1, 16)
    assert got.dtype == dtype and got.shape == q.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2.0**-7, atol=2.0**-8)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(got[i].double(), want(q[i], ks[i], vs[i]), **tol)
        # the same keys as a KVCache's rows (a longer cache's view), one query row: the same bits
        cache_k = torch.zeros(1, kv_heads, n + 5, dh, dtype=dtype)
        cache_v = torch.zeros(1, kv_heads, n + 5, dh, dtype=dtype)
        cache_k[0, :, :n], cache_v[0, :, :n] = ks[i].transpose(0, 1), vs[i].transpose(0, 1)
        alone = ops.attend(q[i][None, :, None], cache_k[:, :, :n], cache_v[:, :, :n], None)[0, :, 0]
        assert torch.equal(alone, got[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_answer_does_not_depend_on_the_batch_or_the_threads(ops, dtype):
    """The spans depend only on how many keys a query sees: alone or beside others, on one
    thread or two, a query gets the same bits."""
    gen = torch.Generator().manual_seed(5)
    lengths = [900, 40, 513]
    ks = [torch.randn(n, 3, 64, generator=gen).to(dtype) for n in lengths]
    vs = [torch.randn(n, 3, 64, generator=gen).to(dtype) for n in lengths]
    q = torch.randn(3, 9, 64, generator=gen).to(dtype)
    pool_k, pool_v, tables = paged(ks, vs, 16, 100, gen)
    positions = torch.tensor(lengths) - 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = ops.paged_attend(q, pool_k, pool_v, tables, torch.arange(3), positions, 16)
        torch.set_num_threads(1)
        for i in range(3):
            alone = ops.paged_attend(q[i:i + 1], pool_k, pool_v, tables[i:i + 1], torch.zeros(1, dtype=torch.long),
                                     positions[i:i + 1], 16)
            assert torch.equal(alone[0], together[i])
    finally:
        torch.set_num_threads(threads)


def test_hidden_keys_in_a_span_of_their_own(ops):
    """attend's mask hiding every key of one whole span (and the top key of another): that span
    adds nothing, the others are joined as if it were not there."""
    gen = torch.Generator().manual_seed(8)
    S = 3 * SPAN + 20
    k = torch.randn(2, 2, S, 32, generator=gen)
    v = torch.randn(2, 2, S, 32, generator=gen)
    q = torch.randn(2, 4, 1, 32, generator=gen)
    visible = torch.ones(2, S, dtype=torch.bool)
    visible[0, SPAN:2 * SPAN] = False                     # row 0: its second span all hidden
    visible[1, :SPAN + 3] = False                         # row 1: the first span and a bit of the next
    top = (q[1, 0, 0] @ k[1, 0].T).argmax()
    visible[1, top] = False
    got = ops.attend(q, k, v, visible)
    for b in range(2):
        keep = visible[b]
        expect = want(q[b, :, 0], k[b].transpose(0, 1)[keep], v[b].transpose(0, 1)[keep])
        torch.testing.assert_close(got[b, :, 0].double(), expect, rtol=1e-5, atol=1e-6)
