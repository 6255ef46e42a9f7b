"""GGUF block codecs (llama3/checkpoint/gguf_blocks.py) against the gguf package's own
`gguf.quants.dequantize`, an independent reference: the decoded integers and fp16 scales mean
exactly what the file means, and bytes that do not fit are one GGUFError."""

import gguf
import numpy as np
import pytest
import torch

from llama3.checkpoint.gguf_blocks import BLOCK, Q4_0, Q4_1, Q8_0, decode_q4_0, decode_q4_1, decode_q8_0
from llama3.checkpoint.gguf_file import GGUFError

T = gguf.GGMLQuantizationType


def blocks_of(kind: str, shape=(7, 96), seed=0):
    """(float32 weights, their bytes as the gguf package quantizes them to `kind`)."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[:, :BLOCK] *= 0.01                                                # blocks of very different scales
    w[:, BLOCK:2 * BLOCK] += 3.0                                        # and one far from zero (Q4_1's m)
    return w, gguf.quants.quantize(w, T[kind])


def test_layouts_are_ggmls_block_sizes():
    for kind, layout in (("Q8_0", Q8_0), ("Q4_0", Q4_0), ("Q4_1", Q4_1)):
        assert gguf.GGML_QUANT_SIZES[T[kind]] == (BLOCK, layout.itemsize), kind


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_decoded_blocks_mean_what_gguf_dequantizes(kind):
    w, raw = blocks_of(kind)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, T[kind]))     # [7, 96] float32
    n, k = w.shape
    if kind == "Q8_0":
        q, d = decode_q8_0(raw, (n, k))
        assert q.dtype == torch.int8 and d.dtype == torch.float16
        back = q.float().view(n, -1, BLOCK) * d.float()[..., None]
    elif kind == "Q4_0":
        q, d = decode_q4_0(raw, (n, k))
        back = (q.float().view(n, -1, BLOCK) - 8) * d.float()[..., None]
    else:
        q, d, m = decode_q4_1(raw, (n, k))
        back = q.float().view(n, -1, BLOCK) * d.float()[..., None] + m.float()[..., None]
    if kind != "Q8_0":
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert d.shape == (n, k // BLOCK)
    torch.testing.assert_close(back.view(n, k), exact, rtol=0, atol=0)


@pytest.mark.parametrize("decode", [decode_q8_0, decode_q4_0, decode_q4_1])
def test_bytes_that_do_not_fit_are_a_gguf_error(decode):
    kind = decode.__name__.removeprefix("decode_").upper()
    _, raw = blocks_of(kind, (4, 64))
    with pytest.raises(GGUFError, match="not a multiple of 32"):
        decode(raw, (4, 48))
    with pytest.raises(GGUFError, match="bytes, not"):
        decode(raw.reshape(-1)[:-1], (4, 64))
