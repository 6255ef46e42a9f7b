"""The Llama 3 model, written out: embedding -> N x (attention + feed-forward) -> norm -> logits.

Read top to bottom, this file is the architecture:

    tokens [B, T]
      -> tok_embeddings                      h [B, T, D]
      -> for each of n_layers blocks:        (pre-norm residual block)
           h = h + Attention(RMSNorm(h))      grouped-query self-attention with RoPE
           h = h + FeedForward(RMSNorm(h))    SwiGLU
      -> RMSNorm -> output                   logits [B, T, V]

Dimension legend used in every shape comment:
    B  batch              T  new tokens in this call     S  keys visible (cache + new)
    D  model width (dim)  H  query heads   Hkv  key/value heads   Dh  head width (D / H)
    F  feed-forward hidden size           V  vocabulary size

Parameter names equal the keys of Meta's `consolidated.*.pth` checkpoints
(`tok_embeddings`, `layers.0.attention.wq`, `layers.0.feed_forward.w1`, `norm`,
`output`), so a Meta state dict loads with `strict=True`; the Hugging Face
renaming lives in `llama3.checkpoint.hf`.

The model is pure: no file I/O, tokenizing or sampling here. The KV cache is
its own object, created by whoever generates (see `KVCache`). The same
`forward` serves training (no cache) and inference (with a cache).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from llama3.config import ModelConfig, RopeScaling


# ------------------------------------------------------- modules, taps, RMSNorm
class Lean(nn.Module):
    """nn.Module whose call goes straight to `forward` while nothing hooks it.

    nn.Module's own call machinery checks for hooks of six kinds on every call, ~2 us each on
    a small CPU: for a 30-block model decoding one token that is ~1 ms of a ~8 ms step.  With a
    hook registered (inspection, training wrappers) the full machinery runs.
    """

    def __call__(self, *args, **kwargs):
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                or _global_hooks()):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)


def _global_hooks() -> bool:  # torch.nn.modules.module.register_module_forward_hook and the like
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


class Tap(Lean):
    """An identity step with a name: a forward hook on it reads (or replaces) the tensor flowing
    past, e.g. `block.attention.q_rotated` for the queries after RoPE."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class RMSNorm(Lean):
    """Root-mean-square normalisation: x / sqrt(mean(x^2) + eps) * weight.

    Unlike LayerNorm it neither subtracts the mean nor adds a bias. Computed in
    float32 and cast back, as Meta and transformers both do, so bf16 models
    normalise accurately.  `kernel` is the function that computes it: `rms_norm`
    below, or one kernel call with the same numbers (`llama3.fast.plan`).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return self.kernel(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last axis, in float32, rounded back to x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.type_as(x)


# ------------------------------------------------------------------------ RoPE
def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """The rotation speed of each pair of channels: [Dh/2] angular frequencies.

    Pair i turns by angle  pos * theta^(-2i/Dh).  With theta = 500000 and Dh = 128
    the first pair turns 1 radian per position, the last about 1.1e-5.

    Llama 3.1 scaling (Meta's `apply_scaling`) stretches the slow pairs so the
    model reaches 128K tokens: a pair whose wavelength 2*pi/f exceeds
    original/low_freq_factor (8192 positions) is slowed down by `factor`; one
    shorter than original/high_freq_factor (2048) is kept; in between the two
    are blended linearly in original/wavelength.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # [Dh/2]
    if scaling is None:
        return freqs.float()
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, blended)
    scaled = torch.where(wavelen < high_freq_wavelen, freqs, scaled)
    return scaled.float()


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, indexed by position.

    The tables are float32 whatever the model's dtype (they are plain attributes,
    not buffers, so `model.to(torch.bfloat16)` does not round the angles), and they
    live on the device of the positions asked for.  They cover `max_seq_len`
    positions lazily: built for the first `initial` positions and grown (doubling)
    when a later position is asked for, so a 128K-context config does not allocate
    128K rows up front.
    """

    def __init__(self, config: ModelConfig, initial: int = 4096):
        super().__init__()
        self.max_seq_len = config.max_seq_len
        with torch.device("cpu"):  # real numbers even when the model is built on the "meta" device
            self.freqs = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)  # [Dh/2]
            self._build(min(initial, config.max_seq_len), torch.device("cpu"))

    def _build(self, length: int, device: torch.device) -> None:
        positions = torch.arange(length, dtype=torch.float32)
        angles = torch.outer(positions, self.freqs)  # [L, Dh/2]: angle of pair i at position p
        self.cos, self.sin = angles.cos().to(device), angles.sin().to(device)

    def forward(self, positions: torch.Tensor, needed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [B, T] (long) -> cos, sin each [T, Dh/2] or [B, T, Dh/2].
        needed: 1 + the largest position, when the caller knows it (saves reading it from the
        tensor: a device sync, and a graph break under torch.compile)."""
        if needed is None:
            if torch.compiler.is_compiling() or (positions.is_cuda and torch.cuda.is_current_stream_capturing()):
                # no host sync inside a graph (compiled, or a CUDA graph being captured): the caller built the tables
                return self.cos[positions], self.sin[positions]
            needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0] or self.cos.device != positions.device:
            if needed > self.max_seq_len:
                raise ValueError(f"position {needed - 1} is beyond max_seq_len={self.max_seq_len}")
            self._build(min(self.max_seq_len, max(needed, 2 * self.cos.shape[0])), positions.device)
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive channel pair (x[2i], x[2i+1]) by its angle.

    x [B, T, H, Dh]; cos/sin [T, Dh/2] or [B, T, Dh/2].  This is Meta's layout:
    pairs are interleaved (channel 0 with 1, 2 with 3, ...), the same as
    multiplying the complex number x[2i] + j*x[2i+1] by e^(j*angle).
    (Hugging Face checkpoints pair channel i with i + Dh/2 instead; their wq/wk
    rows are permuted on load so this one layout serves both.)
    """
    if torch.compiler.is_compiling():  # inductor generates no code for complex numbers
        return apply_rope_real(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, H, Dh/2] complex: x[2i] + j*x[2i+1]
    rotation = torch.complex(cos, sin).unsqueeze(-2)                  # e^(j*angle), over heads: [.., T, 1, Dh/2]
    rotated = torch.view_as_real(pairs * rotation)                    # [B, T, H, Dh/2, 2]
    return rotated.flatten(-2).type_as(x)                             # [B, T, H, Dh]


def apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation in real numbers: (a, b) -> (a cos - b sin, a sin + b cos) for each pair.
    More operations in eager mode, but torch.compile fuses them into one kernel."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)                # [B, T, H, Dh/2] each
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)                       # [.., T, 1, Dh/2]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).type_as(x)  # [B, T, H, Dh]


# -------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of every layer for positions already seen, preallocated once.

    k, v: [n_layers, B, Hkv, max_len, Dh].  A forward call with `start_pos=p`
    and T new tokens writes positions p..p+T-1 and attends over 0..p+T-1.
    Created by the generator, not by the model, so the model stays trainable.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.layers = [(self.k[i], self.v[i]) for i in range(config.n_layers)]  # views [B, Hkv, max_len, Dh]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, Hkv, T, Dh] at positions start_pos.., return all keys/values so far
        as [B, Hkv, S, Dh] with S = start_pos + T (views into the cache: nothing is copied)."""
        batch, _, new, _ = k.shape
        end = start_pos + new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        keys, values = self.layers[layer]
        if batch < keys.shape[0]:
            keys, values = keys[:batch], values[:batch]
        keys.narrow(2, start_pos, new).copy_(k)
        values.narrow(2, start_pos, new).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


