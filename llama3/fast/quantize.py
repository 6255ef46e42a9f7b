"""Weight-only int8 quantization: each weight matrix stored as int8 plus one scale per output row.

    W [N, K] (float)  ->  scale [N] = max_k |W[n, k]| / 127,   Wq [N, K] = round(W / scale) (int8)
    y = x @ Wᵀ        ~=  (x @ Wqᵀ) * scale                     (activations stay float)

A quarter of the fp32 bytes (half of bf16), and decoding one token reads every
weight once, so on a memory-bound CPU fewer bytes are more tokens per second.
The rounding error per weight is at most scale / 2, i.e. 0.4% of the row's
largest weight; `llama3 perplexity --quantize int8` measures what it costs.

Applied from outside the model: `quantize_int8(model)` swaps every `nn.Linear`
for an `Int8Linear` (and, when the output head shares the embedding matrix, the
embedding for an `Int8Embedding` reading the same int8 rows), so model.py stays
the readable float version.  `int8_from_q8_0` builds the same int8 rows from a
GGUF Q8_0 tensor's blocks without materialising the float matrix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llama3.model import Lean


CPU_HAS_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# From this many input rows on (a prompt, not one decoded token), widening the weights to
# bfloat16 and running one 16-bit matrix-matrix product beats the weight-only kernels,
# which are built for matrix-vector products: for a 512-token prompt ~7x (int8) and ~3x (int4)
# on a 2-core Sapphire Rapids.  The widening is exact for int8 values.
PREFILL_ROWS = 32


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight [N, K] float -> (int8 [N, K], scales [N] float32)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0        # [N]: the largest |w| of a row maps to 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q, scales


def int8_from_q8_0(blocks: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 bytes -> per-row int8 (int8 [N, K], scales [N] float32), one row at a time in float.

    Q8_0 stores each run of 32 weights as (fp16 scale d, 32 int8 values q): w = d * q.
    A row has K/32 blocks with different d; re-expressed with the row's largest d,
    q' = round(q * d / d_max) loses nothing for the block with d_max and at most half
    a step for the others.  Only 256 rows at a time are ever held in float.
    blocks: the tensor's raw bytes, uint8 [N * K / 32 * 34].
    """
    n_rows, k = shape
    if k % 32:
        raise ValueError(f"Q8_0 rows hold whole 32-weight blocks; K={k} is not a multiple of 32")
    raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(n_rows, k // 32, 34)  # [N, K/32, 2 + 32]
    d = torch.from_numpy(raw[:, :, :2].copy().view(np.float16).astype(np.float32))[..., 0]  # [N, K/32]
    q = torch.from_numpy(raw[:, :, 2:].copy().view(np.int8))                                 # [N, K/32, 32]
    d_max = d.abs().amax(dim=1).clamp(min=1e-12)                                             # [N]
    rel = d / d_max[:, None]                                                                 # [N, K/32], in [-1, 1]
    out = torch.empty(n_rows, k, dtype=torch.int8)
    for start in range(0, n_rows, 256):  # [256, K/32, 32] float at a time, never the whole matrix
        rows = slice(start, start + 256)
        out[rows] = torch.round(q[rows].float() * rel[rows, :, None]).clamp(-127, 127).to(torch.int8).flatten(1)
    return out, d_max


class Int8Linear(Lean):
    """A bias-free linear layer with int8 weights [N, K] and float32 per-row scales [N]."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight", weight_int8)  # [N, K] int8
        self.register_buffer("scales", scales)       # [N] float32
        self._scales_as = None                       # scales in the kernel's dtype, made on first use
        self.native = None                           # the C++ kernels' namespace name ("llama3"), where the plan chose them

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; Llama linears have none")
        return cls(*quantize_rows(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        if self.native is not None and x.numel() < PREFILL_ROWS * self.in_features:  # decoding: C++ matvec
            return getattr(torch.ops, self.native).matvec(x, self.weight, self.scales, 2, self.out_features)
        if x.device.type == "cpu":
            # One fused kernel: int8 weights are widened inside the matmul, never written out.
            # It runs ~5x faster on bfloat16 activations than on float32 ones (measured on a
            # Sapphire Rapids CPU), so float32 inputs are rounded to bfloat16 for it where
            # the CPU has bfloat16 instructions.
            compute = torch.bfloat16 if x.dtype == torch.float32 and CPU_HAS_BF16 else x.dtype
            if self._scales_as is None or self._scales_as.dtype != compute:
                self._scales_as = self.scales.to(compute)  # converted once, not on every call
            rows = x.reshape(-1, self.in_features).to(compute)
            if compute == torch.bfloat16 and rows.shape[0] >= PREFILL_ROWS:  # a prompt: one bf16 GEMM
                y = F.linear(rows, self.weight.to(torch.bfloat16)) * self._scales_as
            else:
                y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self._scales_as)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # the same, spelled out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Int8Embedding(nn.Module):
    """Token embedding reading int8 rows (row v = scales[v] * weight[v]), shareable with an Int8Linear head."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.head = head   # owns weight [V, D] int8 and scales [V]
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        rows = F.embedding(tokens, self.head.weight).to(self.dtype)       # [B, T, D]
        return rows * self.head.scales[tokens].unsqueeze(-1).to(self.dtype)


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every nn.Linear of `model` (in place) for an Int8Linear; returns the model.

    skip: names of linears to keep in float (e.g. ("output",)).  When the output head
    shares the embedding matrix (tied embeddings), the embedding is swapped for an
    Int8Embedding reading the head's int8 rows, so the float matrix is freed.
    """
    tied = getattr(model, "output", None) is not None and hasattr(model, "tok_embeddings") \
        and model.output.weight is model.tok_embeddings.weight
    dtype = next(model.parameters()).dtype
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, Int8Linear.from_linear(child))
    if tied and "output" not in skip:
        model.tok_embeddings = Int8Embedding(model.output, dtype)
    return model
