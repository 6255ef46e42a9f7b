"""torch.ops.llama3.store_attend (llama3/fast/cache_attend.cpp), a recorded step's one call a layer
over a KVCache: it writes the new key and value at the slot as KVCache.update does, and attends
with the numbers of the attention slot over keys 0..slot (bit for bit the C++ `attend` the eager
step runs; model.py's fused_attention within rounding); bad shapes are refused in one line."""

import pytest
import torch

from llama3.fast import kernels
from llama3.model import fused_attention

OPS = kernels.library()
pytestmark = pytest.mark.skipif(OPS is None, reason="C++ kernels not built")


def case(cache_dtype, new_dtype, batch=3, heads=6, kv_heads=2, length=37, dh=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(2, batch, kv_heads, length, dh, generator=gen).to(cache_dtype)   # KVCache.k / .v
    qkv = torch.randn(batch, 1, heads + 2 * kv_heads, dh, generator=gen).to(new_dtype)  # fused projection
    q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)                             # strided, tokens first
    return pool, q, k, v


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot", [0, 20, 36])
def test_store_attend_is_update_then_the_attention_slot(cache_dtype, new_dtype, slot):
    pool, q, k, v = case(cache_dtype, new_dtype)
    batch, length = pool.shape[1], pool.shape[3]
    starts = torch.tensor([0, 3, 1]).clamp(max=slot)                                   # rows left-padded
    pad = torch.arange(length)[None, :] >= starts[:, None]
    for visible in (None, (pad & (torch.arange(length) <= slot))[:, None, None, :],
                    (torch.arange(length) <= slot).view(1, 1, 1, length)):
        keys, values = pool[0].clone(), pool[1].clone()
        want_k, want_v = keys.clone(), values.clone()
        want_k[:, :, slot] = k[:, 0].to(cache_dtype)                                   # what update writes
        want_v[:, :, slot] = v[:, 0].to(cache_dtype)
        seen = None if visible is None else visible[..., :slot + 1]
        got = OPS.store_attend(q, keys, values, k, v, torch.tensor([slot]), visible)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        assert got.shape == q.shape and got.dtype == q.dtype
        # the C++ attention slot over keys 0..slot (the eager step's): bit for bit
        kept_k, kept_v = want_k[:, :, :slot + 1], want_v[:, :, :slot + 1]
        assert torch.equal(got, OPS.attend(q.transpose(1, 2), kept_k, kept_v, seen).transpose(1, 2))
        # model.py's fused_attention (SDPA), within rounding
        want = fused_attention(q.transpose(1, 2).float(), kept_k.float(), kept_v.float(), seen).transpose(1, 2)
        tol = 1e-5 if torch.bfloat16 not in (cache_dtype, new_dtype) else 2e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert batch == 3


def test_bad_shapes_are_refused():
    pool, q, k, v = case(torch.float32, torch.float32)
    keys, values = pool[0], pool[1]
    slot = torch.tensor([5])
    visible = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool)
    bad = [
        ((q, keys, values, k.transpose(1, 2), v.transpose(1, 2), slot, None), r"k and v \[B, 1, Hkv, Dh\]"),  # heads first
        ((q, keys, values, k[:2], v[:2], slot, None), r"k and v \[B, 1, Hkv, Dh\]"),                    # a row too few
        ((q[..., :5, :], keys, values, k, v, slot, None), r"q \[B, 1, H, Dh\]"),                         # H % Hkv
        ((q, keys, values, k, v, torch.tensor([keys.shape[2]]), None), "outside the cache"),
        ((q, keys, values, k, v, torch.tensor([-1]), None), "outside the cache"),
        ((q, keys, values, k, v, torch.tensor([1, 2]), None), "slot is one int64"),
        ((q, keys, values, k, v, slot, visible[..., :-1]), "visible is"),                                # a slot too few
        ((q, keys, values, k, v, slot, torch.ones(2, 1, 1, keys.shape[2], dtype=torch.bool)), "visible is"),
        ((q, keys.half(), values.half(), k, v, slot, None), "float32 or bfloat16"),
    ]
    for args, message in bad:
        before = keys.clone()
        with pytest.raises(RuntimeError, match=message):
            OPS.store_attend(*args)
        assert torch.equal(keys, before)  # nothing written before the refusal
