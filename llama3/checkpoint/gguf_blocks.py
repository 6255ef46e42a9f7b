"""GGUF's block layouts, decoded into their integer parts: the half of the GGUF reader that the
quantized loaders use (`fast/gguf_quantized.py`), beside `gguf_file.py` (header, metadata, tensor
list, dequantizing to float through the `gguf` package).

A quantized GGUF row of K weights is K/32 blocks; each block is one of these records
(ggml/src/ggml-common.h, little-endian), 32 weights per block:

    Q8_0   fp16 d, int8 qs[32]                     w[i] = d * qs[i]                     34 bytes
    Q4_0   fp16 d, uint8 qs[16]                    w[i] = d * (q[i] - 8)                18 bytes
    Q4_1   fp16 d, fp16 m, uint8 qs[16]            w[i] = d * q[i] + m                  20 bytes
           (Q4: byte j of qs holds q[j] in its low 4 bits and q[j + 16] in its high 4 bits)

Decoding gives the file's own integers and fp16 scales (nothing rounded), so a kernel can run
them as they are: `fast/quantize.py` runs Q8_0 blocks as int8 groups, `fast/int4.py` Q4_0/Q4_1 as
int4 groups.  `tests/test_gguf_blocks.py` checks every decoder against `gguf.quants.dequantize`.

Hand-written rather than `gguf.quants`: that one only dequantizes to float32, and the kernels
need the integers and scales themselves (a float32 copy is 4x the bytes the blocks hold).
"""

from __future__ import annotations

import numpy as np
import torch

from llama3.checkpoint.gguf_file import GGUFError

BLOCK = 32  # weights per block in Q8_0, Q4_0 and Q4_1

# One block of each type as a numpy record: `raw.view(Q8_0)["d"]` reads every block's scale.
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))])
Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (BLOCK // 2,))])
Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (BLOCK // 2,))])


def _records(raw: np.ndarray, shape: tuple[int, int], layout: np.dtype, name: str) -> np.ndarray:
    """A matrix's bytes -> its blocks [N, K/32] as `layout` records, or GGUFError when they do not fit."""
    n_rows, k = shape
    if k % BLOCK:
        raise GGUFError(f"{name} rows hold whole {BLOCK}-weight blocks; a row of {k} weights is not a multiple of {BLOCK}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != n_rows * (k // BLOCK) * layout.itemsize:
        raise GGUFError(f"{name} data for a {n_rows} x {k} matrix is {n_rows * (k // BLOCK) * layout.itemsize} "
                        f"bytes, not {raw.size}")
    return raw.view(layout).reshape(n_rows, k // BLOCK)


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """Q4 quants [N, K/32, 16] uint8 -> q [N, K] uint8 in 0..15 (low halves are weights 0-15, high 16-31)."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)                 # [N, K/32, 32]
    return torch.from_numpy(q.reshape(q.shape[0], -1))


def _halves(values: np.ndarray) -> torch.Tensor:
    """fp16 fields [N, K/32] -> a float16 tensor (a copy: the records are a view of the file)."""
    return torch.from_numpy(np.ascontiguousarray(values))


def decode_q8_0(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes of an [N, K] matrix -> (qs int8 [N, K], d float16 [N, K/32]); w = d * qs per block."""
    blocks = _records(raw, shape, Q8_0, "Q8_0")
    return torch.from_numpy(np.ascontiguousarray(blocks["qs"]).reshape(shape[0], -1)), _halves(blocks["d"])


def decode_q4_0(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 bytes -> (q uint8 [N, K] in 0..15, d float16 [N, K/32]); w = d * (q - 8) per block."""
    blocks = _records(raw, shape, Q4_0, "Q4_0")
    return _nibbles(blocks["qs"]), _halves(blocks["d"])


def decode_q4_1(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 bytes -> (q uint8 [N, K] in 0..15, d, m float16 [N, K/32]); w = d * q + m per block."""
    blocks = _records(raw, shape, Q4_1, "Q4_1")
    return _nibbles(blocks["qs"]), _halves(blocks["d"]), _halves(blocks["m"])
