"""Decoding through model.py's forward with the plan's slots, and packed bf16 linears, compute what the
readable model computes."""

import copy

import pytest
import torch
from torch import nn

from conftest import make_config, make_model
from llama3.fast import speed_up
from llama3.fast.fuse import fuse_projections
from llama3.fast.packed import PackedLinear, can_pack, pack_linears
from llama3.generate import GenerationSettings, generate_tokens
from llama3.model import KVCache, Transformer


CONFIGS = {
    "gqa": dict(),
    "mha": dict(n_kv_heads=4),
    "mqa-untied-scaled": dict(n_kv_heads=1, tie_embeddings=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_decoding_equals_the_readable_forward(name):
    """Logits of each one-token step with a cache equal the readable forward's (fused projections
    and the plan's kernels, through the same Transformer.forward)."""
    model = make_model(make_config(**CONFIGS[name]), seed=1)
    fused = speed_up(fuse_projections(copy.deepcopy(model)))
    prompt = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    caches = [KVCache(model.config, 2, 20) for _ in range(2)]
    with torch.no_grad():
        model(prompt, 0, caches[0])
        fused(prompt, 0, caches[1])
        for pos in range(7, 15):
            token = torch.randint(0, 101, (2, 1), generator=torch.Generator().manual_seed(pos))
            want = model(token, pos, caches[0])
            got = fused(token, pos, caches[1])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-6)


def test_speed_up_generates_the_same_tokens_alone_and_in_padded_batches(tiny_model):
    """Greedy generation through speed_up (fused + lean step): the same tokens as the readable
    model, one prompt at a time and in a left-padded batch (mask and per-row positions)."""
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4], [11]]
    settings = GenerationSettings(max_new_tokens=10)

    def run(model, batch):
        gen = generate_tokens(model, batch, settings)
        list(gen)
        return gen.tokens

    want = [run(tiny_model, [p])[0] for p in prompts]
    fast = speed_up(copy.deepcopy(tiny_model))
    assert type(fast) is Transformer and all(type(b.attention).__name__ == "Attention" for b in fast.layers)
    assert [run(fast, [p])[0] for p in prompts] == want
    assert run(fast, prompts) == want
    sampled = GenerationSettings(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    a, b = generate_tokens(tiny_model, prompts, sampled), generate_tokens(fast, prompts, sampled)
    list(a), list(b)
    assert a.tokens == b.tokens


def test_a_planned_model_without_fusing_still_trains(tiny_model):
    """The plan without fusing or quantizing (what llama3.load applies) keeps the weights: the
    kernels hand gradients to PyTorch, so logits and gradients are the plain model's."""
    fast = speed_up(copy.deepcopy(tiny_model), fuse=False)
    tokens = torch.tensor([[4, 5, 6, 7]])
    torch.testing.assert_close(fast(tokens), tiny_model(tokens), rtol=1e-5, atol=1e-5)
    cache = KVCache(tiny_model.config, 1, 8)
    out = fast(tokens[:, :1], 0, cache)
    assert out.requires_grad
    fast(tokens).sum().backward(), tiny_model(tokens).sum().backward()
    torch.testing.assert_close(fast.layers[0].attention.wq.weight.grad, tiny_model.layers[0].attention.wq.weight.grad)
    assert fast.state_dict().keys() == tiny_model.state_dict().keys()


def test_int8_model_fused_or_not_gives_the_same_tokens():
    model = make_model(make_config(tie_embeddings=True), seed=2)
    fast = speed_up(copy.deepcopy(model), quantize="int8")
    plain_int8 = speed_up(copy.deepcopy(model), quantize="int8", fuse=False, native=False)
    assert fast.layers[0].attention.wqkv is not None and plain_int8.layers[0].attention.wqkv is None
    settings = GenerationSettings(max_new_tokens=8)
    a, b = generate_tokens(fast, [[1, 2, 3]], settings), generate_tokens(plain_int8, [[1, 2, 3]], settings)
    list(a), list(b)
    assert a.tokens == b.tokens


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="this CPU has no bf16 instructions")
def test_packed_bf16_linear_is_bit_identical_to_f_linear():
    lin = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    packed = PackedLinear(lin.weight)
    for shape in ((1, 64), (3, 5, 64)):
        x = torch.randn(shape).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(packed(x), lin(x))


