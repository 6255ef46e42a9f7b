"""Fused projections: one matmul where the readable model does two or three.

    q, k, v = x @ Wqᵀ, x @ Wkᵀ, x @ Wvᵀ    ->   [q | k | v] = x @ [Wq; Wk; Wv]ᵀ, then split
    gate, up = x @ W1ᵀ, x @ W3ᵀ             ->   [gate | up] = x @ [W1; W3]ᵀ, then split

The arithmetic is identical (each output element is the same dot product), but
the input is read once and the kernel launched once: fewer, larger matmuls,
which matters when decoding one token spends its time on per-call overhead.

Applied after loading, from outside: `fuse_projections(model)` stacks the
weights, frees the separate matrices, and switches each Attention/FeedForward
to a subclass whose only difference is that one step.  Fusing works on float
and on int8 linears alike (per-row int8 scales do not care which matrix a row
came from), so quantizing before or after fusing gives the same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama3.fast.int4 import Int4Linear
from llama3.fast.quantize import Int8Linear, quantize_rows
from llama3.model import Attention, FeedForward, RMSNorm


def _stack(*linears: nn.Module) -> nn.Module:
    """One bias-free linear whose weight rows are the given linears' rows, in order
    (float nn.Linear, Int8Linear or Int4Linear: scales are stacked the same way)."""
    if all(isinstance(lin, Int4Linear) for lin in linears):
        return Int4Linear.stack(list(linears))
    if any(isinstance(lin, (Int4Linear, Int8Linear)) for lin in linears):
        # A mix (e.g. a k projection too narrow for the int4 kernel next to an int4 q): stack as int8
        linears = [lin if isinstance(lin, Int8Linear) else
                   Int8Linear(*quantize_rows(lin.dequantized() if isinstance(lin, Int4Linear) else lin.weight))
                   for lin in linears]
    if all(isinstance(lin, Int8Linear) for lin in linears):
        return Int8Linear(torch.cat([lin.weight for lin in linears]), torch.cat([lin.scales for lin in linears]))
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [N1 + N2 (+ N3), K]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class FusedAttention(Attention):
    """Attention with wq, wk, wv stacked into one `wqkv` [(H + 2*Hkv)*Dh, D]."""

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.wqkv(x).split((q_width, kv_width, kv_width), dim=-1)  # [B, T, H*Dh], 2x [B, T, Hkv*Dh]


class FusedFeedForward(FeedForward):
    """SwiGLU with the gate (w1) and up (w3) projections stacked into one `w13` [2F, D]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        gate, up = self.w13(x).chunk(2, dim=-1)           # [B, T, F] each
        return self.w2(F.silu(gate) * up)


class FusedRMSNorm(RMSNorm):
    """RMSNorm through PyTorch's `F.rms_norm`, one call where the readable version has six.
    It computes in float32 inside and rounds once to x's dtype, as the readable version
    does, so 16-bit inputs need no float32 copy in and out: the same numbers (bit for bit
    on bf16, tested), and ~13% of a SmolLM2 decode step saved on a 2-core CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def fuse_norms(model: nn.Module) -> nn.Module:
    """Switch every RMSNorm of `model` to `FusedRMSNorm` (in place; same weights); returns it."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether every block of `model` has its q/k/v and gate/up projections fused."""
    return all(isinstance(b.attention, FusedAttention) and isinstance(b.feed_forward, FusedFeedForward)
               for b in model.layers)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up in every block of `model` (in place, for inference); returns it."""
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        if type(attn) is Attention:
            attn.wqkv = _stack(attn.wq, attn.wk, attn.wv)
            del attn.wq, attn.wk, attn.wv
            attn.__class__ = FusedAttention  # same module, same state; only project_qkv differs
        if type(ffn) is FeedForward:
            ffn.w13 = _stack(ffn.w1, ffn.w3)
            del ffn.w1, ffn.w3
            ffn.__class__ = FusedFeedForward
    return model
