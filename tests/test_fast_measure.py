"""`llama3.fast.measure` reports what it actually measured (no timing asserted)."""

import pytest
import torch

from conftest import make_config, make_model
from llama3.fast.measure import measure


def test_decode_tokens_is_what_was_generated_when_the_context_caps_it():
    model = make_model(make_config(max_seq_len=24)).eval()
    report = measure(model, prefill_tokens=8, new_tokens=100)
    assert report.decode_tokens == 24 - 16  # the 16-token prompt leaves room for 8
    assert measure(model, prefill_tokens=8, new_tokens=3).decode_tokens == 3
    assert report.engine_decode_tokens_per_second > 0          # the engine's decode ran too, within the context
    assert measure(model, prefill_tokens=8, new_tokens=3, engine=False).engine_decode_tokens_per_second is None


# ------------------------------------------------------------ the memory bound
def _linear_shapes(config):
    """(N, K) of every matrix a decoding step multiplies by, from the config alone."""
    d, dh, f = config.dim, config.head_dim, config.hidden_dim
    per_layer = [(config.n_heads * dh, d), (config.n_kv_heads * dh, d), (config.n_kv_heads * dh, d),
                 (d, config.n_heads * dh), (f, d), (f, d), (d, f)]
    return per_layer * config.n_layers + [(config.vocab_size, d)]


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_per_token_counts_every_matrix_once(tied):
    """float32: 4 bytes per weight of every block matrix and the head (a tied head is the
    embedding table, counted once); bf16 half that; int8 one byte plus a float16 scale per 32 weights."""
    from llama3.fast import speed_up
    from llama3.fast.measure import weight_bytes_per_token
    from llama3.params import count_params

    config = make_config(tie_embeddings=tied)
    shapes = _linear_shapes(config)
    weights = sum(n * k for n, k in shapes)
    counts = count_params(config)
    assert weights == counts.attention + counts.feed_forward + (counts.output or counts.embedding)
    assert weight_bytes_per_token(make_model(config)) == 4 * weights
    assert weight_bytes_per_token(speed_up(make_model(config))) == 4 * weights            # fused: same bytes
    assert weight_bytes_per_token(speed_up(make_model(config).to(torch.bfloat16))) == 2 * weights
    assert weight_bytes_per_token(speed_up(make_model(config), "int8")) == sum(n * k + 2 * n * k // 32 for n, k in shapes)


def test_int4_counts_half_a_byte_a_weight_and_a_bf16_head():
    from llama3.fast import speed_up
    from llama3.fast.int4 import Int4Linear
    from llama3.fast.measure import weight_bytes_per_token

    config = make_config(dim=64, hidden_dim=128, vocab_size=96)
    model = speed_up(make_model(config), "int4")
    blocks = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert blocks
    want = sum(m.out_features * m.in_features // 2 + m.scales_and_zeros.numel() * 2 for m in blocks)
    head = config.vocab_size * config.dim * 2                                     # bfloat16 [V, D]
    others = sum(n * k + 4 * n for n, k in _linear_shapes(config)[:-1]) - sum(
        m.out_features * m.in_features + 4 * m.out_features for m in blocks)     # rows left in int8, if any
    assert weight_bytes_per_token(model) == want + head + others


def test_memory_read_speed_is_a_positive_rate():
    from llama3.fast.measure import DecodeBound, memory_read_bytes_per_second

    rate = memory_read_bytes_per_second(8 * 2**20, repeats=2)
    assert 0 < rate < float("inf")
    assert DecodeBound(100, 1000.0, False).tokens_per_second == 10.0
