"""How many parameters a Llama 3 model has, and where they sit, computed from its config alone.

For Llama 3 8B (D=4096, 32 layers, H=32, Hkv=8, Dh=128, F=14336, V=128256):

    embedding     V*D                                  =   525,336,576
    attention     layers * (D*H*Dh + 2*D*Hkv*Dh + H*Dh*D) = 1,342,177,280   wq, wk, wv, wo
    feed-forward  layers * 3*D*F                       = 5,637,144,576   w1, w2, w3
    norms         layers * 2*D + D                     =       266,240   two per block + final
    output head   D*V (0 when tied to the embedding)   =   525,336,576
    total                                              = 8,030,261,248
"""

from __future__ import annotations

from dataclasses import dataclass

from llama3.config import ModelConfig

# Bytes per parameter of the weights at common precisions (int8 ignores the small scale tensors).
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "int8": 1}


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    attention: int
    feed_forward: int
    norms: int
    output: int  # 0 when the head is tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.feed_forward + self.norms + self.output

    def rows(self) -> list[tuple[str, int]]:
        return [("embedding", self.embedding), ("attention", self.attention),
                ("feed-forward", self.feed_forward), ("norms", self.norms),
                ("output head", self.output), ("total", self.total)]


def count_params(config: ModelConfig) -> ParamCounts:
    """The parameter breakdown of a `config` model (no model is built)."""
    d, dh = config.dim, config.head_dim
    q_width, kv_width = config.n_heads * dh, config.n_kv_heads * dh
    per_layer_attention = d * q_width + 2 * d * kv_width + q_width * d  # wq, wk, wv, wo
    per_layer_ffn = 3 * d * config.hidden_dim                            # w1, w2, w3
    return ParamCounts(
        embedding=config.vocab_size * d,
        attention=config.n_layers * per_layer_attention,
        feed_forward=config.n_layers * per_layer_ffn,
        norms=config.n_layers * 2 * d + d,
        output=0 if config.tie_embeddings else d * config.vocab_size,
    )


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 2) -> int:
    """Memory the KV cache needs per token of context: keys and values of every layer."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_value


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def per_rank_params(config: ModelConfig, tp: int) -> int:
    """Parameters the largest rank holds when the model is split over `tp` ranks (`llama3.parallel.tp`):
    wq wk wv w1 w3 by output rows, wo w2 by input columns, the embedding and head by vocabulary
    (each split cut like torch.chunk: ceil(size / tp) for rank 0), the norms whole on every rank."""
    d, dh = config.dim, config.head_dim
    share = lambda n: -(-n // tp)  # noqa: E731  (rank 0's part of n rows)
    per_layer = (d * dh * (share(config.n_heads) * 2 + share(config.n_kv_heads) * 2)  # wq wo, wk wv
                 + 3 * d * share(config.hidden_dim))                                   # w1 w3, w2
    vocab = share(config.vocab_size) * d
    return config.n_layers * per_layer + vocab * (1 if config.tie_embeddings else 2) + config.n_layers * 2 * d + d


def tp_plan_lines(config: ModelConfig, tp: int, context: int, batch: int) -> list[str]:
    """What one rank of `--tp tp` needs: its weights (float32, bfloat16) and its KV cache (bfloat16) for
    `batch` sequences of `context` tokens; each rank keeps only its n_kv_heads / tp heads' keys and values."""
    weights = per_rank_params(config, tp)
    kv = kv_cache_bytes_per_token(config) // tp * context * batch
    return [f"tensor parallel over {tp} ranks (--tp {tp}), per rank:",
            f"  weights   {weights:>17,} parameters: {human_bytes(weights * 4)} float32, "
            f"{human_bytes(weights * 2)} bfloat16",
            f"  KV cache  {human_bytes(kv):>17} at bfloat16 for {batch} x {context:,} tokens "
            f"({config.n_kv_heads // tp} key/value heads of {config.n_kv_heads})",
            f"  total     {human_bytes(weights * 2 + kv):>17} at bfloat16 (plus activations, and the full "
            f"[batch, vocabulary] logits every rank gathers)"]
