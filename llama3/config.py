"""Model configuration: one dataclass, its derived sizes, and the named presets.

`ModelConfig` holds every number that decides the shape of a Llama 3 model.
It is built from a preset name, a Hugging Face `config.json`, a Meta
`params.json` (and, in `llama3.checkpoint.gguf`, from GGUF metadata).
Unknown keys and contradictory values raise `ConfigError` instead of being
silently dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llama3.errors import ConfigError


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


def _rope_scaling_from(d, where: str) -> RopeScaling:
    """A `RopeScaling` from our own dict form (`to_dict`/`to_meta`); bad input raises ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} rope_scaling must be a JSON object, got {d!r}")
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where} rope_scaling has unknown keys {unknown}; known keys are {sorted(known)}")
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
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config value {name}={value!r} must be a positive integer")
        if self.head_dim == 0:
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
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = _rope_scaling_from(d["rope_scaling"], "config")
        return cls(**d)

    # ------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta(cls, params: dict, vocab_size: int | None = None) -> "ModelConfig":
        """From a Meta `params.json`.

        Meta's file carries `use_scaled_rope: true` but not the constants; we use
        Meta's own constants (factor 8, low 1, high 4, original 8192: llama-models
        `apply_scaling`). Llama 3.2 1B/3B checkpoints need factor 32: pass a
        corrected config (or use the preset) for those; `llama3 doctor` warns.
        """
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len",
                 "rope_scaling"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"params.json has unknown keys {unknown}; this loader knows {sorted(known)}")
        try:
            dim = params["dim"]
            n_heads = params["n_heads"]
            vocab = params.get("vocab_size", -1)
            if vocab in (-1, None):
                vocab = vocab_size
            if vocab is None:
                raise ConfigError("params.json has no vocab_size; pass vocab_size (128256 for Llama 3)")
            return cls(
                dim=dim,
                n_layers=params["n_layers"],
                n_heads=n_heads,
                n_kv_heads=params.get("n_kv_heads") or n_heads,
                vocab_size=vocab,
                hidden_dim=ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
                norm_eps=params.get("norm_eps", 1e-5),
                rope_theta=float(params.get("rope_theta", 500000.0)),
                rope_scaling=(_rope_scaling_from(params["rope_scaling"], "params.json") if params.get("rope_scaling")
                              else RopeScaling() if params.get("use_scaled_rope") else None),
                max_seq_len=params.get("max_seq_len", 8192),
            )
        except KeyError as e:
            raise ConfigError(f"params.json lacks the required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"params.json has a value of the wrong type: {e}") from None

    def to_meta(self) -> dict:
        """A Meta `params.json` dict. `multiple_of`/`ffn_dim_multiplier` are chosen to
        reproduce `hidden_dim` exactly (Meta's files store only those two)."""
        params = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
            "norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "use_scaled_rope": self.rope_scaling is not None, "max_seq_len": self.max_seq_len,
        }
        for multiple_of in (1024, 4096, 256, 128, 64, 32, 16, 8, 4, 2, 1):
            if ffn_hidden_dim(self.dim, multiple_of, None) == self.hidden_dim:
                params.update(multiple_of=multiple_of)
                break
            mult = self.hidden_dim / int(2 * (4 * self.dim) / 3)
            for m in (round(mult, 1), round(mult, 2), round(mult, 4)):
                if ffn_hidden_dim(self.dim, multiple_of, m) == self.hidden_dim:
                    params.update(multiple_of=multiple_of, ffn_dim_multiplier=m)
                    break
            if "multiple_of" in params:
                break
        else:
            raise ConfigError(f"hidden_dim={self.hidden_dim} cannot be expressed in Meta's params.json form")
        if self.rope_scaling is not None and self.rope_scaling != RopeScaling():
            # Meta's format cannot say "factor 32"; record it so our own loader can restore it.
            params["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return params

    # ------------------------------------------------------------ HF config.json
    # Keys of a transformers LlamaConfig that carry no shape information we need.
    _HF_IGNORED = {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
        "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "pretraining_tp",
        "attention_dropout", "_name_or_path", "output_attentions", "output_hidden_states",
        "return_dict", "tokenizer_class", "is_llama_config", "rope_interleaved", "id2label",
        "label2id", "quantization_config", "unsloth_version", "tie_word_embeddings_", "chunk_size_feed_forward",
    }

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From a Hugging Face `config.json` (LlamaConfig)."""
        if cfg.get("model_type", "llama") != "llama":
            raise ConfigError(f"config.json describes a {cfg['model_type']!r} model; only 'llama' is supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={cfg['hidden_act']!r} is not Llama's SwiGLU ('silu')")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ConfigError("attention_bias/mlp_bias are not part of Llama 3; this checkpoint is not supported")
        known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "max_position_embeddings", "tie_word_embeddings", "head_dim", "hidden_act",
                 "attention_bias", "mlp_bias", "rope_parameters"} | cls._HF_IGNORED
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"config.json has unknown keys {unknown}; remove them or extend ModelConfig.from_hf")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config.json rope_scaling must be a JSON object or null, got {rope!r}")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise ConfigError(f"config.json rope_scaling (rope_type 'llama3') lacks the key {e.args[0]!r}") from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config.json rope_scaling has a non-numeric value: {e}") from None
        elif rope_type == "default":
            scaling = None
        else:
            raise ConfigError(f"rope type {rope_type!r} is not supported (Llama 3 uses 'llama3' or none)")
        try:
            dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
            head_dim = cfg.get("head_dim") or dim // n_heads
            return cls(
                dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
                hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta), rope_scaling=scaling,
                max_seq_len=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), head_dim=head_dim,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a value of the wrong type: {e}") from None

    def to_hf(self) -> dict:
        """A transformers `LlamaConfig` dict (config.json)."""
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "intermediate_size": self.hidden_dim, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return cfg


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
