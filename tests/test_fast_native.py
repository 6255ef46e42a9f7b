"""The C decoding step (llama3/fast/native.c) computes what PyTorch computes.

Each kernel is checked against PyTorch's own product on the same weights, in both
builds (AVX-512 intrinsics where the CPU has them, and the plain-C loops), and the
whole step against `decode_step`, the readable lean step, for every weight kind."""

import copy
import ctypes
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import make_config, make_model
from llama3.config import RopeScaling
from llama3.fast import native, speed_up
from llama3.fast.decode import decode_step
from llama3.fast.int4 import Bf16Head, Int4Linear
from llama3.fast.quantize import CPU_HAS_BF16, PREFILL_ROWS, Int8Linear
from llama3.generate import GenerationSettings, generate_tokens
from llama3.model import KVCache

BUILDS = [False, True]  # AVX-512 (plain C on CPUs without it), plain C


@pytest.fixture(params=BUILDS, ids=["simd", "plain-c"])
def lib(request):
    built = native.library(plain=request.param)
    if built is None:
        pytest.skip(f"no C step here: {native.build_error(request.param)}")
    return request.param, built


def run_matvec(lib, module, x):
    """x [K] or [B, K] -> y [N] or [B, N] through llama3_matvec (B rows read each weight block once)."""
    matrix, keep = native.describe(module)
    rows = x.reshape(-1, matrix.k).contiguous()
    y = torch.empty(rows.shape[0], matrix.n)
    lib.llama3_matvec(ctypes.byref(matrix), rows.data_ptr(), y.data_ptr(), rows.shape[0], 2)
    return y.reshape(*x.shape[:-1], matrix.n)


def weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("n, k", [(192, 64), (70, 48), (1, 16)])  # rows not a multiple of 4 too
def test_float_and_int8_kernels_equal_pytorch(lib, n, k):
    _, built = lib
    w, x = weight(n, k), torch.randn(k)
    f32 = nn.Linear(k, n, bias=False)
    batch = torch.randn(3, k)
    f32.weight.data = w
    torch.testing.assert_close(run_matvec(built, f32, x), w @ x, rtol=1e-5, atol=1e-5)
    bf16 = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    bf16.weight.data = w.to(torch.bfloat16)
    torch.testing.assert_close(run_matvec(built, bf16, x), w.to(torch.bfloat16).float() @ x, rtol=1e-5, atol=1e-5)
    head = Bf16Head(w, torch.float32)
    torch.testing.assert_close(run_matvec(built, head, x), head.table.float() @ x, rtol=1e-5, atol=1e-5)
    int8 = Int8Linear.from_linear(f32)
    want = (int8.weight.float() * int8.scales[:, None]) @ x
    torch.testing.assert_close(run_matvec(built, int8, x), want, rtol=1e-5, atol=1e-5)
    for module, matrix in ((f32, w), (bf16, w.to(torch.bfloat16).float()),
                           (int8, int8.weight.float() * int8.scales[:, None])):  # 3 rows at once
        torch.testing.assert_close(run_matvec(built, module, batch), batch @ matrix.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k", [(128, 64), (64, 96)])
def test_int4_kernel_reads_pytorchs_packed_layout(lib, n, k):
    """Int4Linear's weights in PyTorch's packed CPU layout: the C product equals the
    dequantized matrix times x (and so PyTorch's int4 kernel, up to its bf16 rounding)."""
    _, built = lib
    f32 = nn.Linear(k, n, bias=False)
    f32.weight.data = weight(n, k, seed=1)
    int4 = Int4Linear.from_linear(f32)
    dequantized = int4.dequantized()
    x = torch.randn(k)
    got = run_matvec(built, int4, x)  # packs it
    torch.testing.assert_close(got, dequantized @ x, rtol=1e-4, atol=1e-4)
    torch_kernel = int4(x[None])[0]
    assert (got - torch_kernel).abs().max() < 0.02 * torch_kernel.abs().max()
    batch = torch.randn(3, k)
    torch.testing.assert_close(run_matvec(built, int4, batch), batch @ dequantized.t(), rtol=1e-4, atol=1e-4)


def test_describe_declines_what_c_does_not_read():
    assert native.describe(Int4Linear.from_linear(nn.Linear(64, 80, bias=False))) is None  # rows % 64
    assert native.describe(nn.Linear(24, 8, bias=False)) is None                         # columns % 16
    assert native.describe(nn.Linear(32, 8, bias=True)) is None
    assert native.describe(nn.Linear(32, 8, bias=False).half()) is None


CONFIGS = {
    "gqa": dict(),
    "mha": dict(n_kv_heads=4),
    "mqa-untied-scaled": dict(n_kv_heads=1, tie_embeddings=False,
                              rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=32)),
}


