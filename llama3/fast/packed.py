"""bfloat16 linears with weights packed once into oneDNN's blocked layout (CPU only).

A plain `F.linear` on bfloat16 weights re-reads the [N, K] matrix row by row;
oneDNN can instead reorder it once, at load time, into the tiled layout its
AVX512-BF16 / AMX kernels stream through.  For one token (a matrix-vector
product) this reads the same bytes with fewer instructions: on a 2-core
Sapphire Rapids, the 211 matrix-vector products of a SmolLM2-135M token take
~15 ms packed vs ~21 ms plain.  The results are bit-identical to `F.linear`
(same bf16 inputs, float32 accumulation, one rounding at the end).

The packed weight is an opaque oneDNN tensor: it cannot be indexed, saved or
trained, so this is for inference after loading.  A tied output head keeps the
embedding's plain matrix for lookups and gets its own packed copy.
"""

from __future__ import annotations

import torch
from torch import nn

from llama3.fast.quantize import CPU_HAS_BF16


def can_pack(weight: torch.Tensor) -> bool:
    """Packing helps (and works) for bfloat16 weights on a CPU with bfloat16 instructions."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and CPU_HAS_BF16


class PackedLinear(nn.Module):
    """A bias-free linear layer whose bf16 weight [N, K] lives in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)  # opaque [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] bf16 -> [..., N] bf16
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 packed for oneDNN"


@torch.no_grad()
def pack_linears(model: nn.Module) -> nn.Module:
    """Swap every bf16 nn.Linear of `model` (in place) for a PackedLinear; returns the model.
    A no-op where packing does not apply (other dtypes, other devices, no bf16 instructions)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None and can_pack(child.weight):
                setattr(module, name, PackedLinear(child.weight))
    return model
