"""Greedy decoding with a static KV cache, for CUDA graphs (`torch.compile(mode="reduce-overhead")`).

On a GPU a small model's decode step is launch-bound: ~30 blocks x ~25 small kernels,
each launched from Python, take longer than the arithmetic.  A CUDA graph records
the whole step once and replays it with one launch, but only if nothing about the
step changes between tokens: no tensor may change shape or address.  So here

    * the KV cache is preallocated for `max_len` positions and lives in buffers of this
      module (fixed addresses; the graph writes into them in place),
    * the position is a tensor, not a Python int: keys are written with `index_copy_`
      and attention always spans all `max_len` slots, the ones not yet written masked out,
    * RoPE's cos/sin tables are built for `max_len` up front and indexed by that tensor.

Attending over every slot costs a little extra arithmetic per token, which the GPU
hides; on a CPU the C++ kernels of the decoding plan are faster.  Every step, prefill and
decoding, is model.py's `Transformer.forward`; only the cache differs (`StaticCache`
stores and attends in place through the `attend` hook, at a tensor position).
Used by `benchmarks/cuda_speed.py --static`.  What `generate`, `chat` and `serve` run on CUDA is
`cuda_decode.py`: the engine's paged steps captured as CUDA graphs per batch bucket, with sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from llama3.model import KVCache, Transformer, fused_attention


class StaticCache(KVCache):
    """A KVCache at fixed addresses whose `attend` writes slot `pos` (a tensor) and attends over
    every slot, the ones not yet written masked out.  `pos` None: `attend` declines (prefill
    then goes through `update`, with a Python start position)."""

    def __init__(self, config, batch: int, max_len: int, dtype, device):
        super().__init__(config, batch, max_len, dtype=dtype, device=device)
        self.pos: torch.Tensor | None = None
        self.visible: torch.Tensor | None = None

    def attend(self, layer_id, start_pos, q, k, v, mask):
        """q [B, 1, H, Dh]; k, v [B, 1, Hkv, Dh] for slot `self.pos` -> [B, 1, H, Dh]."""
        if self.pos is None:
            return None
        self.k[layer_id].index_copy_(2, self.pos, k.transpose(1, 2))
        self.v[layer_id].index_copy_(2, self.pos, v.transpose(1, 2))
        return fused_attention(q.transpose(1, 2), self.k[layer_id], self.v[layer_id], self.visible).transpose(1, 2)


class StaticDecoder(nn.Module):
    """Greedy generation for one batch of equal-length prompts with a fixed-address cache."""

    def __init__(self, model: Transformer, batch: int, max_len: int, compile: bool = True):
        super().__init__()
        self.model, self.max_len = model, max_len
        self.cache = StaticCache(model.config, batch, max_len, model.dtype, model.device)
        model.rope(torch.tensor([max_len - 1], device=model.device))  # tables for every slot, built now
        self.step = torch.compile(self.decode, mode="reduce-overhead", fullgraph=True) if compile else self.decode

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] at position pos ([1] long tensor) -> next greedy ids [B, 1]."""
        self.cache.pos = pos
        self.cache.visible = (torch.arange(self.max_len, device=pos.device) <= pos)[None, None, None, :]  # [1,1,1,S]
        logits = Transformer.forward(self.model, tokens, 0, self.cache, positions=pos[None, :].expand(tokens.shape[0], 1))
        return logits.argmax(dim=-1)                                                       # [B, 1]

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """prompt [B, T] (equal lengths) -> the next new_tokens greedy ids [B, new_tokens]."""
        length = prompt.shape[1]
        if length + new_tokens > self.max_len:
            raise ValueError(f"{length} + {new_tokens} tokens do not fit max_len={self.max_len}")
        self.cache.pos = None                             # prefill: the readable cache writes
        token = Transformer.forward(self.model, prompt, 0, self.cache, last_only=True).argmax(dim=-1)  # [B, 1]
        out = [token]
        for step in range(new_tokens - 1):
            pos = torch.tensor([length + step], device=prompt.device)
            token = self.step(token, pos).clone()         # clone: a graph's output is overwritten on replay
            out.append(token)
        return torch.cat(out, dim=1)