def steps(model, step, cache, n=12, seed=0):
    """Logits of n one-token steps (a prompt's worth, then beyond) [n, V]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for pos in range(n):
            out.append(step(model, torch.randint(0, model.config.vocab_size, (1, 1), generator=gen), pos, cache)[0, 0])
    return torch.stack(out)


def python_step(model, tokens, pos, cache):
    return decode_step(model, tokens, pos, cache)


def c_step(model, tokens, pos, cache):
    return model.native_step(tokens, pos, cache)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_c_step_equals_the_python_step_float32(lib, name):
    """float32: the same logits and the same cache contents as decode_step."""
    plain, _ = lib
    model = speed_up(make_model(make_config(**CONFIGS[name]), seed=2), native=False)
    model.native_step = native.native_step(model, plain=plain)
    assert model.native_step is not None
    caches = [KVCache(model.config, 1, 16) for _ in range(2)]
    want, got = steps(model, python_step, caches[0]), steps(model, c_step, caches[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_c_step_close_to_the_python_step_16_bit_and_quantized(lib, kind):
    """bf16 / int8 / int4: PyTorch rounds activations to bf16 between operations, C keeps
    them in float32, so logits agree to bf16 precision and the greedy token is the same."""
    plain, _ = lib
    model = make_model(make_config(dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2), seed=3)
    if kind == "bfloat16":
        model = model.to(torch.bfloat16)
    model = speed_up(model, quantize=None if kind == "bfloat16" else kind, pack=False, native=False)
    model.native_step = native.native_step(model, plain=plain)
    assert model.native_step is not None
    dtype = model.norm.weight.dtype
    caches = [KVCache(model.config, 1, 16, dtype=dtype) for _ in range(2)]
    want, got = steps(model, python_step, caches[0]).float(), steps(model, c_step, caches[1])
    assert ((got - want).abs().amax(dim=-1) / want.std(dim=-1)).max() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_speed_up_decodes_through_c_and_generates_the_readable_models_tokens(tiny_model):
    """speed_up attaches the C step; greedy and sampled generation give the plain model's
    tokens, for one prompt and for a left-padded batch (per-row positions and a mask)."""
    if native.library() is None:
        pytest.skip(f"no C step here: {native.build_error()}")
    fast = speed_up(copy.deepcopy(tiny_model))
    assert fast.native_step is not None
    calls = []
    step = fast.native_step
    fast.native_step = type("Counting", (), {
        "supports": staticmethod(step.supports),
        "__call__": lambda self, *a: calls.append(1) or step(*a)})()
    for settings in (GenerationSettings(max_new_tokens=12),
                     GenerationSettings(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=5)):
        want, got = generate_tokens(tiny_model, [[3, 1, 4]], settings), generate_tokens(fast, [[3, 1, 4]], settings)
        list(want), list(got)
        assert got.tokens == want.tokens
    assert len(calls) == 22  # every token after the first of both runs came from C
    prompts, settings = [[3, 1, 4], [5], [9, 2]], GenerationSettings(max_new_tokens=6)
    want, got = generate_tokens(tiny_model, prompts, settings), generate_tokens(fast, prompts, settings)
    list(want), list(got)
    assert got.tokens == want.tokens
    assert len(calls) == 27


def test_c_step_refuses_a_position_past_the_cache(tiny_model):
    model = speed_up(copy.deepcopy(tiny_model))
    if model.native_step is None:
        pytest.skip("no C step here")
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model.native_step(torch.tensor([[1]]), 4, KVCache(model.config, 1, 4))


def test_llama3_native_0_keeps_the_python_step():
    """LLAMA3_NATIVE=0: no compiling, the Python step decodes (in a fresh interpreter)."""
    code = ("import torch, sys; sys.path.insert(0, 'tests'); from conftest import make_model; "
            "from llama3.fast import speed_up, native; m = speed_up(make_model()); "
            "print(m.native_step, native.build_error())")
    env = dict(os.environ, LLAMA3_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None disabled by LLAMA3_NATIVE=0"


def test_a_missing_compiler_falls_back_with_a_reason(tmp_path):
    code = ("from llama3.fast import native; print(native.library(), native.build_error(), sep='|')")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), LLAMA3_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lib, why = out.stdout.strip().split("|")
    assert lib == "None" and "could not build" in why
    assert not any((tmp_path / "cache").glob("*.so"))  # nothing half-written left behind


def test_a_damaged_cached_library_is_built_again(tmp_path):
    """A cached .so that does not load (here: truncated to garbage) is replaced by a fresh build."""
    code = ("from llama3.fast import native; lib = native.library(); print(lib is not None, native.build_error())")
    env = dict(os.environ, LLAMA3_CACHE=str(tmp_path / "cache"))
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if first.stdout.strip() != "True None":
        pytest.skip(f"no C step here: {first.stdout.strip() or first.stderr[-200:]}")
    [cached] = (tmp_path / "cache").glob("native-*.so")
    cached.write_bytes(b"not a shared library")
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "True None"
    assert cached.read_bytes()[:4] == b"\x7fELF"


def test_int4_dequantized_in_c_equals_the_groups_formula(lib):
    """llama3_dequantize_int4 reads the packed layout back: (q - 8) * scale + zero, in bf16."""
    f32 = nn.Linear(96, 128, bias=False)
    f32.weight.data = weight(128, 96, seed=4)
    int4 = Int4Linear.from_linear(f32)
    want = int4.dequantized().to(torch.bfloat16)
    got = native.dequantize_int4(int4.pack())
    assert got.dtype == torch.bfloat16 and got.shape == (128, 96)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.01, atol=1e-3)


@pytest.mark.skipif(not CPU_HAS_BF16, reason="the prompt path widens weights to bfloat16 only on CPUs with bf16")
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_a_prompt_through_a_bf16_gemm_equals_the_tokens_one_by_one(cls):
    """From PREFILL_ROWS input rows on, int8/int4 linears widen their weights to bf16 for one
    matrix-matrix product; each output row equals the weight-only kernel's for that row alone."""
    if cls is Int4Linear and native.library() is None:
        pytest.skip("int4 widening is done in C")
    f32 = nn.Linear(192, 128, bias=False)
    f32.weight.data = weight(128, 192, seed=5)
    linear = cls.from_linear(f32)
    x = torch.randn(1, PREFILL_ROWS + 8, 192)
    with torch.inference_mode():
        whole = linear(x)
        one_by_one = torch.cat([linear(x[:, i:i + 1]) for i in range(x.shape[1])], dim=1)
    assert whole.shape == one_by_one.shape == (1, PREFILL_ROWS + 8, 128)
    assert (whole - one_by_one).abs().max() < 0.01 * one_by_one.abs().max()