# ------------------------------------------------------------------- attention
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: let each key/value head serve n_rep query heads.

    [B, Hkv, S, Dh] -> [B, Hkv * n_rep, S, Dh]; head h of the output is kv head h // n_rep.
    """
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def sdpa_shares_kv_heads(q: torch.Tensor) -> bool:
    """Whether `F.scaled_dot_product_attention(..., enable_gqa=True)` runs a fused kernel for q's
    device and dtype: always on CPU; on CUDA only FlashAttention's (16-bit, Ampere or newer).
    Elsewhere it falls back to the slow math kernel, so copying with repeat_kv is cheaper."""
    if q.device.type == "cpu":
        return True
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def causal_mask(t: int, s: int, start_pos: int, device=None) -> torch.Tensor:
    """[T, S] bool, True where query i (at position start_pos + i) may see key j: j <= start_pos + i."""
    query_pos = torch.arange(start_pos, start_pos + t, device=device).unsqueeze(1)  # [T, 1]
    key_pos = torch.arange(s, device=device).unsqueeze(0)                           # [1, S]
    return key_pos <= query_pos


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(Dh) + mask) V through `F.scaled_dot_product_attention`.

    q [B, H, T, Dh]; k, v [B, Hkv, S, Dh], the T queries being the last T of the S positions;
    mask: None (causal) or bool [B or 1, 1, T, S], True = may attend.  -> [B, H, T, Dh].
    """
    seqlen, keys, n_rep = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    if mask is None and keys == seqlen:  # plain causal, no cached prefix (training, a first prompt)
        # SDPA draws the causal triangle itself (no mask tensor) and, where its kernel can, lets each
        # key/value head serve its n_rep query heads without repeat_kv's copies: the same numbers
        share_kv = n_rep > 1 and sdpa_shares_kv_heads(q)
        if not share_kv:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                 # [B, H, S, Dh]
        return F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=share_kv)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)                         # [B, H, S, Dh]
    if mask is None and seqlen > 1:
        mask = causal_mask(seqlen, keys, keys - seqlen, device=q.device)    # [T, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)          # [B, H, T, Dh]


