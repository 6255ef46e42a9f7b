"""Fast paths give the same answers as the readable model: fused projections exactly,
int8 weights within a stated tolerance."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_config, make_model
from llama3.fast.fuse import fuse_projections
from llama3.fast.quantize import (CPU_HAS_BF16, Int8Embedding, Int8Linear, dequantize_int8, int8_from_q8_0, quantize_int8,
                                  quantize_int8_groups)
from llama3.model import KVCache


def greedy(model, prompt, n):
    """Greedy tokens with a KV cache: prefill the prompt, then one token at a time."""
    cache = KVCache(model.config, 1, len(prompt) + n)
    logits = model(torch.tensor([prompt]), 0, cache)
    out, pos = [], len(prompt)
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), pos, cache)
        pos += 1
    return out


def test_fused_projections_same_logits_and_tokens(tiny_model):
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_model(tokens)
        want_tokens = greedy(tiny_model, [1, 2, 3], 8)
        fuse_projections(tiny_model)
        assert tiny_model.layers[0].attention.wqkv is not None and tiny_model.layers[0].feed_forward.w13 is not None
        assert not hasattr(tiny_model.layers[0].attention, "wq")
        torch.testing.assert_close(tiny_model(tokens), want, rtol=1e-5, atol=1e-5)
        assert greedy(tiny_model, [1, 2, 3], 8) == want_tokens


def test_quantize_int8_groups_roundtrip_error_is_half_a_step():
    w = torch.randn(16, 40)                                          # 40 is no multiple of 32: one group a row
    q, scales = quantize_int8_groups(w)
    assert q.dtype == torch.int8 and scales.shape == (16, 1)
    assert int(q.abs().amax(dim=1).min()) == 127                    # every group uses the full range
    err = (dequantize_int8(q, scales) - w).abs()
    assert bool((err <= scales.float() / 2 + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_dequantized_matmul(dtype):
    lin = nn.Linear(48, 24, bias=False)
    q8 = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 48).to(dtype)
    want = x.float() @ q8.dequantized().T  # the int8 weights, spelled out in fp32
    tol = 1e-4 if dtype == torch.float32 and not CPU_HAS_BF16 else 3e-2  # bf16 activations where the CPU has them
    torch.testing.assert_close(q8(x).float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(q8(x).float(), lin(x.float()).detach(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("tied", [False, True])
def test_int8_model_logits_close_and_greedy_tokens_mostly_equal(tied):
    """Stated tolerance: int8 logits differ from fp32 by < 4% of the logits' std on average and
    < 20% at worst; greedy tokens equal on most (>= 6 of 10) prompts of this random tiny model,
    whose next-token distributions are nearly flat (top probability ~0.1), so near-ties flip."""
    model = make_model(make_config(tie_embeddings=tied, vocab_size=101), seed=3)
    for p in model.parameters():  # sharper logits, so argmax is meaningful
        if p.dim() > 1:
            p.data.mul_(5.0)
    tokens = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    prompts = [[int(t) for t in torch.randint(0, 101, (4,), generator=torch.Generator().manual_seed(s))]
               for s in range(10)]
    with torch.no_grad():
        want = model(tokens)
        want_tokens = [greedy(model, p, 6) for p in prompts]
        quantize_int8(model)
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert isinstance(model.tok_embeddings, Int8Embedding) == tied
        error = (model(tokens) - want).abs()
        spread = float(want.std())
        same = sum(greedy(model, p, 6) == w for p, w in zip(prompts, want_tokens))
    assert 0 < float(error.mean()) < 0.04 * spread
    assert float(error.max()) < 0.20 * spread
    assert same >= 6, f"only {same}/10 prompts gave the same greedy tokens"


def test_quantizing_fused_equals_quantizing_separate(tiny_model):
    """Int8 scales (per group of a row) do not care which matrix a row came from: fuse-then-int8 == int8 alone."""
    import copy

    separate = copy.deepcopy(tiny_model)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a = quantize_int8(fuse_projections(tiny_model))(tokens)
        b = quantize_int8(separate)(tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_q8_0_blocks_run_as_they_are():
    """Q8_0 bytes built with gguf's own quantizer are, as int8 groups, exactly what the file means."""
    import gguf.quants as gguf_quants
    from gguf import GGMLQuantizationType

    w = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    w[:, :32] *= 0.1                                                  # blocks with different scales
    raw = gguf_quants.quantize(w, GGMLQuantizationType.Q8_0)         # uint8 [6, 68]
    exact = gguf_quants.dequantize(raw, GGMLQuantizationType.Q8_0)    # what the file means
    q, scales = int8_from_q8_0(raw, (6, 64))
    assert scales.shape == (6, 2)
    torch.testing.assert_close(dequantize_int8(q, scales), torch.from_numpy(exact), rtol=0, atol=0)