def test_copies_and_moved_models_decode_in_python(tiny_model):
    """The C step points into one model's tensors: a deep copy carries none, and a model whose
    parameters were replaced (model.to) falls back to the Python step instead of reading stale ones."""
    fast = speed_up(copy.deepcopy(tiny_model))
    if fast.native_step is None:
        pytest.skip("no C step here")
    twin = copy.deepcopy(fast)
    assert twin.native_step is None
    settings = GenerationSettings(max_new_tokens=6)
    a, b = generate_tokens(fast, [[2, 7]], settings), generate_tokens(twin, [[2, 7]], settings)
    list(a), list(b)
    assert a.tokens == b.tokens
    cache = KVCache(fast.config, 1, 8, dtype=torch.bfloat16)
    assert fast.native_step.supports(torch.tensor([[1]]), 0, cache, None)
    fast.to(torch.bfloat16)
    assert not fast.native_step.supports(torch.tensor([[1]]), 0, cache, None)
    with torch.inference_mode():
        assert fast(torch.tensor([[1]]), 0, cache).shape == (1, 1, fast.config.vocab_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_attention_over_a_long_cache_equals_the_python_step(lib, dtype):
    """Hundreds of cached positions (split between threads by position, then by slices of the
    head dimension; Dh = 24 is not a multiple of the 16-wide slices): the same logits."""
    plain, _ = lib
    model = make_model(make_config(dim=96, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=512), seed=6)
    model = speed_up(model.to(dtype), pack=False, native=False)
    model.native_step = native.native_step(model, plain=plain)
    gen = torch.Generator().manual_seed(7)
    caches = [KVCache(model.config, 1, 320, dtype=dtype) for _ in range(2)]
    for name in ("k", "v"):
        history = torch.randn(getattr(caches[0], name).shape, generator=gen).to(dtype)
        for cache in caches:
            getattr(cache, name).copy_(history)
    with torch.inference_mode():
        for pos in (300, 301, 319):
            token = torch.randint(0, model.config.vocab_size, (1, 1), generator=gen)
            want, got = decode_step(model, token, pos, caches[0]).float(), model.native_step(token, pos, caches[1])
            tolerance = 1e-4 if dtype == torch.float32 else 0.05 * want.std().item()
            torch.testing.assert_close(got, want, rtol=0, atol=tolerance)


def test_c_step_on_a_left_padded_batch_equals_the_python_step(lib):
    """B rows at one cache slot with their own positions and a mask hiding each row's padding
    (what the generation engine passes for prompts of different lengths): the same logits."""
    plain, _ = lib
    model = speed_up(make_model(make_config(n_kv_heads=2), seed=8), native=False)
    model.native_step = native.native_step(model, plain=plain)
    pads = torch.tensor([0, 3, 5])
    caches = [KVCache(model.config, 3, 16) for _ in range(2)]
    gen = torch.Generator().manual_seed(9)
    for name in ("k", "v"):
        history = torch.randn(getattr(caches[0], name).shape, generator=gen)
        for cache in caches:
            getattr(cache, name).copy_(history)
    with torch.inference_mode():
        for pos in (8, 9, 10):
            tokens = torch.randint(0, 101, (3, 1), generator=gen)
            positions = (pos - pads)[:, None]                                       # [B, 1]
            key = torch.arange(pos + 1)
            mask = ((key[None, :] >= pads[:, None]) | (key == pos))[:, None, None, :]  # [B, 1, 1, S]
            assert model.native_step.supports(tokens, pos, caches[1], mask)
            want = decode_step(model, tokens, pos, caches[0], positions, mask)
            got = model.native_step(tokens, pos, caches[1], positions, mask)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-5)
