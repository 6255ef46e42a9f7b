"""The C++ kernels (llama3/fast/kernels.cpp) compute what model.py and PyTorch compute.

Each kernel is checked against PyTorch's own operation or model.py's function on the same
inputs, in both builds (AVX-512 intrinsics where the CPU has them, and plain C++ loops), and a
model decoding through them (the plan's slots) against the readable model."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import make_config, make_model
from llama3.config import RopeScaling
from llama3.fast import kernels, speed_up
from llama3.fast.int4 import Bf16Head, Int4Linear
from llama3.fast.quantize import CPU_HAS_BF16, PREFILL_ROWS, Int8Linear, quantize_int8_groups
from llama3.generate import GenerationSettings, generate_tokens
from llama3.model import KVCache, apply_rope, fused_attention, rms_norm
from test_int8 import x16_step_bound


def weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("n, k", [(192, 64), (70, 48), (1, 16)])  # rows not a multiple of 4 too
def test_float_and_int8_matvec_equal_pytorch(ops, n, k):
    g = torch.Generator().manual_seed(n + k)
    w, x, batch = weight(n, k), torch.randn(1, k, generator=g), torch.randn(3, k, generator=g)
    row_scales = w.abs().amax(dim=1) / 127                           # kind INT8: a float32 scale per row
    rows_q = torch.round(w / row_scales[:, None]).to(torch.int8)
    int8 = Int8Linear(*quantize_int8_groups(w))                       # kind INT8_GROUP: what Int8Linear runs
    cases = [(w, None, kernels.F32, w), (w.to(torch.bfloat16), None, kernels.BF16, w.to(torch.bfloat16).float()),
             (rows_q, row_scales, kernels.INT8, rows_q.float() * row_scales[:, None]),
             (int8.weight, int8.scales, kernels.INT8_GROUP, int8.dequantized())]
    for stored, scales, kind, matrix in cases:
        for rows in (x, batch):  # one row, and 3 rows reading each block of weights once
            want = rows @ matrix.t()
            # INT8_GROUP's AVX-512 kernel takes x as int16 per group of 32 (test_int8.py): that step on top
            slack = x16_step_bound(rows, q=stored, scales=scales) if kind == kernels.INT8_GROUP else 0
            error = (ops.matvec(rows, stored, scales, kind, n) - want).abs()
            assert (error <= 1e-5 + 1e-5 * want.abs() + slack).all(), (kind, float(error.max()))
    bf16_in = ops.matvec(x.to(torch.bfloat16), w, None, kernels.F32, n)  # 16-bit activations: answered in 16 bits
    assert bf16_in.dtype == torch.bfloat16
    torch.testing.assert_close(bf16_in.float(), x.to(torch.bfloat16).float() @ w.t(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n, k", [(128, 64), (64, 96)])
def test_int4_matvec_reads_pytorchs_packed_layout(ops, n, k):
    """Int4Linear's weights in PyTorch's packed CPU layout: the product equals the dequantized
    matrix times x (and so PyTorch's int4 kernel, up to its bf16 rounding)."""
    f32 = nn.Linear(k, n, bias=False)
    f32.weight.data = weight(n, k, seed=1)
    int4 = Int4Linear.from_linear(f32)
    dequantized = int4.dequantized()
    int4.pack()
    for rows in (torch.randn(1, k), torch.randn(3, k)):
        got = ops.matvec(rows, int4.packed, int4.scales_and_zeros, kernels.INT4, n)
        torch.testing.assert_close(got, rows @ dequantized.t(), rtol=1e-4, atol=1e-4)
    torch_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), int4.packed, 32,
                                                              int4.scales_and_zeros).float()
    assert (got - torch_kernel).abs().max() < 0.02 * torch_kernel.abs().max()
    wide = ops.dequantize_int4(int4.packed, int4.scales_and_zeros, n)   # (q - 8) * scale + zero, in bf16
    assert wide.dtype == torch.bfloat16 and wide.shape == (n, k)
    torch.testing.assert_close(wide.float(), dequantized.to(torch.bfloat16).float(), rtol=0.01, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rope_kernels_equal_model_py(ops, dtype):
    gen = torch.Generator().manual_seed(2)
    x, w = (torch.randn(2, 5, 64, generator=gen) * 3).to(dtype), (torch.randn(64, generator=gen) + 1).to(dtype)
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5).float(), rms_norm(x, w, 1e-5).float(), rtol=tol + 1e-6,
                               atol=tol + 1e-6)
    q = torch.randn(2, 5, 3, 16, generator=gen).to(dtype)
    for cos, sin in (torch.randn(2, 5, 8, generator=gen).unbind(0), torch.randn(2, 2, 5, 8, generator=gen).unbind(0)):
        torch.testing.assert_close(ops.rope(q, cos, sin).float(), apply_rope(q, cos, sin).float(), rtol=1e-5 + tol,
                                   atol=1e-5 + tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernel_reads_the_cache_in_place(ops, dtype):
    """One query row per sequence over hundreds of cached positions, the cache's own strided
    views (as KVCache.update returns them), grouped-query heads, a padding mask: SDPA's numbers."""
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(3, 2, 400, 24, generator=gen).to(dtype)       # [B, Hkv, max_len, Dh]
    k, v = cache[:, :, :301], (cache * 0.5)[:, :, :301]               # views, not copies (v: another tensor)
    q = torch.randn(3, 6, 1, 24, generator=gen).to(dtype)              # H = 6: 3 query heads per kv head
    mask = (torch.arange(301)[None, :] >= torch.tensor([0, 40, 200])[:, None])[:, None, None, :]
    for m in (None, mask):
        want = fused_attention(q.float(), k.float(), v.float(), m)
        tol = 1e-5 if dtype == torch.float32 else 0.02
        # the mask as rows [B, S] or as the model's [B, 1, 1, S] (what a recorded step passes)
        for visible in ((None,) if m is None else (m[:, 0, 0], m)):
            got = ops.attend(q, k, v, visible)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    for wrong in (mask[..., :300], mask[:2]):  # a key too few, a row too few: refused, not read past
        with pytest.raises(RuntimeError, match="visible is"):
            ops.attend(q, k, v, wrong)


CONFIGS = {
    "gqa": dict(),
    "mha": dict(n_kv_heads=4),
    "mqa-untied-scaled": dict(n_kv_heads=1, tie_embeddings=False,
                              rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32)),
}