def test_gguf_straight_to_int8_equals_quantizing_the_loaded_model(tmp_path):
    """An F32 .gguf read by load_gguf_int8 gives the same model as load() + quantize_int8()."""
    from llama3.checkpoint.gguf import write_gguf
    from llama3.fast import load_fast, speed_up
    from llama3.llm import LLM, load

    for tied in (False, True):
        config = make_config(tie_embeddings=tied)
        path = tmp_path / f"tiny-{tied}.gguf"
        write_gguf(LLM(make_model(config), config), path, file_type="f32")
        direct = load_fast(path, quantize="int8", fuse=True)
        assert not any(isinstance(m, nn.Linear) for m in direct.model.modules())
        assert direct.model.layers[0].attention.wqkv is not None
        reference = speed_up(load(path, plain=True).model, "int8")  # the same plan after quantizing the float model
        tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
        with torch.no_grad():
            torch.testing.assert_close(direct.model(tokens), reference(tokens), rtol=1e-5, atol=1e-5)


def test_speed_up_rejects_unknown_quantization(tiny_model):
    from llama3.errors import Llama3Error
    from llama3.fast import speed_up

    with pytest.raises(Llama3Error, match="int3"):
        speed_up(tiny_model, quantize="int3")


@pytest.mark.skipif(not __import__("os").environ.get("LLAMA3_SLOW_TESTS"),
                    reason="compiling takes minutes on a small CPU; set LLAMA3_SLOW_TESTS=1")
def test_compiled_model_generates_the_same_tokens(tiny_model):
    from llama3.fast.compile import compile_model
    from llama3.generate import GenerationSettings, generate_tokens

    settings = GenerationSettings(max_new_tokens=12)
    plain = generate_tokens(tiny_model, [[1, 2, 3]], settings)
    list(plain)
    compiled = generate_tokens(compile_model(tiny_model), [[1, 2, 3]], settings)
    list(compiled)
    assert compiled.tokens == plain.tokens and len(plain.tokens[0]) == 12


def test_norm_kernels_give_the_same_numbers(tiny_model):
    """PyTorch's F.rms_norm and the C++ kernel in RMSNorm's slot equal the readable RMSNorm:
    exactly in float32, and to bf16 rounding in bfloat16 (all normalise in float32)."""
    from llama3.fast import kernels
    from llama3.model import RMSNorm

    slots = [kernels.rms_norm_torch] + ([kernels.rms_norm] if kernels.library() is not None else [])

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 0.0), (torch.bfloat16, 1e-2)):
        norm = RMSNorm(64, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.3)
        x = (torch.randn(2, 7, 64) * 3).to(dtype)
        expected = norm(x)
        for slot in slots:
            norm.kernel = slot
            torch.testing.assert_close(norm(x).float(), expected.float(), atol=tol + 1e-6, rtol=tol + 1e-6)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = tiny_model(tokens)
        for slot in slots:
            for module in tiny_model.modules():
                if isinstance(module, RMSNorm):
                    module.kernel = slot
            torch.testing.assert_close(tiny_model(tokens), expected, atol=1e-5, rtol=1e-5)
