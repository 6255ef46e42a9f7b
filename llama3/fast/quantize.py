"""Weight-only int8 quantization in groups: each run of 32 weights of a row shares one scale (GGUF's Q8_0).

    W [N, K] (float)  ->  scale [N, K/32] = max |w| of the group / 127  (float16),
                          Wq [N, K] = round(W / scale of its group)     (int8, -127..127)
    y = x @ Wᵀ        ~=  sum over groups g of  scale[n, g] * (x_g @ Wq[n, g]ᵀ)    (activations stay float)

A quarter of the fp32 bytes plus 2 bytes per 32 weights (1.06 bytes a weight, as Q8_0), and
decoding one token reads every weight once, so on a memory-bound CPU fewer bytes are more
tokens per second.  The rounding error per weight is at most half its group's step (scale / 2;
the scale is rounded *up* to float16, so no weight is clipped).  Why groups: with one scale per
row (what this module did before), a row's largest weight sets the step for all 576-1536 of
them; on the embedded model, whose Q4_1 weights have their own scale per 32, that cost +0.66%
perplexity and matched the float32 greedy continuation on 4 of 16 prompts.  Per 32 the step
is ~1/17 of the 4-bit step it re-expresses (`benchmarks/perplexity_check.py` measures it).
A GGUF Q8_0 tensor is this format already: `int8_from_q8_0` runs its blocks as they are.

Groups may also carry a float16 offset (w = scale * q + offset): a GGUF Q4_1 block (w = d * q + m,
q in 0..15) is exactly that, so `int8_from_q4_1` holds the file's 4-bit weights as they are
(q as int8, d and m as scale and offset) instead of re-rounding them to symmetric int8 steps,
which cost 6 of 16 greedy continuations on the embedded model.  1.125 bytes a weight.

Applied from outside the model: `quantize_int8(model)` swaps every `nn.Linear` for an
`Int8Linear` (and, when the output head shares the embedding matrix, the embedding for an
`Int8Embedding` reading the same int8 rows), so model.py stays the readable float version.
Decoding runs the C++ matvec (`kernels.cpp`, kind INT8_GROUP; offsets add sum_g offset_g * sum of
x over group g, the sums taken once per call); prompts widen the matrix to bfloat16 in one C++
pass (`dequantize_int8`) for one GEMM; without the C++ kernels (or off the CPU) the matrix is widened to the
activations' dtype for each product (correct, slower: int4 or bf16 decode faster there).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llama3.checkpoint.gguf_blocks import decode_q4_1, decode_q8_0
from llama3.fast import kernels
from llama3.model import Lean


CPU_HAS_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# From this many input rows on (a prompt, not one decoded token), widening the weights to
# bfloat16 and running one 16-bit matrix-matrix product beats the weight-only kernels,
# which are built for matrix-vector products: for a 512-token prompt ~7x (int8) and ~3x (int4)
# on a 2-core Sapphire Rapids.
PREFILL_ROWS = 32
GROUP = 32  # weights per scale, as in GGUF's Q8_0 blocks


def group_size(k: int) -> int:
    """Weights per scale for rows of k weights: 32, or the whole row where k is not a multiple of 32."""
    return GROUP if k % GROUP == 0 else k


def quantize_int8_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group: weight [N, K] float -> (int8 [N, K], scales [N, K/G] float16),
    G = group_size(K); w ~= scale * q, |error| <= scale / 2, the largest |w| of a group maps to ±127."""
    w = weight.detach().float()
    n_rows, k = w.shape
    groups = w.reshape(n_rows, k // group_size(k), group_size(k))     # [N, K/G, G]
    top = groups.abs().amax(dim=-1)                                    # [N, K/G]
    if bool((top / 127 > torch.finfo(torch.float16).max).any()):
        raise ValueError(f"weights up to {float(top.max()):.3g} do not fit int8 with float16 scales")
    scales = (top / 127).to(torch.float16)                             # rounded to nearest ...
    rounded_down = scales.float() * 127 < top                          # ... and where that was down, one step up,
    scales = torch.where(rounded_down, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)
    inverse = torch.where(scales > 0, 1 / scales.float(), torch.zeros_like(top))  # all-zero groups stay 0
    q = torch.round(groups * inverse[..., None]).clamp(-127, 127).to(torch.int8)  # so |q| <= 127 without clipping
    return q.reshape(n_rows, k), scales


def int8_from_q8_0(blocks: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 bytes -> (int8 [N, K], scales [N, K/32] float16): the file's own blocks, as they are.
    blocks: the tensor's raw bytes, uint8 [N * K / 32 * 34] (decoded by `checkpoint/gguf_blocks.py`)."""
    return decode_q8_0(blocks, shape)


def int8_from_q4_1(blocks: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 bytes -> (int8 [N, K] in 0..15, scales, offsets [N, K/32] float16): the file's own
    4-bit weights, w = d * q + m, held exactly as int8 groups with an offset."""
    q, d, m = decode_q4_1(blocks, shape)
    return q.to(torch.int8), d, m


def dequantize_int8(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                    offsets: torch.Tensor | None = None) -> torch.Tensor:
    """(int8 [N, K], scales [N, K/G], offsets [N, K/G] or None) -> the matrix they stand for, [N, K]
    in `dtype`: scale * q (+ offset), computed in float32 (|q| <= 127 times a float16 scale is exact
    there; adding the offset rounds once, as gguf's own dequantize does), rounded once to `dtype`."""
    n_rows, k = weight.shape
    groups = weight.view(n_rows, scales.shape[1], -1).float() * scales.float()[..., None]   # [N, K/G, G]
    if offsets is not None:
        groups = groups + offsets.float()[..., None]
    # (one mixed-dtype torch.mul into a bf16 `out` makes the same numbers without the float32
    # temporary, but measured 1.5-2x slower for a prompt's four products; kernels.cpp's
    # dequantize_int8 does it in one pass where the C++ kernels are built)
    return groups.view(n_rows, k).to(dtype)


class Int8Linear(Lean):
    """A bias-free linear layer with int8 weights [N, K] and a float16 scale per group of G weights
    [N, K/G] (G = 32 as Q8_0, or the whole row where K is not a multiple of 32), and optionally a
    float16 offset per group, [N, K/G] (w = scale * q + offset: GGUF's Q4_1 held exactly)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        if scales.dim() != 2 or scales.shape[0] != self.out_features or self.in_features % scales.shape[1]:
            raise ValueError(f"int8 scales {list(scales.shape)} do not divide weights {list(weight_int8.shape)} into groups")
        if offsets is not None and offsets.shape != scales.shape:
            raise ValueError(f"int8 offsets {list(offsets.shape)} are not shaped as the scales {list(scales.shape)}")
        self.group = self.in_features // scales.shape[1]
        self.register_buffer("weight", weight_int8.contiguous())                 # [N, K] int8
        self.register_buffer("scales", scales.to(torch.float16).contiguous())   # [N, K/G] float16
        self.register_buffer("offsets", None if offsets is None else offsets.to(torch.float16).contiguous())
        self.native = None  # the C++ kernels' namespace name ("llama3"), where the plan chose them
        self.float_logits = False  # set by the plan on a 16-bit model's head (plan.float_logits_head)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; Llama linears have none")
        return cls(*quantize_int8_groups(linear.weight))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix [N, K] these weights stand for, exactly (float32) or rounded once to `dtype`."""
        return dequantize_int8(self.weight, self.scales, dtype, self.offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        few_rows = x.numel() < PREFILL_ROWS * self.in_features
        if self.native is not None and few_rows:  # decoding: the C++ matvec reads the groups in place
            x = x.float() if self.float_logits else x  # the head: float32 logits (plan.float_logits_head)
            return getattr(torch.ops, self.native).matvec(x, self.weight, self.scales, kernels.INT8_GROUP,
                                                           self.out_features, self.offsets)
        if x.device.type == "cpu" and CPU_HAS_BF16 and x.dtype in (torch.float32, torch.bfloat16) and not few_rows:
            # a prompt: the matrix widened to bfloat16 once (rounded once; in one C++ pass where the
            # plan chose the kernels), one 16-bit GEMM
            wide = getattr(torch.ops, self.native).dequantize_int8(self.weight, self.scales, self.offsets) \
                if self.native is not None else self.dequantized(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), wide).to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype))  # the same, in x's dtype (other devices, no C++)

    def extra_repr(self) -> str:
        offsets = " with offsets" if self.offsets is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 groups of {self.group}{offsets}"


class Int8Embedding(nn.Module):
    """Token embedding reading int8 rows (row v = its groups' scales times weight[v], plus their
    offsets where the groups have them), shareable
    with an Int8Linear head."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.head = head   # owns weight [V, D] int8 and scales [V, D/G]
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        rows = F.embedding(tokens, self.head.weight).float()                     # [B, T, D]
        scales = F.embedding(tokens, self.head.scales).float()                   # [B, T, D/G]
        rows = rows.unflatten(-1, (scales.shape[-1], -1)) * scales[..., None]    # [B, T, D/G, G]
        if self.head.offsets is not None:
            rows = rows + F.embedding(tokens, self.head.offsets).float()[..., None]
        return rows.flatten(-2).to(self.dtype)


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
