"""Weight-only int4: 4-bit weights with a scale and an offset per group of 32 (GGUF's Q4_1 scheme).

    a group g of 32 weights in row n:   w ~= (q - 8) * scale[g, n] + zero[g, n],   q in 0..15

Half the bytes of int8, an eighth of float32.  This is the format the embedded
default model ships in: its GGUF stores every layer matrix as Q4_1 blocks
(w = d * q + m), which are the same thing with scale = d and zero = m + 8d, so
`int4_from_q4_1` runs the file's own 4-bit weights instead of dequantizing them
to 538 MB of float32 first (Q4_0, w = d * (q - 8), is scale = d, zero = 0).
Quantizing a float matrix (`quantize_groups`) picks each group's min and max,
as llama.cpp's Q4_1 quantizer does.

The matmul is PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), which
unpacks the 4-bit weights inside the product.  It takes bfloat16 activations
and bfloat16 scales/offsets (its float32 variant is ~20x slower): rounding the
fp16 Q4_1 scales to bf16 moves a weight by at most 1/50 of its quantization
step.  CPU only: on other devices use int8 or 16-bit weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from llama3.checkpoint.gguf_blocks import decode_q4_0, decode_q4_1
from llama3.model import Lean

from llama3.fast import kernels
from llama3.fast.packed import PackedLinear, can_pack
from llama3.fast.quantize import CPU_HAS_BF16, PREFILL_ROWS, Int8Linear

GROUP = 32  # weights per scale/offset pair, as in GGUF's Q4_0/Q4_1 blocks


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q int32 [N, K] in 0..15, scale [N, K/32], zero [N, K/32]) float32,
    with w ~= (q - 8) * scale + zero; each group's min and max are represented exactly."""
    n_rows, k = weight.shape
    if k % GROUP:
        raise ValueError(f"int4 groups are {GROUP} weights; a row of {k} is not a multiple of {GROUP}")
    w = weight.detach().float().reshape(n_rows, k // GROUP, GROUP)     # [N, K/32, 32]
    low, high = w.amin(dim=-1), w.amax(dim=-1)                         # [N, K/32]
    scale = ((high - low) / 15).clamp(min=1e-12)                       # 16 levels span [low, high]
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n_rows, k), scale, low + 8 * scale


def int4_from_q4_1(raw: np.ndarray, shape: tuple[int, int]):
    """GGUF Q4_1 bytes (w = d*q + m per block, decoded by `checkpoint/gguf_blocks.py`) ->
    (q [N, K] uint8, scale [N, K/32], zero [N, K/32]) in this module's convention."""
    q, d, m = decode_q4_1(raw, shape)
    d, m = d.float(), m.float()
    return q, d, m + 8 * d


def int4_from_q4_0(raw: np.ndarray, shape: tuple[int, int]):
    """GGUF Q4_0 bytes (w = d*(q - 8) per block) -> (q, scale, zero)."""
    q, d = decode_q4_0(raw, shape)
    d = d.float()
    return q, d, torch.zeros_like(d)


def fits_int4(shape: tuple[int, int]) -> bool:
    """The kernel packs rows in blocks of 16 and groups columns 32 at a time."""
    n_rows, k = shape
    return n_rows % 16 == 0 and k % GROUP == 0


