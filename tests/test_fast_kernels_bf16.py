"""bfloat16 in and out of the C++ kernels, and the softmax's exp (llama3/fast/kernels.cpp,
paged_attention.cpp, softmax.h), in both builds (AVX-512, plain C++).

A bf16 model's activations reach the kernels in bf16 and are read, and the answers written, in
C++; a bf16 x into a bf16 matvec is multiplied as it is (vdpbf16ps) where the CPU has
AVX512_BF16.  Each case is checked against float64 arithmetic on the same (rounded) inputs with a
bound a bf16 answer must meet, and the bf16 x bf16 product against the widening loop.  The
softmax's exp (Cephes' polynomial, 16 lanes at a time, masked tails) is read out directly: with
one-hot values v[t] = e_t, attention's answer is the probability row itself."""

import math

import pytest
import torch

from llama3.fast import kernels
from llama3.model import apply_rope, fused_attention, rms_norm

BF16, F32 = torch.bfloat16, torch.float32


def cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def within_bf16_rounding(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """got: a float32 sum rounded once to bf16 (half a step: at most 2^-8 of the value), plus
    float32's own sum error (bounded by a few ulps of the sum of |terms|)."""
    bound = exact.abs() * 2.0**-8 + 1e-5 * magnitude
    return bool(((got.double() - exact).abs() <= bound).all())


# ------------------------------------------------------------------ matvec: bf16 x, bf16 weights
@pytest.mark.parametrize("n, k", [(70, 96), (5, 48), (1, 16), (64, 80), (9, 64)])  # K % 32 == 16: the 16-column tail
def test_bf16_x_into_the_bf16_matvec(ops, n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(BF16)
    for shape in ((1, k), (3, k), (2, 1, k)):  # one row, a batch reading each block of rows once, [B, T, K]
        x = torch.randn(*shape, generator=gen).to(BF16)
        got = ops.matvec(x, w, None, kernels.BF16, n)
        assert got.dtype == BF16 and got.shape == (*shape[:-1], n)
        exact = x.double() @ w.double().t()
        assert within_bf16_rounding(got, exact, x.double().abs() @ w.double().abs().t())


def test_the_bf16_pairs_product_agrees_with_the_widening_loop(ops):
    """A float32 x (the bf16 x widened: the same numbers) takes the loop that widens the weights;
    a bf16 x takes vdpbf16ps where the build has it.  Both sum exact products in float32, so after
    rounding to bf16 they agree but for a sum that lands next to a rounding midpoint."""
    plain = ops is kernels.library(plain=True)
    if plain:
        assert not ops.dpbf16()
    elif cpu_has("avx512_bf16"):
        assert ops.dpbf16(), "the CPU has AVX512_BF16 but the AVX-512 build did not use it"
    gen = torch.Generator().manual_seed(5)
    n, k = 130, 208                                  # 6 full steps of 32 columns and a tail of 16
    w = (torch.randn(n, k, generator=gen) * 0.1).to(BF16)
    x = torch.randn(3, k, generator=gen).to(BF16)
    pairs = ops.matvec(x, w, None, kernels.BF16, n)
    widened = ops.matvec(x.float(), w, None, kernels.BF16, n)
    assert widened.dtype == F32
    rounded = widened.to(BF16)
    assert ((pairs.float() - rounded.float()).abs() <= rounded.float().abs() * 2.0**-7 + 1e-30).all()  # a step at most
    assert (pairs == rounded).float().mean() > 0.95
    torch.testing.assert_close(widened.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ rms_norm, rope: bf16 in and out
@pytest.mark.parametrize("x_dtype, w_dtype", [(BF16, BF16), (BF16, F32), (F32, BF16)])
def test_rms_norm_reads_and_writes_bf16(ops, x_dtype, w_dtype):
    """The answer's dtype is PyTorch's promotion of x's and the weight's, as model.py's; a
    non-contiguous x (a transposed view) too."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 4, 80, generator=gen) * 3).to(x_dtype)
    w = (torch.randn(80, generator=gen) + 1).to(w_dtype)
    for rows in (x, x.transpose(0, 1), x[0, 0]):
        got, want = ops.rms_norm(rows, w, 1e-5), rms_norm(rows, w, 1e-5)
        assert got.dtype == want.dtype and got.shape == want.shape
        # model.py rounds the normalised row to x's dtype, then the product to the result's: bf16
        # roundings, each of which may land a step apart where float32 sums in another order
        rounded = (x_dtype == BF16) + (got.dtype == BF16)
        torch.testing.assert_close(got.float(), want.float(), rtol=[1e-5, 2.0**-7, 2.0**-6][rounded], atol=1e-6)
        if rounded:
            assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [BF16, torch.float16, F32])
def test_rope_reads_strided_bf16_and_answers_in_its_dtype(ops, dtype):
    """x as a fused projection's view ([B, T, (H + 2 Hkv) Dh] sliced: heads not contiguous with
    each other), rotated in float32 and rounded once, as apply_rope does."""
    gen = torch.Generator().manual_seed(8)
    B, T, H, Dh = 2, 3, 4, 16
    fused = torch.randn(B, T, (H + 4) * Dh, generator=gen).to(dtype)
    x = fused[..., : H * Dh].view(B, T, H, Dh)
    assert not x.is_contiguous()
    cos, sin = torch.randn(2, T, Dh // 2, generator=gen).unbind(0)
    got, want = ops.rope(x, cos, sin), apply_rope(x, cos, sin)
    assert got.dtype == dtype and got.shape == want.shape
    exact = apply_rope(x.double(), cos.double(), sin.double())
    magnitude = x.double().abs().amax() * (cos.abs().amax() + sin.abs().amax())
    if dtype == BF16:
        assert within_bf16_rounding(got, exact, magnitude)
    tol = {BF16: 2.0**-7, torch.float16: 2.0**-10, F32: 1e-6}[dtype]   # a step of the dtype, float32's sums
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-5)


# ------------------------------------------------------------------ attend: bf16 q, cache or both
@pytest.mark.parametrize("q_dtype, cache_dtype", [(BF16, BF16), (F32, BF16), (BF16, F32)])
def test_attend_reads_and_writes_bf16(ops, q_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(9)
    cache = torch.randn(2, 2, 60, 24, generator=gen).to(cache_dtype)    # [B, Hkv, max_len, Dh]
    k, v = cache[:, :, :37], cache.flip(2).contiguous()[:, :, :37]     # the cache's views, as KVCache.update's
    q = torch.randn(2, 4, 1, 24, generator=gen).to(q_dtype)
    got = ops.attend(q, k, v, None)
    assert got.dtype == q_dtype and got.shape == q.shape
    want = fused_attention(q.double(), k.double(), v.double(), None)
    tol = 2.0**-7 if q_dtype == BF16 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=1e-5)


# ------------------------------------------------------------------ the softmax's exp, read out directly
DH = 64  # q = (8, 0, ...): q . k / sqrt(Dh) = k[0] exactly, so each score is what k[t, 0] holds


def score_row(S: int, seed: int) -> torch.Tensor:
    """Scores of every size the exp meets: ordinary ones, differences past float32's exp range
    (-90, -200, -1e4: exactly 0 there) and one far above the rest."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(S, generator=gen) * 4
    extremes = torch.tensor([-90.0, -200.0, -1e4, 60.0, -87.0, -30.0])
    picks = torch.randperm(S, generator=gen)[: min(S - 1, len(extremes))]
    s[picks] = extremes[: len(picks)]
    return s


def probabilities(scores: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    s = scores.double()
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    return torch.softmax(s, dim=-1)


def assert_probabilities(got: torch.Tensor, want: torch.Tensor, dtype):
    """float32: Cephes' expf is within ~2 ulps of exp; a score 87 below the top gives exactly 0
    (float64's ~1e-38 there is under atol).  bf16: the answer's own rounding."""
    rtol = 1e-5 if dtype == F32 else 2.0**-8 + 1e-5
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("S", [1, 2, 15, 16, 17, 31, 33, 64])  # whole and partial 16-lane steps
def test_attend_softmax_equals_torch_softmax(ops, dtype, S):
    q = torch.zeros(2, 1, 1, DH)
    q[..., 0] = math.sqrt(DH)
    k = torch.zeros(2, 1, S, DH)
    k[0, 0, :, 0], k[1, 0, :, 0] = score_row(S, seed=S), score_row(S, seed=S + 100)
    v = torch.eye(S, DH).expand(2, 1, S, DH)                       # v[t] = e_t: the answer is the row p
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype).contiguous()
    scores = k[:, 0, :, 0].float()                                  # what the kernel sees (bf16-rounded)
    got = ops.attend(q, k, v, None)[:, 0, 0, :S]
    assert got.dtype == dtype
    assert_probabilities(got, probabilities(scores), dtype)
    assert (got[:, :S] >= 0).all() and not got.isnan().any()
    # hidden keys (row 0: all but the first; row 1: a pattern leaving 2 of every 3, the top one hidden)
    visible = torch.zeros(2, S, dtype=torch.bool)
    visible[0, 0] = True
    visible[1] = torch.arange(S) % 3 != 1
    visible[1, scores[1].argmax()] = S == 1
    visible[1, 0] = True
    got = ops.attend(q, k, v, visible)[:, 0, 0, :S]
    assert_probabilities(got, probabilities(scores, visible), dtype)
    assert (got[~visible] == 0).all()
    assert got[0, 0] == 1


@pytest.mark.parametrize("q_dtype, cache_dtype", [(F32, F32), (BF16, BF16), (F32, BF16), (BF16, F32)])
def test_paged_attend_softmax_equals_torch_softmax(ops, q_dtype, cache_dtype):
    """Two queries in one call over scattered blocks of 4: 1 and 23 keys (a partial 16-lane step
    each), and one over 40; answers in q's dtype."""
    size, n_blocks = 4, 20
    table = [13, 2, 19, 7, 0, 11, 5, 16, 8, 3]                      # position p lives in block table[p // 4]
    S = 40
    scores = score_row(S, seed=3)
    keys, values = torch.zeros(n_blocks, 1, size, DH), torch.zeros(n_blocks, 1, size, DH)
    for p in range(S):
        keys[table[p // size], 0, p % size, 0] = scores[p]
        values[table[p // size], 0, p % size, p] = 1.0             # v at position p: e_p
    keys, values = keys.to(cache_dtype), values.to(cache_dtype)
    seen = keys[table, 0, :, 0].flatten()[:S].float()              # the scores as stored
    q = torch.zeros(3, 1, DH)
    q[..., 0] = math.sqrt(DH)
    q = q.to(q_dtype)
    positions = [0, 22, 39]
    got = ops.paged_attend(q, keys, values, torch.tensor([table]), torch.zeros(3, dtype=torch.long),
                           torch.tensor(positions), size)
    assert got.dtype == q_dtype and got.shape == (3, 1, DH)
    for row, pos in enumerate(positions):
        assert_probabilities(got[row, 0, : pos + 1], probabilities(seen[: pos + 1]), q_dtype)
        assert (got[row, 0, pos + 1 :] == 0).all()
