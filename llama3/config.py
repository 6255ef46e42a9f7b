"""Model configuration: one dataclass, its derived sizes, and the named presets.

`ModelConfig` holds every number that decides the shape of a Llama 3 model.
It is built from a preset name or our own dict form (`to_dict`/`from_dict`);
each checkpoint format translates its own file into it (`checkpoint/hf.py`:
config.json, `checkpoint/meta.py`: params.json, `checkpoint/gguf.py`: GGUF
metadata).  Unknown keys and contradictory values raise `ConfigError`
instead of being silently dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llama3.errors import ConfigError, refuse_unknown


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling ("llama3" rope_type in HF configs).

    Low frequencies (long wavelengths) are divided by `factor`, high
    frequencies are kept, and the band in between is interpolated smoothly.
    Constants from Meta's `apply_scaling` (llama-models, llama3/model.py):
    Llama 3.1 uses factor 8, Llama 3.2 (1B, 3B) uses factor 32.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_real(f"rope_scaling {name}", getattr(self, name), 1e-3, 1e4)
        if not self.factor >= 1:
            raise ConfigError(f"rope_scaling factor={self.factor} must be at least 1 (it slows the slow frequencies)")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(f"rope_scaling high_freq_factor={self.high_freq_factor} must exceed "
                              f"low_freq_factor={self.low_freq_factor} (Llama 3.1: 4 and 1)")
        _check_int("rope_scaling original_max_position_embeddings", self.original_max_position_embeddings,
                   LIMITS["max_seq_len"])


# Upper bounds no real model comes near (Llama 3.1 405B: dim 16384, 126 layers, 128 heads,
# FFN 53248, vocabulary 128256, context 131072): a larger value is a corrupt or hostile file,
# refused before anything is built from it.
LIMITS = {"dim": 1 << 17, "n_layers": 1 << 12, "n_heads": 1 << 12, "n_kv_heads": 1 << 12, "vocab_size": 1 << 24,
          "hidden_dim": 1 << 20, "max_seq_len": 1 << 24, "head_dim": 1 << 12}
NORM_EPS_RANGE = (1e-12, 1e-2)     # real models: 1e-5 (Llama 3) or 1e-6
ROPE_THETA_RANGE = (1.0, 1e10)     # real models: 1e4 to 5e5, a few long-context ones 1e6-1e7


def _check_int(name: str, value, limit: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config value {name}={value!r} must be a positive integer")
    if value > limit:
        raise ConfigError(f"config value {name}={value} is larger than any real model's (at most {limit}); "
                          "the config is corrupt")


def _check_real(name: str, value, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"config value {name}={value!r} must be a number")
    if not low <= value <= high:  # also refuses NaN and infinities
        raise ConfigError(f"config value {name}={value!r} must be positive and within [{low:g}, {high:g}], "
                          "where real models' values lie; the config is corrupt")


def rope_scaling_from_dict(d, where: str) -> RopeScaling:
    """A `RopeScaling` from our own dict form (`to_dict`/`to_meta`); bad input raises ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} rope_scaling must be a JSON object, got {d!r}")
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    refuse_unknown(d, known, where + " rope_scaling has unknown keys {unknown}; known keys are {known}", ConfigError)
    try:
        return RopeScaling(**{k: (int(v) if k == "original_max_position_embeddings" else float(v))
                              for k, v in d.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} rope_scaling has a non-numeric value: {e}") from None


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size exactly as Meta derives it (llama/model.py, FeedForward).

    Start from 4*dim, take 2/3 of it (SwiGLU has three matrices instead of two,
    so this keeps the parameter count of a 4*dim two-matrix MLP), scale by
    `ffn_dim_multiplier`, round up to a multiple of `multiple_of`.
    Llama 3 8B: 4*4096=16384 -> 10922 -> *1.3 = 14198 -> 14336 (multiple_of 1024).
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    dim: int                       # D: width of the residual stream
    n_layers: int                  # number of transformer blocks
    n_heads: int                   # H: query heads
    n_kv_heads: int                # Hkv: key/value heads (grouped-query attention when < H)
    vocab_size: int                # V
    hidden_dim: int                # F: SwiGLU hidden size
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False   # output head shares the token embedding matrix
    head_dim: int = field(default=0)  # Dh; 0 means dim // n_heads (always true for Llama 3)

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            _check_int(name, getattr(self, name), LIMITS[name])
        if self.head_dim != 0:
            _check_int("head_dim", self.head_dim, LIMITS["head_dim"])
        else:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each key/value head among a whole group of query heads)"
            )
        _check_real("norm_eps", self.norm_eps, *NORM_EPS_RANGE)
        _check_real("rope_theta", self.rope_theta, *ROPE_THETA_RANGE)
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"config value tie_embeddings={self.tie_embeddings!r} must be true or false")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"config value rope_scaling={self.rope_scaling!r} must be a RopeScaling or None")

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ dicts
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of `to_dict` (our own JSON form); unknown keys raise."""
        refuse_unknown(d, {f.name for f in dataclasses.fields(cls)},
                       "unknown config keys {unknown}; known keys are {known}", ConfigError)
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = rope_scaling_from_dict(d["rope_scaling"], "config")
        return cls(**d)


# ---------------------------------------------------------------------- presets
# Published shapes (Meta's params.json files and the HF config.json files).
_LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                  hidden_dim=ffn_hidden_dim(4096, 1024, 1.3), norm_eps=1e-5, rope_theta=500000.0)
_LLAMA3_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                   hidden_dim=ffn_hidden_dim(8192, 4096, 1.3), norm_eps=1e-5, rope_theta=500000.0)

PRESETS: dict[str, ModelConfig] = {
    "llama-3-8b": ModelConfig(**_LLAMA3_8B, max_seq_len=8192),
    "llama-3-70b": ModelConfig(**_LLAMA3_70B, max_seq_len=8192),
    "llama-3.1-8b": ModelConfig(**_LLAMA3_8B, max_seq_len=131072, rope_scaling=RopeScaling(factor=8.0)),
    "llama-3.1-70b": ModelConfig(**_LLAMA3_70B, max_seq_len=131072, rope_scaling=RopeScaling(factor=8.0)),
    "llama-3.1-405b": ModelConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256,
                                  hidden_dim=ffn_hidden_dim(16384, 4096, 1.2), norm_eps=1e-5,
                                  rope_theta=500000.0, max_seq_len=131072, rope_scaling=RopeScaling(factor=8.0)),
    "llama-3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                hidden_dim=ffn_hidden_dim(2048, 256, 1.5), norm_eps=1e-5, rope_theta=500000.0,
                                max_seq_len=131072, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True),
    "llama-3.2-3b": ModelConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                                hidden_dim=ffn_hidden_dim(3072, 256, 1.0), norm_eps=1e-5, rope_theta=500000.0,
                                max_seq_len=131072, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True),
    # Tiny shapes for tests and CPU training: the same architecture, a few thousand times smaller.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=192,
                        max_seq_len=256, tie_embeddings=True),
    # The default of `llama3 train`: 3.1M parameters; 700 steps of 16 x 256 tokens, ~10-15 minutes on 2 CPU cores.
    # vocab_size is replaced by the size of the tokenizer trained for it.
    "tiny-cpu": ModelConfig(dim=192, n_layers=6, n_heads=6, n_kv_heads=2, vocab_size=4096, hidden_dim=512,
                            max_seq_len=1024, tie_embeddings=True),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