class Int4Linear(Lean):
    """A bias-free linear layer with int4 weights, packed for PyTorch's CPU kernel on first use.

    Until then the 4-bit values are kept one per byte (`q`), so fused projections can
    stack the rows of several matrices (`Int4Linear.stack`) before the kernel's packing,
    whose layout interleaves rows, is applied."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.q = q.to(torch.uint8)                                      # [N, K], values 0..15; None once packed
        self.packed = None                                              # [N, K/2] uint8, the kernel's layout
        self.native = None                                              # the C++ kernels, where the plan chose them
        scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1)   # [K/32, N, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())

    @classmethod
    def stack(cls, linears: list["Int4Linear"]) -> "Int4Linear":
        """One Int4Linear whose rows are the given ones' rows, in order (before their first use)."""
        if any(lin.q is None for lin in linears):
            raise ValueError("Int4Linear rows can only be stacked before the first forward packs them")
        scales_and_zeros = torch.cat([lin.scales_and_zeros for lin in linears], dim=1)  # [K/32, N1 + N2.., 2]
        scale, zero = scales_and_zeros.unbind(-1)
        return cls(torch.cat([lin.q for lin in linears]), scale.t(), zero.t())

    def dequantized(self) -> torch.Tensor:
        """The float32 matrix [N, K] these weights stand for (before packing only)."""
        if self.q is None:
            raise ValueError("an Int4Linear can be read back only before the first forward packs it")
        scale, zero = self.scales_and_zeros.float().unbind(-1)           # [K/32, N] each
        groups = (self.q.float() - 8).unflatten(1, (-1, GROUP))          # [N, K/32, 32]
        return (groups * scale.t()[..., None] + zero.t()[..., None]).flatten(1)

    def pack(self) -> "Int4Linear":
        """Pack the 4-bit values into the kernel's layout (once; `speed_up` does it after fusing)."""
        if self.packed is None:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.q.to(torch.int32), 1)
            self.q = None
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        if linear.bias is not None:
            raise ValueError("Int4Linear has no bias; Llama linears have none")
        return cls(*quantize_groups(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        if x.device.type != "cpu":
            raise RuntimeError("int4 weights run on the CPU only; use --quantize int8 or bfloat16 elsewhere")
        self.pack()
        decoding = x.numel() < PREFILL_ROWS * self.in_features
        if self.native is not None and decoding:  # C++ matvec on the packed bytes
            return getattr(torch.ops, self.native).matvec(x, self.packed, self.scales_and_zeros, 3, self.out_features)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        wide = None
        if not decoding and CPU_HAS_BF16 and kernels.library() is not None and self.out_features % 64 == 0:
            wide = kernels.library().dequantize_int4(self.packed, self.scales_and_zeros, self.out_features)
        if wide is not None:  # a prompt: the matrix widened to bf16 in C++, one 16-bit GEMM
            y = nn.functional.linear(rows, wide)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


class Bf16Head(Lean):
    """The output head kept in bfloat16 beside int4 blocks: x [..., D] -> logits [..., V] in `dtype`.

    4 bits are too coarse for the head, whose rounding errors land straight in the
    logits (on SmolLM2, int4 blocks alone move the last logits by <0.1 std; an int8
    head re-expressed from Q8_0 blocks moves them 4x more).  Packed for oneDNN where
    the CPU has bf16 instructions.  `table` [V, D] also serves a tied token embedding."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("table", weight.detach().to(torch.bfloat16).contiguous())  # [V, D]
        self.packed = PackedLinear(self.table) if can_pack(self.table) else None
        self.dtype = dtype
        self.native = None  # the C++ kernels, where the plan chose them (then nothing is packed)
        self.float_logits = False  # set by the plan for a 16-bit model (plan.float_logits_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None and x.numel() < PREFILL_ROWS * self.table.shape[1]:
            if self.float_logits:  # float32 logits straight from the kernel (plan.float_logits_head)
                return getattr(torch.ops, self.native).matvec(x.float(), self.table, None, 1, self.table.shape[0])
            return getattr(torch.ops, self.native).matvec(x, self.table, None, 1, self.table.shape[0]).to(self.dtype)
        x = x.to(torch.bfloat16)
        y = self.packed(x) if self.packed is not None else nn.functional.linear(x, self.table)
        return y.to(self.dtype)


class Bf16Embedding(nn.Module):
    """A tied token embedding reading the rows of a Bf16Head's table, returned in its dtype."""

    def __init__(self, head: Bf16Head):
        super().__init__()
        self.head = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return nn.functional.embedding(tokens, self.head.table).to(self.head.dtype)


def set_bf16_head(model: nn.Module, weight: torch.Tensor, dtype: torch.dtype, tied: bool) -> None:
    """Give `model` a Bf16Head made from `weight` [V, D] (and, when tied, a Bf16Embedding on it)."""
    model.output = Bf16Head(weight, dtype)
    if tied:
        model.tok_embeddings = Bf16Embedding(model.output)


@torch.no_grad()
def quantize_int4(model: nn.Module) -> nn.Module:
    """Swap the block linears of `model` (in place) for Int4Linear (any whose shape the kernel
    cannot pack for Int8Linear) and the output head for a Bf16Head.  Returns the model."""
    tied = model.output.weight is model.tok_embeddings.weight
    dtype = model.norm.weight.dtype
    for block in model.layers:
        for module in list(block.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    fits = fits_int4(tuple(child.weight.shape))
                    setattr(module, name, (Int4Linear if fits else Int8Linear).from_linear(child))
    set_bf16_head(model, model.output.weight, dtype, tied)
    return model