class Attention(Lean):
    """Multi-head self-attention with grouped-query heads, RoPE and a KV cache.

    Two equivalent ways to attend sit side by side:
      * the explicit path that learners read (`explicit_attention`): softmax(Q Kᵀ / sqrt(Dh) + mask) V,
        with the attention weights passing through `self.softmax`, an nn.Module, so a forward
        hook can capture them ([B, H, T, S], rows sum to 1);
      * the fused path, `attention_kernel` (`fused_attention`: SDPA), for speed.
    `self.fused` picks one (True by default); both give the same result.

    What it calls, and what `llama3.fast.plan` may swap in (same numbers, fewer calls):
      wq, wk, wv, wo   linears (or int8/int4/kernel linears); `wqkv`, when set, is the three
                       stacked into one matmul and wq/wk/wv are gone
      rope_kernel      `apply_rope`
      attention_kernel `fused_attention`
    A cache with an `attend(layer_id, start_pos, q, k, v, mask)` method stores the new keys and
    values and attends in place (a paged cache, a recorded step's), taking q, k, v tokens first as
    projected, [B, T, H|Hkv, Dh]; it returns [B, T, H, Dh], or None to let `cache.update` and the attention here do it.
    Taps (identity modules to hook): q, k, v [B, T, H|Hkv, Dh] after projection, q_rotated,
    k_rotated after RoPE, keys, values [B, H, S, Dh] and scores, masked_scores [B, H, T, S]
    (explicit path), heads [B, T, H, Dh] each head's output.
    """

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.n_rep = config.n_rep
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)     # D -> H*Dh
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)  # D -> Hkv*Dh
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)  # D -> Hkv*Dh
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)     # H*Dh -> D
        self.wqkv = None
        self.softmax = nn.Softmax(dim=-1)
        self.fused = True
        self.rope_kernel, self.attention_kernel = apply_rope, fused_attention
        for name in ("q", "k", "v", "q_rotated", "k_rotated", "keys", "values", "scores", "masked_scores", "heads"):
            setattr(self, name, Tap())

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, T, H, Dh], k [B, T, Hkv, Dh], v [B, T, Hkv, Dh]: three matmuls, each
        output cut into heads of Dh channels; or one matmul against the three matrices stacked where
        `wqkv` is set (llama3.fast.fuse), its output cut into H + 2*Hkv heads and split once."""
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)                     # [B, T, H*Dh | Hkv*Dh]
            return tuple(t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
        heads = self.wqkv(x).unflatten(-1, (-1, self.head_dim))              # [B, T, H + 2*Hkv, Dh]
        return heads.split((self.n_heads, self.n_kv_heads, self.n_kv_heads), dim=2)

    def forward(self, x, cos, sin, start_pos=0, cache: KVCache | None = None, mask=None):
        """x [B, T, D] -> [B, T, D].  mask: None (causal) or bool [B or 1, 1, T, S], True = may attend."""
        q, k, v = self.project_qkv(x)
        q, k, v = self.q(q), self.k(k), self.v(v)                           # [B, T, H|Hkv, Dh]
        q = self.q_rotated(self.rope_kernel(q, cos, sin))                  # position enters here only
        k = self.k_rotated(self.rope_kernel(k, cos, sin))
        out = None
        if cache is not None and self.fused and hasattr(cache, "attend"):
            out = cache.attend(self.layer_id, start_pos, q, k, v, mask)     # stored and attended in place
        if out is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first: [B, H|Hkv, T, Dh]
            if cache is not None:
                k, v = cache.update(self.layer_id, start_pos, k, v)         # [B, Hkv, S, Dh]
            out = self.attention_kernel(q, k, v, mask) if self.fused else self.explicit_attention(q, k, v, mask)
            out = out.transpose(1, 2)                                       # tokens first again: [B, T, H, Dh]
        return self.wo(self.heads(out).flatten(2))                          # heads joined [B, T, H*Dh] -> [B, T, D]

    def explicit_attention(self, q, k, v, mask=None):
        """What `fused_attention` computes, written out: q [B, H, T, Dh]; k, v [B, Hkv, S, Dh]."""
        k, v = self.keys(repeat_kv(k, self.n_rep)), self.values(repeat_kv(v, self.n_rep))  # [B, H, S, Dh]
        seqlen, keys = q.shape[2], k.shape[2]
        if mask is None and seqlen > 1:
            mask = causal_mask(seqlen, keys, keys - seqlen, device=q.device)      # [T, S]
        scores = self.scores(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim))  # [B, H, T, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))               # future keys get weight 0
        weights = self.softmax(self.masked_scores(scores).float()).type_as(q)  # [B, H, T, S], rows sum to 1
        return weights @ v                                                  # [B, H, T, Dh]


# ---------------------------------------------------------------- feed-forward
class FeedForward(Lean):
    """SwiGLU: w2( silu(w1 x) * w3 x ).  w1 is the gate, w3 the up projection, w2 the down one.
    `w13`, when set (llama3.fast.fuse), is w1 and w3 stacked into one matmul.  Taps: gate, up
    [B, T, F]; `act` (the SiLU module) and hidden = act(gate) * up [B, T, F].
    `kernel` computes silu(gate) * up: `silu_mul` below, or one kernel call with the same numbers
    (llama3.fast.plan).  It runs only while `act` is nn.SiLU and no tap here is hooked; otherwise
    (another activation, inspection) the step by step line, so every tap sees its tensor."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate: D -> F
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down: F -> D
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up:   D -> F
        self.w13 = None
        self.act = nn.SiLU()
        self.gate, self.up, self.hidden = Tap(), Tap(), Tap()
        self.kernel = silu_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)                # [B, T, F] each
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)
        if type(self.act) is nn.SiLU and not _hooked(self.act, self.gate, self.up, self.hidden):
            return self.w2(self.kernel(gate, up))
        return self.w2(self.hidden(self.act(self.gate(gate)) * self.up(up)))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's middle: silu(gate) * up, silu(g) = g * sigmoid(g)."""
    return F.silu(gate) * up


