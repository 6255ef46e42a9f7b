"""The live computations behind four walkthrough sections: encoder/decoder, LayerNorm vs RMSNorm,
multi-head attention head by head, and the KV cache.

Each function works on the real model through its public parts only: its modules and
their weights, `Transformer.forward` (with and without a `KVCache`), forward hooks
(`llama3.inspect.capture`), `apply_rope` and `causal_mask`.  Nothing here is run by the
model: each function computes a concept the way a textbook or study note writes it (LayerNorm,
one head at a time, decoding without a cache) so the walkthrough can print it next to what
`llama3/model.py` computed, and the difference.
Shapes use the legend of llama3/model.py (B, T, S, D, H, Hkv, Dh, F, V).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama3.config import ModelConfig
from llama3.inspect.capture import explicit_attention
from llama3.model import Attention, KVCache, Transformer, apply_rope, causal_mask
from llama3.params import count_params, human_bytes, kv_cache_bytes_per_token


# ------------------------------------------------------------- encoder and decoder
@torch.no_grad()
def causal_check(model: Transformer, tokens: torch.Tensor, other_token: int) -> tuple[float, float]:
    """What a decoder's masked self-attention means, measured: replace the last token of tokens [1, T].

    Returns (max |Δ logits| at the earlier positions, max |Δ logits| at the last position).
    The first is 0 when no position can see the future; an encoder would change them all."""
    changed = tokens.clone()
    changed[0, -1] = other_token
    a, b = model(tokens), model(changed)                                  # [1, T, V] each
    return (a[0, :-1] - b[0, :-1]).abs().max().item(), (a[0, -1] - b[0, -1]).abs().max().item()


def block_inventory(model: Transformer) -> list[tuple[str, str, int]]:
    """What one block holds, read from the live model: (module name, weight shape, parameters)."""
    rows = []
    for name, param in model.layers[0].named_parameters():
        rows.append((name.removesuffix(".weight"), " × ".join(map(str, param.shape)), param.numel()))
    return rows


def attention_inputs(model: Transformer) -> list[str]:
    """The inputs of a block's attention, from the signature of Attention.forward: one stream x
    (plus positions, cache and mask), so q, k and v all come from it.  A cross-attention would
    need a second stream, an encoder's output, to take k and v from."""
    import inspect

    return [p for p in inspect.signature(type(model.layers[0].attention).forward).parameters if p != "self"]


# ------------------------------------------------------------- LayerNorm vs RMSNorm
@dataclass
class NormComparison:
    h: torch.Tensor          # [D] the live hidden vector
    layer_norm: torch.Tensor  # [D] (h - mean) / sqrt(var + eps) * g + b, b = 0
    rms_norm: torch.Tensor   # [D] h / sqrt(mean(h²) + eps) * g
    mean: float
    var: float
    rms: float
    max_delta: float         # max |layer_norm - rms_norm|
    cosine: float


