"""Fused projections: one matmul where the readable model does two or three.

    q, k, v = x @ Wqᵀ, x @ Wkᵀ, x @ Wvᵀ    ->   [q | k | v] = x @ [Wq; Wk; Wv]ᵀ, then split
    gate, up = x @ W1ᵀ, x @ W3ᵀ             ->   [gate | up] = x @ [W1; W3]ᵀ, then split

The arithmetic is identical (each output element is the same dot product), but
the input is read once and the kernel launched once: fewer, larger matmuls,
which matters when decoding one token spends its time on per-call overhead.

Applied after loading, from outside: `fuse_projections(model)` stacks the
weights into `wqkv` / `w13` (set with setattr) and frees the separate matrices;
model.py's Attention and FeedForward use the stacked one where it is set.  Fusing works on float
and on int8 linears alike (int8 scales, per group of a row, do not care which matrix a row
came from), so quantizing before or after fusing gives the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from llama3.fast.int4 import Int4Linear
from llama3.fast.quantize import Int8Linear, quantize_int8_groups


def _stack(*linears: nn.Module) -> nn.Module:
    """One bias-free linear whose weight rows are the given linears' rows, in order
    (float nn.Linear, Int8Linear or Int4Linear: scales are stacked the same way)."""
    if all(isinstance(lin, Int4Linear) for lin in linears):
        return Int4Linear.stack(list(linears))
    if any(isinstance(lin, (Int4Linear, Int8Linear)) for lin in linears):
        # A mix (e.g. a k projection too narrow for the int4 kernel next to an int4 q): stack as int8
        linears = [lin if isinstance(lin, Int8Linear) else
                   Int8Linear(*quantize_int8_groups(lin.dequantized() if isinstance(lin, Int4Linear) else lin.weight))
                   for lin in linears]
    if all(isinstance(lin, Int8Linear) for lin in linears):
        offsets = None   # where any has offsets (Q4_1 groups), the others' are 0
        if any(lin.offsets is not None for lin in linears):
            offsets = torch.cat([lin.offsets if lin.offsets is not None else torch.zeros_like(lin.scales)
                                 for lin in linears])
        return Int8Linear(torch.cat([lin.weight for lin in linears]), torch.cat([lin.scales for lin in linears]),
                          offsets)
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [N1 + N2 (+ N3), K]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def is_fused(model: nn.Module) -> bool:
    """Whether every block of `model` has its q/k/v and gate/up projections fused."""
    return all(b.attention.wqkv is not None and b.feed_forward.w13 is not None for b in model.layers)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up in every block of `model` (in place, for inference); returns it.
    Each Attention gets `wqkv` and loses wq/wk/wv, each FeedForward gets `w13` and loses w1/w3:
    model.py's `project_qkv` and `FeedForward.forward` use the stacked matrix where it is set."""
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        if attn.wqkv is None:
            attn.wqkv = _stack(attn.wq, attn.wk, attn.wv)
            del attn.wq, attn.wk, attn.wv
        if ffn.w13 is None:
            ffn.w13 = _stack(ffn.w1, ffn.w3)
            del ffn.w1, ffn.w3
    return model