def _hooked(*modules: nn.Module) -> bool:
    """Whether any of `modules` has a hook (or a global hook is registered)."""
    return _global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# ----------------------------------------------------------------------- block
class TransformerBlock(Lean):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h)).
    Taps: after_attention (h) and after_ffn (out), the residual stream [B, T, D]."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.after_attention, self.after_ffn = Tap(), Tap()

    def forward(self, x, cos, sin, start_pos=0, cache=None, mask=None):  # [B, T, D] -> [B, T, D]
        h = self.after_attention(x + self.attention(self.attention_norm(x), cos, sin, start_pos, cache, mask))
        return self.after_ffn(h + self.feed_forward(self.ffn_norm(h)))


# ----------------------------------------------------------------- the decoder
class Transformer(nn.Module):
    """The whole Llama 3 decoder.  `forward(tokens)` -> float logits for every position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)  # V x D lookup table
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # D -> V
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # Llama 3.2 1B/3B: one matrix, two uses
        self.rope = RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        """The model's float type (its activations' and KV cache's), whatever its linears store."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] (long) -> logits [B, T, V] (float32).

        start_pos: position of tokens[:, 0]; with a cache, keys 0..start_pos-1 come from it.
        positions: optional [B, T] positions for RoPE (e.g. restarting at each packed document);
                   default start_pos, start_pos+1, ...
        mask:      optional bool [B or 1, 1, T, S] (True = may attend); default causal.
        last_only: logits of the last position only, [B, 1, V] (generation needs no more: it
                   skips the output matmul and the [B, T, V] logits for the rest of a prompt).
        """
        seqlen = tokens.shape[1]
        needed = None
        if positions is None:
            positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)  # [T]
            needed = start_pos + seqlen
        cos, sin = self.rope(positions, needed)              # [T, Dh/2] or [B, T, Dh/2]
        h = self.tok_embeddings(tokens)                      # [B, T, D]
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, cache, mask)  # [B, T, D]
        if last_only:
            h = h[:, -1:]                                    # [B, 1, D]
        return self.output(self.norm(h)).float()             # [B, T, V]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "Transformer":
        """Random initialisation for training from scratch: normal(0, std) for matrices,
        output projections (wo, w2) scaled by 1/sqrt(2 * n_layers) as in GPT-2, norms at 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                scale = std / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale)
        return self