def decode(model, cache, n=12, seed=0, batch=1):
    """Logits of a 5-token prompt, then n one-token steps: [B, n + 1, V]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        out = [model(torch.randint(0, 101, (batch, 5), generator=gen), 0, cache, last_only=True)]
        for pos in range(5, 5 + n):
            out.append(model(torch.randint(0, 101, (batch, 1), generator=gen), pos, cache))
    return torch.cat(out, dim=1)


def requires_kernels():
    if kernels.library() is None:
        pytest.skip(f"no C++ kernels here: {kernels.build_error()}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_through_the_kernels_equals_the_readable_model_float32(name):
    """float32: the same logits and the same cache contents as model.py's own functions."""
    requires_kernels()
    model = make_model(make_config(**CONFIGS[name]), seed=2)
    fast = speed_up(copy.deepcopy(model))
    assert fast.layers[0].attention.attention_kernel is kernels.attention
    caches = [KVCache(model.config, 2, 20) for _ in range(2)]
    torch.testing.assert_close(decode(fast, caches[1], batch=2), decode(model, caches[0], batch=2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_kernels_close_to_pytorchs_16_bit_and_quantized(kind):
    """bf16 / int8 / int4: PyTorch's kernels round activations to bf16, ours keep float32 inside,
    so logits agree to bf16 precision and the greedy token is the same."""
    requires_kernels()
    model = make_model(make_config(dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2), seed=3)
    if kind == "bfloat16":
        model = model.to(torch.bfloat16)
    quantize = None if kind == "bfloat16" else kind
    ours, theirs = speed_up(copy.deepcopy(model), quantize), speed_up(copy.deepcopy(model), quantize, native=False)
    caches = [KVCache(model.config, 1, 20, dtype=model.dtype) for _ in range(2)]
    got, want = decode(ours, caches[0]).float(), decode(theirs, caches[1]).float()
    assert ((got - want).abs().amax(dim=-1) / want.std(dim=-1)).max() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_speed_up_generates_the_readable_models_tokens_through_the_kernels(tiny_model):
    """Greedy and sampled generation give the plain model's tokens, for one prompt and for a
    left-padded batch (per-row positions and a mask), every decoding step's attention in C++."""
    requires_kernels()
    fast = speed_up(copy.deepcopy(tiny_model))
    calls = []
    for layer in fast.layers:  # count what the attention slot does with one query row (setattr, as the plan does)
        layer.attention.attention_kernel = lambda q, k, v, mask: (calls.append(q.shape[2] == 1)
                                                                  or kernels.attention(q, k, v, mask))
    for settings in (GenerationSettings(max_new_tokens=12),
                     GenerationSettings(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5)):
        want, got = generate_tokens(tiny_model, [[3, 1, 4]], settings), generate_tokens(fast, [[3, 1, 4]], settings)
        list(want), list(got)
        assert got.tokens == want.tokens
    assert sum(calls) == 22 * len(fast.layers)  # every token after the first of both runs
    prompts, settings = [[3, 1, 4], [5], [9, 2]], GenerationSettings(max_new_tokens=6)
    want, got = generate_tokens(tiny_model, prompts, settings), generate_tokens(fast, prompts, settings)
    list(want), list(got)
    assert got.tokens == want.tokens
    twin = copy.deepcopy(fast)  # a copy carries its slots and decodes the same
    again = generate_tokens(twin, prompts, settings)
    list(again)
    assert again.tokens == want.tokens


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=600)


def test_llama3_native_0_keeps_pytorchs_kernels():
    """LLAMA3_NATIVE=0: no compiling; the plan says so and model.py's functions run (fresh interpreter)."""
    out = run_python("import sys; sys.path.insert(0, 'tests'); from conftest import make_model; "
                     "from llama3.fast.plan import choose_plan; from llama3.fast import speed_up; "
                     "from llama3 import model as m; p = choose_plan(make_model()); s = speed_up(make_model()); "
                     "print(p.kernels, p.why_not_cpp, s.layers[0].attention.attention_kernel is m.fused_attention)",
                     LLAMA3_NATIVE="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PyTorch disabled by LLAMA3_NATIVE=0 True"


def test_a_missing_compiler_falls_back_with_a_reason(tmp_path):
    out = run_python("from llama3.fast import kernels; print(kernels.library(), kernels.build_error(), sep='|')",
                     CXX=str(tmp_path / "no-such-c++"), LLAMA3_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    lib, why = out.stdout.strip().split("|")
    assert lib == "None" and "no C++ compiler" in why


@pytest.mark.skipif(not CPU_HAS_BF16, reason="the prompt path widens weights to bfloat16 only on CPUs with bf16")
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_a_prompt_through_a_bf16_gemm_equals_the_tokens_one_by_one(cls):
    """From PREFILL_ROWS input rows on, int8/int4 linears widen their weights to bf16 for one
    matrix-matrix product; each output row equals the weight-only kernel's for that row alone."""
    if cls is Int4Linear and kernels.library() is None:
        pytest.skip("int4 widening is done in C++")
    f32 = nn.Linear(192, 128, bias=False)
    f32.weight.data = weight(128, 192, seed=5)
    linear = cls.from_linear(f32)
    x = torch.randn(1, PREFILL_ROWS + 8, 192)
    with torch.inference_mode():
        whole = linear(x)
        one_by_one = torch.cat([linear(x[:, i:i + 1]) for i in range(x.shape[1])], dim=1)
    assert whole.shape == one_by_one.shape == (1, PREFILL_ROWS + 8, 128)
    assert (whole - one_by_one).abs().max() < 0.01 * one_by_one.abs().max()


def test_bf16_head_matvec_equals_its_table():
    requires_kernels()
    w = weight(64, 32)
    head = Bf16Head(w, torch.float32)
    head.native, head.packed = "llama3", None
    x = torch.randn(1, 1, 32)
    torch.testing.assert_close(head(x), x @ head.table.float().t(), rtol=1e-5, atol=1e-5)