def layer_norm_by_formula(h: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm written out: subtract the mean, divide by the standard deviation, scale, shift."""
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)                        # biased, as LayerNorm uses
    return (h - mean) / torch.sqrt(var + eps) * gain + bias


def rms_norm_by_formula(h: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm written out: divide by the root mean square, scale.  No mean, no bias."""
    return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * gain


@torch.no_grad()
def compare_norms(h: torch.Tensor, norm) -> NormComparison:
    """Both normalisations of one vector h [D], with the model's RMSNorm gain g (and a zero bias:
    Llama has none to offer).  mean(h²) = var + mean², so the two differ only by the mean."""
    h = h.float()
    gain, eps = norm.weight.detach().float(), norm.eps
    ln = layer_norm_by_formula(h, gain, torch.zeros_like(gain), eps)
    rms = rms_norm_by_formula(h, gain, eps)
    return NormComparison(h, ln, rms, h.mean().item(), h.var(unbiased=False).item(), h.pow(2).mean().sqrt().item(),
                          (ln - rms).abs().max().item(), F.cosine_similarity(ln, rms, dim=0).item())


# ---------------------------------------------------- multi-head attention, head by head
def split_heads(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A projection's weight [n_heads*Dh, D] as n_heads matrices [n_heads, Dh, D]: head h owns rows
    h*Dh .. (h+1)*Dh - 1.  This is what `.view(B, T, n_heads, Dh)` of the big product means."""
    return weight.view(n_heads, weight.shape[0] // n_heads, weight.shape[1])


def interleaved_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A WRONG reading of the same weight: head h owns rows h, h + n_heads, h + 2*n_heads, ...
    (what `.view(B, T, Dh, n_heads)` would mean).  Shown so the check has something to catch."""
    return weight.view(weight.shape[0] // n_heads, n_heads, weight.shape[1]).transpose(0, 1)


@torch.no_grad()
def attention_head_by_head(att: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           split=split_heads) -> torch.Tensor:
    """Multi-head attention as the study note writes it, from x̂ [T, D] (one sequence, no cache):

        for each head h:  q_h = x̂ W_q^hᵀ,  k_h = x̂ W_k^gᵀ,  v_h = x̂ W_v^gᵀ   (g = h // n_rep: GQA)
                          head_h = softmax(rope(q_h) rope(k_h)ᵀ / √Dh + mask) v_h      [T, Dh]
        out = concat(head_0, ..., head_{H-1}) W_oᵀ                                      [T, D]

    Returns out [T, D]; `split` says which rows of wq/wk/wv belong to which head."""
    w_q, w_k, w_v = (split(lin.weight.float(), n) for lin, n in
                     ((att.wq, att.n_heads), (att.wk, att.n_kv_heads), (att.wv, att.n_kv_heads)))  # [H|Hkv, Dh, D]
    x = x.float()
    seqlen = x.shape[0]
    mask = causal_mask(seqlen, seqlen, 0, device=x.device)                 # [T, S]
    heads = []
    for h in range(att.n_heads):
        g = h // att.n_rep                                                 # the key/value head this query head reads
        q = apply_rope((x @ w_q[h].T)[None, :, None], cos, sin)[0, :, 0]   # [T, Dh]
        k = apply_rope((x @ w_k[g].T)[None, :, None], cos, sin)[0, :, 0]   # [S, Dh]
        v = x @ w_v[g].T                                                   # [S, Dh]
        scores = (q @ k.T / math.sqrt(att.head_dim)).masked_fill(~mask, float("-inf"))  # [T, S]
        heads.append(scores.softmax(-1) @ v)                               # [T, Dh]
    return torch.cat(heads, dim=-1) @ att.wo.weight.float().T             # [T, H*Dh] -> [T, D]


# ------------------------------------------------------------------- the KV cache
@dataclass
class Decoding:
    tokens: list[int]        # the N new tokens, greedy
    positions: int           # token positions pushed through the blocks, all steps together
    flops: int               # matrix-multiply FLOPs, counted by torch.utils.flop_counter (0: not counted)
    last_logits: torch.Tensor  # [V] the logits that chose the last token


@torch.no_grad()
def _greedy(model: Transformer, ids: list[int], n_new: int, use_cache: bool) -> tuple[list[int], int, torch.Tensor]:
    device = model.device
    seq = list(ids)
    if use_cache:
        cache = KVCache(model.config, 1, len(ids) + n_new, dtype=model.dtype, device=device)
        todo, start, positions = seq, 0, 0
        for _ in range(n_new):
            logits = model(torch.tensor([todo], device=device), start_pos=start, cache=cache, last_only=True)
            positions += len(todo)
            start += len(todo)
            seq.append(int(logits[0, -1].argmax()))
            todo = seq[-1:]                                                # only the newest token goes in
    else:
        positions = 0
        for _ in range(n_new):
            logits = model(torch.tensor([seq], device=device), last_only=True)  # the whole text, every step
            positions += len(seq)
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):], positions, logits[0, -1]


def decode(model: Transformer, ids: list[int], n_new: int, use_cache: bool, count_flops: bool = True) -> Decoding:
    """Greedy-decode n_new tokens after ids with or without a KVCache, then (count_flops) again under
    FlopCounterMode on the explicit attention path, whose matmuls it sees (it does not see inside the
    CPU's fused attention kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens, positions, last = _greedy(model, ids, n_new, use_cache)
    if not count_flops:
        return Decoding(tokens, positions, 0, last)
    with explicit_attention(model, range(len(model.layers))), FlopCounterMode(display=False) as counter:
        _greedy(model, ids, n_new, use_cache)
    return Decoding(tokens, positions, counter.get_total_flops(), last)


@torch.no_grad()
def time_decoding(model: Transformer, ids: list[int], new_tokens: list[int], repeats: int = 3) -> tuple[float, float]:
    """Seconds to decode new_tokens after ids (greedy) with and without the cache, timed step by step in
    lockstep: each step's cached forward and its full-text forward run back to back, `repeats` times, and
    the fastest of each counts.  On a shared machine whose load comes and goes, one run of each after
    the other measures the load more than the cache."""
    device = model.device
    seq = list(ids) + list(new_tokens)
    cache = KVCache(model.config, 1, len(seq), dtype=model.dtype, device=device)
    with_cache = without = 0.0
    for n in range(len(new_tokens)):
        end = len(ids) + n                                                 # this step predicts token `end`
        start = 0 if n == 0 else end - 1
        cached_in = torch.tensor([seq[start:end]], device=device)         # the prompt, then one token a step
        full_in = torch.tensor([seq[:end]], device=device)
        best = [math.inf, math.inf]
        for _ in range(repeats):
            for k, run in enumerate((lambda: model(cached_in, start_pos=start, cache=cache, last_only=True),
                                     lambda: model(full_in, last_only=True))):
                begin = time.perf_counter()
                run()                                                      # the cached step rewrites the same slots
                best[k] = min(best[k], time.perf_counter() - begin)
        with_cache, without = with_cache + best[0], without + best[1]
    return with_cache, without


def kv_cache_bytes(config: ModelConfig, tokens: int, bytes_per_element: int, batch: int = 1) -> int:
    """2 (k and v) × n_layers × Hkv × Dh × bytes per element × tokens × batch (llama3.params)."""
    return kv_cache_bytes_per_token(config, bytes_per_element) * tokens * batch


def allocated_kv_bytes(config: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
    """What a real KVCache for `tokens` positions allocates (built on the meta device: no memory)."""
    cache = KVCache(config, 1, tokens, dtype=dtype, device="meta")
    return cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()


# ------------------------------------------------------------ the walkthrough's fields
def md_code(text: str) -> str:
    """text as inline markdown code, also when it holds a backtick."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _n(x: float) -> str:
    return f"{x:.3g}"


@torch.no_grad()
def concept_fields(llm, ids: list[int], cap, normed: dict, img, decode_tokens: int = 16,
                   timing_repeats: int = 3) -> dict:
    """The numbers of the four concept sections, from one captured forward pass `cap` (whose hooks also
    recorded normed[i], the x̂ [1, T, D] entering attention i) plus the decoding runs; draws the diagram."""
    from llama3.config import get_preset
    from llama3.inspect.tokens import as_batch, token_labels
    from llama3.inspect.walkthrough_diagram import plot_encoder_decoder

    model, c, tok = llm.model, llm.config, llm.tokenizer
    n_layers, seqlen, mid = c.n_layers, len(ids), c.n_layers // 2
    fields = {}

    # encoder and decoder
    plot_encoder_decoder(c, img / "walkthrough-encoder-decoder.png", llm.source or "this model")
    inventory = block_inventory(model)
    other = (ids[-1] + 1) % c.vocab_size
    earlier, last = causal_check(model, as_batch(llm, ids), other)
    attention_params = sum(n for name, _, n in inventory if name.startswith("attention."))
    fields.update(
        block_table="\n".join(f"| `{name}` | {shape} | {n:,} |" for name, shape, n in inventory),
        block_params=f"{sum(n for *_, n in inventory):,}", attention_params=f"{attention_params:,}",
        n_attention=sum(isinstance(m, Attention) for m in model.modules()),
        attention_inputs=", ".join(attention_inputs(model)),
        cross_params_m=_n(attention_params * n_layers / 1e6),
        causal_other=md_code(token_labels(tok, [other])[0]), causal_earlier=_n(earlier), causal_last=_n(last))

    # LayerNorm vs RMSNorm, on the stream entering block `mid` at the last token
    norm = model.layers[mid].attention_norm
    h = cap.block_inputs[mid][0, -1]
    cmp = compare_norms(h, norm)
    torch_ln = F.layer_norm(h.float(), (c.dim,), norm.weight.float(), torch.zeros_like(norm.weight.float()), norm.eps)
    top = cmp.h.abs().topk(3).indices.tolist()
    shown = sorted(set(range(4)) | set(top))
    every = torch.stack([x[0].float() for x in cap.block_inputs])        # [L, T, D]
    ratio = (every.mean(-1).abs() / every.pow(2).mean(-1).sqrt()).max().item()
    cosines = [compare_norms(every[i, j], model.layers[i].attention_norm).cosine
               for i in range(n_layers) for j in range(seqlen)]
    fields.update(
        ln_block=mid, ln_token=md_code(token_labels(tok, [ids[-1]])[0]), ln_mean=_n(cmp.mean), ln_var=_n(cmp.var),
        ln_std=_n(math.sqrt(cmp.var)), ln_rms=_n(cmp.rms), ln_delta=_n(cmp.max_delta), ln_cos=f"{cmp.cosine:.6f}",
        ln_torch_delta=_n((torch_ln - cmp.layer_norm).abs().max().item()),
        rms_model_delta=_n((norm(h).float() - cmp.rms_norm).abs().max().item()),
        rms_hook_delta=_n((normed[mid][0, -1].float() - cmp.rms_norm).abs().max().item()),
        ln_table="\n".join(f"| {i} | {cmp.h[i].item():+.4f} | {cmp.layer_norm[i].item():+.4f} | "
                           f"{cmp.rms_norm[i].item():+.4f} |" for i in shown),
        ln_worst_ratio=f"{100 * ratio:.2g}", ln_min_cos=f"{min(cosines):.5f}", ln_checked=len(cosines),
        n_norms=2 * n_layers + 1, ln_bias_params=f"{(2 * n_layers + 1) * c.dim:,}")

    # multi-head attention, head by head, in every block
    cos, sin = model.rope(torch.arange(seqlen, device=llm.device))
    right, wrong, scale = [], [], []
    for i, block in enumerate(model.layers):
        own = cap.attention_out[i][0].float()                              # [T, D] what the model added
        right.append((attention_head_by_head(block.attention, normed[i][0], cos, sin) - own).abs().max().item())
        wrong.append((attention_head_by_head(block.attention, normed[i][0], cos, sin, interleaved_split)
                      - own).abs().max().item())
        scale.append(own.abs().max().item())
    fields.update(
        mh_delta=_n(max(right)), mh_scale=_n(max(scale)), mh_wrong_min=_n(min(wrong)), mh_wrong_max=_n(max(wrong)),
        mh_wq=f"{c.n_heads * c.head_dim} × {c.dim}", mh_wk=f"{c.n_kv_heads * c.head_dim} × {c.dim}",
        mh_wo=f"{c.dim} × {c.n_heads * c.head_dim}", mh_head=f"{c.head_dim} × {c.dim}",
        mh_kv_params=_n(2 * (c.n_heads - c.n_kv_heads) * c.head_dim * c.dim * n_layers / 1e6))

    # the KV cache, demonstrated
    with_cache = decode(model, ids, decode_tokens, use_cache=True)
    without = decode(model, ids, decode_tokens, use_cache=False)
    seconds_with, seconds_without = time_decoding(model, ids, with_cache.tokens, timing_repeats)
    dtype = model.dtype
    elem = torch.tensor([], dtype=dtype).element_size()
    big = get_preset("llama-3.1-8b")
    per_token = kv_cache_bytes(c, 1, elem)
    fields.update(
        kv_n=decode_tokens, kv_same="the same" if with_cache.tokens == without.tokens else "NOT the same",
        kv_same_zh="完全相同" if with_cache.tokens == without.tokens else "并不相同",
        kv_text=tok.decode(with_cache.tokens).replace("\n", "↵").replace("`", "'") if tok else str(with_cache.tokens),
        kv_logit_delta=_n((with_cache.last_logits - without.last_logits).abs().max().item()),
        kv_s_with=f"{seconds_with:.2f}", kv_s_without=f"{seconds_without:.2f}", kv_repeats=timing_repeats,
        kv_speedup=f"{seconds_without / seconds_with:.1f}",
        kv_pos_with=with_cache.positions, kv_pos_without=without.positions,
        kv_pos_ratio=f"{without.positions / with_cache.positions:.1f}",
        kv_gflop_with=f"{with_cache.flops / 1e9:.2f}", kv_gflop_without=f"{without.flops / 1e9:.2f}",
        kv_flop_ratio=f"{without.flops / with_cache.flops:.1f}",
        kv_threads=torch.get_num_threads(), kv_device=str(llm.device),
        kv_load=f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown",
        kv_dtype=str(dtype).removeprefix("torch."), kv_elem=elem, kv_token=human_bytes(per_token),
        kv_token_bf16=human_bytes(kv_cache_bytes(c, 1, 2)), kv_token_mha=human_bytes(per_token * c.n_rep),
        kv_ctx=c.max_seq_len, kv_ctx_size=human_bytes(kv_cache_bytes(c, c.max_seq_len, elem)),
        kv_alloc=f"{allocated_kv_bytes(c, c.max_seq_len, dtype):,}", kv_formula=f"{kv_cache_bytes(c, c.max_seq_len, elem):,}",
        kv_demo_len=seqlen + decode_tokens, kv_demo_size=human_bytes(kv_cache_bytes(c, seqlen + decode_tokens, elem)),
        l8b_L=big.n_layers, l8b_Hkv=big.n_kv_heads, l8b_Dh=big.head_dim, l8b_H=big.n_heads, l8b_ctx=big.max_seq_len,
        l8b_token=human_bytes(kv_cache_bytes(big, 1, 2)), l8b_ctx_size=human_bytes(kv_cache_bytes(big, big.max_seq_len, 2)),
        l8b_ctx_fp32=human_bytes(kv_cache_bytes(big, big.max_seq_len, 4)),
        l8b_mha_size=human_bytes(kv_cache_bytes(big, big.max_seq_len, 2) * big.n_rep),
        l8b_8k=human_bytes(kv_cache_bytes(big, 8192, 2)), l8b_weights=human_bytes(count_params(big).total * 2))
    return fields
