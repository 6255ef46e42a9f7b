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
hides; on a CPU use `DecodingTransformer` (`decode.py`) instead.  Prefill runs the
readable forward into the same buffers.  Used by `benchmarks/cuda_speed.py --static`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama3.fast.decode import decode_blocks
from llama3.model import KVCache, Transformer


class StaticDecoder(nn.Module):
    """Greedy generation for one batch of equal-length prompts with a fixed-address cache."""

    def __init__(self, model: Transformer, batch: int, max_len: int, compile: bool = True):
        super().__init__()
        config = model.config
        weight = model.norm.weight
        self.model, self.max_len = model, max_len
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        self.register_buffer("v", torch.zeros(shape, dtype=weight.dtype, device=weight.device))
        model.rope(torch.tensor([max_len - 1], device=weight.device))  # tables for every slot, built now
        self.step = torch.compile(self.decode, mode="reduce-overhead", fullgraph=True) if compile else self.decode

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] at position pos ([1] long tensor) -> next greedy ids [B, 1]."""
        model = self.model
        cos, sin = model.rope.cos[pos][:, None], model.rope.sin[pos][:, None]  # [1, 1, Dh/2]
        visible = (torch.arange(self.max_len, device=pos.device) <= pos)[None, :]  # [1, S]: slots written so far

        def attend(layer_id, q, k, v):  # write slot pos of k, v [B, Hkv, Dh]; attend over every slot
            self.k[layer_id].index_copy_(2, pos, k[:, :, None])
            self.v[layer_id].index_copy_(2, pos, v[:, :, None])
            return F.scaled_dot_product_attention(q, self.k[layer_id], self.v[layer_id], attn_mask=visible)

        return decode_blocks(model, model.tok_embeddings(tokens), cos, sin, attend).argmax(dim=-1)  # [B, 1]

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """prompt [B, T] (equal lengths) -> the next new_tokens greedy ids [B, new_tokens]."""
        cache = KVCache.__new__(KVCache)                  # the readable forward fills our buffers
        cache.k, cache.v, cache.max_len = self.k, self.v, self.max_len
        length = prompt.shape[1]
        if length + new_tokens > self.max_len:
            raise ValueError(f"{length} + {new_tokens} tokens do not fit max_len={self.max_len}")
        token = self.model(prompt, 0, cache, last_only=True).argmax(dim=-1)  # [B, 1]
        out = [token]
        for step in range(new_tokens - 1):
            pos = torch.tensor([length + step], device=prompt.device)
            token = self.step(token, pos).clone()         # clone: a graph's output is overwritten on replay
            out.append(token)
        return torch.cat(out, dim=1)