@pytest.mark.skipif(not can_pack(torch.zeros(1, dtype=torch.bfloat16)), reason="this CPU has no bf16 instructions")
def test_packed_bf16_model_equals_the_plain_bf16_model():
    model = make_model(make_config(tie_embeddings=True), seed=4).to(torch.bfloat16)
    packed = pack_linears(copy.deepcopy(model))
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert packed.tok_embeddings.weight.dtype == torch.bfloat16  # the embedding keeps its plain matrix
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(packed(tokens), model(tokens))


def test_packing_is_a_no_op_for_float32(tiny_model):
    pack_linears(tiny_model)
    assert not any(isinstance(m, PackedLinear) for m in tiny_model.modules())
    assert type(tiny_model) is Transformer


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not __import__("os").environ.get("LLAMA3_SLOW_TESTS"), reason="compiling takes a while on a small CPU; "
                                                                  "set LLAMA3_SLOW_TESTS=1"))])
def test_static_decoder_gives_the_engines_greedy_tokens(tiny_model, compiled):
    """The fixed-address cache (attention over every slot, unwritten ones masked) and the
    tensor position give the engine's greedy tokens for a batch of equal-length prompts."""
    from llama3.fast.static import StaticDecoder

    prompts = [[1, 2, 3, 4], [9, 8, 7, 6]]
    want = generate_tokens(tiny_model, prompts, GenerationSettings(max_new_tokens=10))
    list(want)
    decoder = StaticDecoder(speed_up(copy.deepcopy(tiny_model)), batch=2, max_len=16, compile=compiled)
    assert decoder.generate(torch.tensor(prompts), 10).tolist() == want.tokens
    with pytest.raises(ValueError, match="max_len=16"):
        decoder.generate(torch.tensor(prompts), 13)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_bf16_plans_head_answers_float32_logits(quantize):
    """A 16-bit model's head, run by the C++ matvec, answers float32 logits itself (plan.float_logits_head):
    model.py's `.float()` then copies nothing (that copy of [B, 1, V] opened an OpenMP region every
    token).  The logits are the readable bf16 model's within bf16 rounding, prompt and decoding alike,
    and greedy tokens agree."""
    from llama3.fast import kernels

    if kernels.library() is None:
        pytest.skip(f"no C++ kernels here: {kernels.build_error()}")
    model = make_model(make_config(vocab_size=101, n_layers=2), seed=4).to(torch.bfloat16)
    fast = speed_up(copy.deepcopy(model), quantize=quantize)
    assert fast.output.float_logits
    x = torch.randn(2, 1, model.config.dim).to(torch.bfloat16)
    with torch.no_grad():
        head = fast.output(x)
        assert head.dtype == torch.float32                             # no bf16 answer for .float() to copy
        want = model.output(x).float()
        spread = float(want.std())
        tol = 0.02 if quantize is None else 0.2                        # int8 / int4 heads: their own rounding
        assert float((head - want).abs().max()) < tol * spread + 1e-2
        prompt = torch.randint(0, 101, (1, 5), generator=torch.Generator().manual_seed(2))
        caches = [KVCache(model.config, 1, 12, dtype=torch.bfloat16) for _ in range(2)]
        for pos, tokens in [(0, prompt)] + [(5 + i, torch.tensor([[7 + i]])) for i in range(4)]:
            want, got = model(tokens, pos, caches[0]), fast(tokens, pos, caches[1])
            assert got.dtype == torch.float32
            if quantize is None:
                torch.testing.assert_close(got[:, -1], want[:, -1], rtol=0.05, atol=0.05 * float(want.std()))


def test_a_fp32_plans_head_keeps_its_dtype(tiny_model):
    """float32 models need no conversion: the head is left as it is (no extra operator a step)."""
    fast = speed_up(copy.deepcopy(tiny_model))
    assert not getattr(fast.output, "float_logits", False)
