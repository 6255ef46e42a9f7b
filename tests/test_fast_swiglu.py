"""FeedForward's slot: silu(gate) * up in one C++ pass (kernels.cpp `silu_mul`), put there by the
plan only for nn.SiLU, and bypassed while a tap of the feed-forward is hooked."""

import copy

import pytest
import torch
from torch import nn

from conftest import make_config, make_model
from llama3.fast import kernels, speed_up
from llama3.model import FeedForward, silu_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_equals_torch(ops, dtype):
    """Against torch's own F.silu * up (the reference), on w13's split halves (strided rows), on
    contiguous rows, on lengths not a multiple of 16, and on extremes (exp over/underflow)."""
    gen = torch.Generator().manual_seed(4)
    for shape in ((1, 1, 1536), (3, 2, 37), (5, 17)):
        both = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 6).to(dtype)
        gate, up = both.chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
        got = ops.silu_mul(gate, up)
        assert got.dtype == dtype and got.shape == gate.shape and got.is_contiguous()
        if dtype == torch.bfloat16:  # silu rounded once, then the product: the same bits
            assert torch.equal(got, want)
        else:  # float32: within a few ulps (a polynomial exp, not libm's)
            torch.testing.assert_close(got, want, rtol=3e-6, atol=1e-7)
    extremes = torch.tensor([-200.0, -88.5, -87.0, -1e-3, 0.0, 3.0, 88.5, 200.0, float("inf")])
    torch.testing.assert_close(ops.silu_mul(extremes, torch.ones(9)), torch.nn.functional.silu(extremes) * 1,
                               rtol=3e-6, atol=1e-30)


def test_plan_puts_the_kernel_in_the_slot_and_the_model_decodes_the_same(tiny_model):
    if kernels.library() is None:
        pytest.skip(f"no C++ kernels here: {kernels.build_error()}")
    assert all(layer.feed_forward.kernel is silu_mul for layer in tiny_model.layers)  # model.py's default
    fast = speed_up(copy.deepcopy(tiny_model))
    assert all(layer.feed_forward.kernel is kernels.silu_mul for layer in fast.layers)
    calls = []
    for layer in fast.layers:  # count the slot's calls (setattr, as the plan does)
        layer.feed_forward.kernel = lambda g, u: calls.append(1) or kernels.silu_mul(g, u)
    tokens = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), tiny_model(tokens), rtol=1e-4, atol=1e-4)
    assert len(calls) == len(fast.layers)


def test_a_hooked_tap_or_another_activation_runs_the_readable_line():
    """While a tap is hooked it sees act(gate) * up and the kernel is not called; another
    activation than nn.SiLU never goes through the slot (the kernel computes SiLU)."""
    torch.manual_seed(0)
    ffn = FeedForward(32, 48)
    calls = []
    ffn.kernel = lambda g, u: calls.append(1) or silu_mul(g, u)
    x = torch.randn(1, 2, 32)
    with torch.no_grad():
        want = ffn(x)
        assert len(calls) == 1
        for tap in (ffn.gate, ffn.up, ffn.hidden, ffn.act):
            seen = []
            handle = tap.register_forward_hook(lambda m, i, o: seen.append(o))
            torch.testing.assert_close(ffn(x), want)
            handle.remove()
            assert len(seen) == 1 and len(calls) == 1
        ffn.act = nn.GELU()
        gelu = ffn(x)
        assert len(calls) == 1
        torch.testing.assert_close(gelu, ffn.w2(nn.functional.gelu(ffn.w1(x)) * ffn.w3(x)))
