"""int4 weights: group quantization, GGUF Q4_0/Q4_1 blocks read as they are, and the int4 model."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_config, make_model
from llama3.fast import load_fast, speed_up
from llama3.fast.int4 import (GROUP, Bf16Embedding, Bf16Head, Int4Linear, int4_from_q4_0, int4_from_q4_1,
                              quantize_groups, quantize_int4)


def dequantized(q, scale, zero):
    """(q [N, K], scale/zero [N, K/32]) -> the float matrix they stand for: (q - 8) * scale + zero."""
    return (q.float() - 8) * scale.repeat_interleave(GROUP, 1) + zero.repeat_interleave(GROUP, 1)


def test_quantize_groups_error_is_half_a_step_and_ends_are_exact():
    w = torch.randn(16, 96) * torch.linspace(0.1, 3, 96)
    q, scale, zero = quantize_groups(w)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    back = dequantized(q, scale, zero)
    step = scale.repeat_interleave(GROUP, 1)
    assert bool(((back - w).abs() <= step / 2 + 1e-5).all())
    groups = w.reshape(16, 3, GROUP)
    torch.testing.assert_close(back.reshape(16, 3, GROUP).amin(-1), groups.amin(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(back.reshape(16, 3, GROUP).amax(-1), groups.amax(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_q4_blocks_read_exactly_as_gguf_dequantizes_them(kind):
    """Q4_0/Q4_1 bytes made by gguf's own quantizer mean, in our convention, exactly what gguf's
    dequantizer says (float32, before the kernel's bf16 scales)."""
    import gguf.quants as gguf_quants
    from gguf import GGMLQuantizationType

    w = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
    w[:, :32] *= 0.05                                                   # blocks of different scales
    qtype = getattr(GGMLQuantizationType, kind)
    raw = gguf_quants.quantize(w, qtype)
    exact = torch.from_numpy(gguf_quants.dequantize(raw, qtype))
    reader = int4_from_q4_1 if kind == "Q4_1" else int4_from_q4_0
    q, scale, zero = reader(raw, (32, 128))
    torch.testing.assert_close(dequantized(q, scale, zero), exact, rtol=0, atol=1e-6)
    lin = Int4Linear(q, scale, zero)
    x = torch.randn(3, 128)
    want = x @ exact.T
    torch.testing.assert_close(lin(x), want, rtol=0.02, atol=0.02 * float(want.abs().max()))


def test_int4_linear_stacks_like_the_stacked_matrix():
    parts = [torch.randn(n, 64) for n in (32, 16, 16)]
    separate = [Int4Linear(*quantize_groups(p)) for p in parts]
    fused = Int4Linear.stack(separate)
    x = torch.randn(2, 64)
    assert fused.out_features == 64
    assert torch.equal(fused(x), torch.cat([lin(x) for lin in separate], dim=-1))


@pytest.mark.parametrize("tied", [False, True])
def test_int4_model_logits_close_to_float(tied):
    """Stated tolerance (random tiny model with Gaussian weights, sharpened, where 16 levels per
    group are coarse: ~20% measured): int4 blocks + bf16 head move logits by < 30% of their std
    on average and < 150% at worst (broken scales or offsets give errors many times the std);
    the lean decode step gives the int4 model's readable forward's tokens."""
    from llama3.generate import GenerationSettings, generate_tokens

    model = make_model(make_config(tie_embeddings=tied, hidden_dim=128), seed=5)
    for p in model.parameters():
        if p.dim() > 1:
            p.data.mul_(5.0)
    tokens = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
        plain = quantize_int4(copy.deepcopy(model))
        fast = speed_up(copy.deepcopy(model), quantize="int4", native=False)  # fused, PyTorch's int4 kernel
        kernels = speed_up(copy.deepcopy(model), quantize="int4")            # and the C++ one where it builds
        assert isinstance(plain.output, Bf16Head)
        assert isinstance(plain.tok_embeddings, Bf16Embedding) == tied
        assert isinstance(plain.layers[0].attention.wq, Int4Linear)
        assert isinstance(fast.layers[0].attention.wqkv, Int4Linear)
        assert not any(type(m) is nn.Linear for m in fast.modules())
        error = (plain(tokens) - want).abs()
        torch.testing.assert_close(fast(tokens), plain(tokens), rtol=1e-4, atol=1e-4)
        # the C++ kernel keeps float32 activations where PyTorch's rounds them to bf16
        rounding = (kernels(tokens) - plain(tokens)).abs()
        assert float(rounding.mean()) < 0.02 * float(want.std()) and float(rounding.max()) < 0.1 * float(want.std())
    assert float(error.mean()) < 0.30 * float(want.std())
    assert float(error.max()) < 1.50 * float(want.std())
    settings = GenerationSettings(max_new_tokens=8)
    a, b = generate_tokens(plain, [[1, 2, 3]], settings), generate_tokens(fast, [[1, 2, 3]], settings)
    list(a), list(b)
    assert a.tokens == b.tokens  # (the C++ kernels' other rounding may break this sharpened model's near-ties)


def test_int4_refuses_accelerators():
    from llama3.errors import Llama3Error

    with pytest.raises(Llama3Error, match="CPU only|not available"):  # (this machine may lack CUDA itself)
        load_fast(None, quantize="int4", device="cuda")


def test_embedded_q4_1_model_runs_its_own_4bit_weights(default_llm):
    """The default model's Q4_1 blocks loaded as int4 compute what the float32 model (the same
    blocks dequantized) computes, up to bf16 activations and head: last-position logits within
    15% of their std, and most greedy continuations identical."""
    fast = load_fast(None, quantize="int4")
    layer = fast.model.layers[0]
    assert isinstance(layer.attention.wqkv, Int4Linear) and isinstance(layer.feed_forward.w13, Int4Linear)
    prompts = ["The three primary colors are", "def fibonacci(n):", "Once upon a time",
               "Water boils at", "The capital of France is"]
    same = 0
    for prompt in prompts:
        ids = torch.tensor([default_llm.tokenizer.encode(prompt)])
        with torch.inference_mode():
            want, got = default_llm.model(ids)[0, -1], fast.model(ids)[0, -1]
        assert float((got - want).abs().max()) < 0.15 * float(want.std()), prompt
        same += fast.generate(prompt, max_new_tokens=8, temperature=0) == \
            default_llm.generate(prompt, max_new_tokens=8, temperature=0)
    assert same >= 3, f"only {same}/5 greedy continuations equal"


def test_dequantized_reads_back_the_groups():
    w = torch.randn(32, 64)
    lin = Int4Linear(*quantize_groups(w))
    want = dequantized(*quantize_groups(w))
    torch.testing.assert_close(lin.dequantized(), want, rtol=0, atol=0.02 * float(want.abs().max()))  # bf16 scales


def test_gguf_with_shapes_the_int4_kernel_cannot_pack_still_loads(tmp_path):
    """head_dim 8 with one kv head: wk/wv have 8 rows (the kernel packs 16 at a time), so q/k/v
    are stacked as int8 while the feed-forward stays int4; the model runs close to float."""
    import llama3
    from llama3.checkpoint.gguf import write_gguf
    from llama3.fast.quantize import Int8Linear
    from llama3.llm import LLM

    config = make_config(dim=32, n_heads=4, n_kv_heads=1, hidden_dim=48)
    path = tmp_path / "odd.gguf"
    write_gguf(LLM(make_model(config), config), path, file_type="f32")
    fast = load_fast(path, quantize="int4")
    block = fast.model.layers[0]
    assert isinstance(block.attention.wqkv, Int8Linear) and isinstance(block.feed_forward.w13, Int4Linear)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        got, want = fast.model(tokens), llama3.load(path).model(tokens)
    assert float((got - want).abs().mean()) < 0.3 * float(want.std())
