"""A lean one-token decoding step, beside the readable forward.

Decoding reads every weight once per token, so its floor is the time the matrix
products take (~20 ms for SmolLM2-135M in float32 on 2 CPU cores).  The readable
forward adds ~80 small tensor operations per block around them (RoPE written out
pair by pair, `repeat_kv` copying keys for every query head, a mask, views), a
few microseconds each: ~10 ms a token, a third of the step.  This step computes
the same thing for the common case, one new token per row with a KV cache, with
about a quarter of the operations:

    RoPE       q and k rotated together, in one call.
    GQA        no copying of keys: the H query heads are viewed as [Hkv, H/Hkv]
               and the n_rep queries of one group attend to their shared key head
               as if they were n_rep query positions.  With one new token nothing
               is in its future, so no causal mask is needed either.
    cache      written in place for the one position, read as a view.

Everything else (norms, projections, SwiGLU, the head) is the model's own
modules, so fused, packed and int8 linears work unchanged.  Prefill (T > 1),
custom positions/masks of other shapes, and models without fused projections go
through the readable `Transformer.forward`: this is a fast path beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama3.model import KVCache, Transformer, apply_rope


def decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int, cache: KVCache,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row: tokens [B, 1] at cache slot start_pos -> logits [B, 1, V] (float32).

    The same numbers as `Transformer.forward(tokens, start_pos, cache, positions, mask)`
    up to float rounding.  positions: None or [B, 1]; mask: None or bool [B, 1, 1, S].
    Needs fused projections (`llama3.fast.fuse.fuse_projections`).
    """
    if positions is None:
        positions = torch.tensor([start_pos], device=tokens.device)      # [1]
    cos, sin = model.rope(positions.reshape(-1, 1))                       # [B or 1, 1, Dh/2]

    def attend(layer_id, q, k, v):  # store this position's k, v [B, Hkv, Dh]; attend over all so far
        keys, values = cache.update(layer_id, start_pos, k.unsqueeze(2), v.unsqueeze(2))  # [B, Hkv, S, Dh]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    return decode_blocks(model, model.tok_embeddings(tokens), cos, sin, attend).float()


def decode_blocks(model: Transformer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
    """The blocks and head for one new token per row: h [B, 1, D] -> logits [B, 1, V].

    cos, sin: [B or 1, 1, Dh/2] for the new position.  attend(layer_id, q, k, v) stores the
    new k, v [B, Hkv, Dh] in the cache and returns the attention output [B, Hkv, n_rep, Dh]
    for q [B, Hkv, n_rep, Dh] (the H query heads grouped by the key/value head they share).
    """
    batch = h.shape[0]
    first = model.layers[0].attention
    n_heads, n_kv, head_dim = first.n_heads, first.n_kv_heads, first.head_dim
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        # ---- attention: h = h + wo(attend(q, cached k, cached v))
        qkv = attn.wqkv(layer.attention_norm(h)).view(batch, n_heads + 2 * n_kv, head_dim)  # [B, H+2Hkv, Dh]
        qk = apply_rope(qkv[:, None, :n_heads + n_kv], cos, sin)[:, 0]   # [B, H+Hkv, Dh]: q and k rotated at once
        q = qk[:, :n_heads].reshape(batch, n_kv, n_heads // n_kv, head_dim)  # [B, Hkv, n_rep, Dh]: heads by group
        out = attend(attn.layer_id, q, qk[:, n_heads:], qkv[:, n_heads + n_kv:])  # [B, Hkv, n_rep, Dh]
        h = h + attn.wo(out.reshape(batch, 1, n_heads * head_dim))       # [B, 1, D]
        # ---- feed-forward: h = h + w2(silu(gate) * up)
        gate, up = ffn.w13(layer.ffn_norm(h)).chunk(2, dim=-1)            # [B, 1, F] each
        h = h + ffn.w2(F.silu(gate) * up)                                 # [B, 1, D]
    return model.output(model.norm(h))                                   # [B, 1, V]


class DecodingTransformer(Transformer):
    """A Transformer whose forward takes `decode_step` for one new token per row with a cache,
    and the readable forward for everything else (prefill, training, no cache).  Where
    `speed_up` attached a `native_step` (the same step in C, `native.py`), CPU decoding
    goes through it instead.

    `use_decoding_step(model)` switches a loaded model to it in place (after fusing)."""

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        lean = (cache is not None and tokens.shape[1] == 1 and not torch.is_grad_enabled()
                and (mask is None or mask.shape[-2] == 1))
        if lean:  # one position: its logits are the last position's
            native = getattr(self, "native_step", None)  # the same step in C (native.py), on the CPU
            if native is not None and native.supports(tokens, start_pos, cache, mask):
                return native(tokens, start_pos, cache, positions, mask)
            return decode_step(self, tokens, start_pos, cache, positions, mask)
        return super().forward(tokens, start_pos, cache, positions, mask, last_only)


def use_decoding_step(model: Transformer) -> Transformer:
    """Switch `model` (fused projections required) to `DecodingTransformer` in place; returns it."""
    from llama3.fast.fuse import is_fused

    if not is_fused(model):
        raise ValueError("the lean decoding step needs fused projections: call fuse_projections(model) first")
    if type(model) is Transformer:
        model.__class__ = DecodingTransformer
    return model
