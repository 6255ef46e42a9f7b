"""The model computes what the references compute.

Reference 1: transformers' LlamaForCausalLM, random weights, written with its own
save_pretrained and read back through our HF loader (so the HF<->Meta name map
and the q/k rotary permutation are checked too).
Reference 2: Meta's formulas (complex-number RoPE, apply_scaling) written out
independently below.
"""

import math

import pytest
import torch

import llama3
from llama3.config import RopeScaling
from llama3.model import KVCache, RotaryEmbedding, apply_rope, apply_rope_real, rope_frequencies

from conftest import make_config, make_model

import transformers  # the reference: a dev dependency, never skipped

# Small HF configs: grouped-query / multi-head / multi-query, RoPE scaling on/off, tied/untied, odd vocabularies.
HF_CONFIGS = {
    "gqa-untied": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96, vocab_size=101, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=128, tie_word_embeddings=False),
    "mha-tied-scaled": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            intermediate_size=160, vocab_size=97, rms_norm_eps=1e-6, rope_theta=500000.0,
                            max_position_embeddings=256, tie_word_embeddings=True,
                            rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=16)),
    "mqa-scaled8": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1,
                        intermediate_size=200, vocab_size=257, rms_norm_eps=1e-5, rope_theta=10000.0,
                        max_position_embeddings=128, tie_word_embeddings=False,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
}


def hf_reference(hf_config: dict, folder, seed: int = 0):
    """A random transformers LlamaForCausalLM saved to `folder`; returns (hf_model, our LLM)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf_config)
    config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so that a swapped norm would show
        for name, p in hf.named_parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.normal_(1.0, 0.2)
    hf.save_pretrained(folder)
    return hf, llama3.load(folder)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_parity_with_transformers_fp32(name, tmp_path):
    hf, llm = hf_reference(HF_CONFIGS[name], tmp_path)
    assert llm.config.tie_embeddings == HF_CONFIGS[name]["tie_word_embeddings"]
    tokens = torch.randint(0, llm.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = llm.model(tokens)
    assert got.shape == expected.shape == (2, 48, llm.config.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-4


def test_parity_with_transformers_bf16(tmp_path):
    hf, _ = hf_reference(HF_CONFIGS["gqa-untied"], tmp_path)
    llm = llama3.load(tmp_path, dtype="bfloat16")
    assert llm.dtype == torch.bfloat16
    hf = hf.to(torch.bfloat16)
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        got = llm.model(tokens)
    assert (got - expected).abs().max().item() <= 0.1 * expected.abs().max().item()
    same = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert same >= 0.9


def test_fused_and_explicit_attention_agree(tiny_model):
    tokens = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        fused = tiny_model(tokens)
        for layer in tiny_model.layers:
            layer.attention.fused = False
        explicit = tiny_model(tokens)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)


def test_fused_and_explicit_attention_train_alike():
    """Training takes the fused kernel's own causal triangle and shared key/value heads (no repeat_kv):
    the same loss and gradients as the explicit path."""
    tokens = torch.randint(0, 101, (2, 33), generator=torch.Generator().manual_seed(3))
    grads = []
    for fused in (True, False):
        model = make_model()
        for layer in model.layers:
            layer.attention.fused = fused
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scaled", [False, True])
def test_cached_decoding_equals_full_forward(scaled):
    config = make_config(rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=16) if scaled else None)
    model = make_model(config)
    tokens = torch.randint(0, config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(config, batch_size=2, max_len=64)
        parts = [model(tokens[:, :7], 0, cache)]                        # prefill 7 tokens
        parts += [model(tokens[:, p:p + 1], p, cache) for p in range(7, 20)]  # then one at a time
        parts.append(model(tokens[:, 20:], 20, cache))                  # then a chunk of 10
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_model_trains():
    model = make_model(make_config(tie_embeddings=True))
    tokens = torch.randint(0, 101, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ------------------------------------------------------------------------- RoPE vs Meta
def meta_apply_scaling(freqs: torch.Tensor, factor, low_freq_factor, high_freq_factor, old_context_len):
    """llama-models llama3/model.py apply_scaling, written as Meta writes it: a loop over frequencies."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


@pytest.mark.parametrize("scaling", [None, RopeScaling(), RopeScaling(factor=32.0),
                                     RopeScaling(factor=8.0, original_max_position_embeddings=64)])
def test_rope_frequencies_match_meta(scaling):
    head_dim, theta = 128, 500000.0
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].double() / head_dim))
    if scaling is not None:
        freqs = meta_apply_scaling(freqs, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                                   scaling.original_max_position_embeddings)
    got = rope_frequencies(head_dim, theta, scaling)
    torch.testing.assert_close(got, freqs.float(), rtol=1e-6, atol=0)
    if scaling is not None:  # the scaling does something: the slowest pair is slowed by `factor`
        assert got[-1].item() == pytest.approx(rope_frequencies(head_dim, theta, None)[-1].item() / scaling.factor)


def test_rope_matches_complex_formulation():
    """Meta's RoPE: view channel pairs as complex numbers, multiply by e^(i*pos*freq) (torch.polar)."""
    batch, seqlen, heads, head_dim = 2, 11, 3, 16
    x = torch.randn(batch, seqlen, heads, head_dim)
    freqs = rope_frequencies(head_dim, 10000.0, RopeScaling(factor=8.0, original_max_position_embeddings=8))
    angles = torch.outer(torch.arange(seqlen).float(), freqs)                 # [T, Dh/2]
    freqs_cis = torch.polar(torch.ones_like(angles), angles)                  # [T, Dh/2] complex
    x_complex = torch.view_as_complex(x.reshape(batch, seqlen, heads, -1, 2))  # [B, T, H, Dh/2]
    expected = torch.view_as_real(x_complex * freqs_cis[None, :, None, :]).flatten(3)
    got = apply_rope(x, angles.cos(), angles.sin())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    real = apply_rope_real(x, angles.cos(), angles.sin())  # what runs under torch.compile
    torch.testing.assert_close(real, expected, atol=1e-5, rtol=1e-5)
    batched = apply_rope_real(x, angles.cos().expand(batch, -1, -1), angles.sin().expand(batch, -1, -1))
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)


def test_rope_tables_grow_for_later_positions_with_or_without_a_hint(tiny_config):
    rope = RotaryEmbedding(tiny_config, initial=8)
    cos, _ = rope(torch.arange(20, 30), needed=30)
    assert rope.cos.shape[0] >= 30 and cos.shape == (10, tiny_config.head_dim // 2)
    cos2, _ = RotaryEmbedding(tiny_config, initial=8)(torch.arange(20, 30))
    torch.testing.assert_close(cos, cos2)


def test_last_only_gives_the_last_positions_logits(tiny_model):
    """last_only=True (what generation asks for) == the last row of the full logits, with and without a cache."""
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = tiny_model(tokens)
        last = tiny_model(tokens, last_only=True)
        assert last.shape == (2, 1, tiny_model.config.vocab_size)
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
        cache = KVCache(tiny_model.config, 2, 9)
        tiny_model(tokens[:, :5], 0, cache)
        torch.testing.assert_close(tiny_model(tokens[:, 5:], 5, cache, last_only=True), full[:, -1:],
                                   rtol=1e-5, atol=1e-5)
