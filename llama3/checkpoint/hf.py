"""Hugging Face checkpoint folders: config.json + model.safetensors (or sharded safetensors).

This module owns everything HF-specific: config.json <-> ModelConfig (`config_from_hf`,
`config_to_hf`), the tensor names, the q/k layout, reading and writing.
Two things differ from Meta's layout, and both are handled here, in one place:

1. Names.  HF calls the token embedding `model.embed_tokens.weight`, Meta (and
   this project) `tok_embeddings.weight`, and so on: see `HF_TO_META`.
2. The rotary layout of wq and wk.  Meta's RoPE rotates interleaved channel
   pairs (0,1), (2,3), ... of each head; HF's rotates channel i with i + Dh/2.
   HF's conversion script therefore permuted the rows of q_proj and k_proj
   once, so that the same weights compute the same attention under HF's RoPE.
   `hf_to_meta_rotary` undoes that permutation and `meta_to_hf_rotary` redoes it.

Reading is memory-mapped (`safe_open`) and tensor by tensor.  A tensor kept at its
stored dtype and layout is a view into the mapped file (no copy: the file's pages
become the parameter); one that is converted or permuted is copied and its mapped
pages are released at once (`release_pages`), so the load never holds two copies.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from llama3.checkpoint.checks import check_fits, check_layers, naming
from llama3.checkpoint.files import atomic_folder, read_json, release_if_copied, release_pages, write_json
from llama3.config import ModelConfig, RopeScaling
from llama3.errors import CheckpointError, ConfigError, refuse_unknown

# HF tensor name -> our (Meta) name; "{i}" stands for the layer index.
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",  # rows permuted
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",  # rows permuted
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30  # like transformers' save_pretrained: shards of at most 5 GiB


def name_map(n_layers: int) -> dict[str, str]:
    """Every HF tensor name of an n_layers model -> its Meta name."""
    names = {}
    for hf, meta in HF_TO_META.items():
        if "{i}" in hf:
            names.update({hf.format(i=i): meta.format(i=i) for i in range(n_layers)})
        else:
            names[hf] = meta
    return names



# ------------------------------------------------------------ config.json <-> ModelConfig
CONFIG_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
               "tie_word_embeddings", "head_dim", "hidden_act", "attention_bias", "mlp_bias", "rope_parameters"}
# Keys of a transformers LlamaConfig that carry no shape information we need.
IGNORED_CONFIG_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "pretraining_tp",
    "attention_dropout", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict", "tokenizer_class", "is_llama_config", "rope_interleaved", "id2label",
    "label2id", "quantization_config", "unsloth_version", "tie_word_embeddings_", "chunk_size_feed_forward",
    "transformers.js_config",  # the ONNX export's settings (SmolLM2 repos carry onnx/ beside the safetensors)
}


def _rope_scaling_from_hf(cfg: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling or None) from config.json's rope_scaling / rope_parameters."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"config.json rope_scaling must be a JSON object or null, got {rope!r}")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"rope type {rope_type!r} is not supported (Llama 3 uses 'llama3' or none)")
    try:
        return theta, RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"config.json rope_scaling (rope_type 'llama3') lacks the key {e.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"config.json rope_scaling has a non-numeric value: {e}") from None


def config_from_hf(cfg: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face `config.json` (LlamaConfig)."""
    if cfg.get("model_type", "llama") != "llama":
        raise ConfigError(f"config.json describes a {cfg['model_type']!r} model; only 'llama' is supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={cfg['hidden_act']!r} is not Llama's SwiGLU ('silu')")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError("attention_bias/mlp_bias are not part of Llama 3; this checkpoint is not supported")
    refuse_unknown(cfg, CONFIG_KEYS | IGNORED_CONFIG_KEYS,
                   "config.json has unknown keys {unknown}; remove them or extend checkpoint/hf.py", ConfigError)
    theta, scaling = _rope_scaling_from_hf(cfg)
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or dim // n_heads
        return ModelConfig(
            dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), head_dim=head_dim,
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks the required key {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"config.json has a value of the wrong type: {e}") from None


def config_to_hf(config: ModelConfig) -> dict:
    """A transformers `LlamaConfig` dict (config.json)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        "intermediate_size": config.hidden_dim, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
    }
    if config.rope_scaling is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    return cfg


# ---------------------------------------------------------- the rotary permute
def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of HF's q_proj/k_proj into Meta's interleaved-pair layout.

    w [n_heads*Dh, D].  Within each head HF stores the first channel of every
    pair, then the second ones: rows (a0 a1 .. a63 | b0 b1 .. b63) for Dh = 128.
    Meta wants them interleaved: (a0 b0 a1 b1 ... a63 b63).
    view [n_heads, 2, Dh/2, D] -> transpose -> [n_heads, Dh/2, 2, D] -> flatten back.
    """
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `hf_to_meta_rotary`: (a0 b0 a1 b1 ...) -> (a0 a1 ... | b0 b1 ...)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _rotary_heads(meta_name: str, config: ModelConfig) -> int | None:
    """How many heads a tensor's rows are grouped in, if it needs the rotary permute."""
    if meta_name.endswith("attention.wq.weight"):
        return config.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


# ------------------------------------------------------------------- reading
def weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """The safetensors files to read -> the tensor names the index assigns to each (None: all)."""
    if (folder / INDEX_FILE).is_file():
        weight_map = read_json(folder / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{folder / INDEX_FILE}: has no 'weight_map'; re-download or re-export it")
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(folder / file, []).append(name)
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {INDEX_FILE} but missing; re-download the shard")
        return dict(files)
    if (folder / WEIGHTS_FILE).is_file():
        return {folder / WEIGHTS_FILE: None}
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise CheckpointError(f"{folder}: only PyTorch pickle weights (.bin/.pt) found; this loader reads "
                              "safetensors: re-save the model with safe_serialization=True")
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}; is this a Hugging Face model folder?")


def read_hf_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a HF folder's config.json; errors name the file."""
    with naming(folder / "config.json"):
        return config_from_hf(read_json(folder / "config.json"))


def _tensor_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                              "the file is truncated or corrupt: re-download or re-export it") from None


def read_hf(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict]:
    """Read a HF Llama folder -> (ModelConfig, state dict with Meta names and layout).

    Tensors are read one at a time from the memory-mapped files, renamed, their
    q/k rows permuted, and cast to `dtype` (None keeps the stored dtype).
    A tied model's file has no lm_head.weight; one that holds a copy anyway
    has it dropped (it must equal the embedding).  Old files' rotary
    `inv_freq` buffers are ignored (they are recomputed from the config).
    """
    from safetensors import SafetensorError, safe_open
    from tqdm import tqdm

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    config = read_hf_config(folder)
    files = weight_files(folder)
    present = [name for file, listed in files.items() for name in (listed or _tensor_names(file))]
    check_layers(config, present, r"model\.layers\.(\d+)\.", str(folder / "config.json"), "num_hidden_layers")
    check_fits(config, sum(file.stat().st_size for file in files), 8, str(folder / "config.json"))
    names = name_map(config.n_layers)
    state: dict[str, torch.Tensor] = {}
    for file, expected in files.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                for name in expected or []:
                    if name not in keys:
                        raise CheckpointError(f"{file}: lacks tensor {name!r} that {INDEX_FILE} places there")
                for hf_name in tqdm(keys, desc=f"reading {file.name}", unit="tensor", leave=False, disable=None):
                    if hf_name.endswith("rotary_emb.inv_freq"):
                        continue
                    if hf_name not in names:
                        raise CheckpointError(f"{file}: unexpected tensor {hf_name!r} (not part of a "
                                              f"{config.n_layers}-layer Llama model)")
                    stored = f.get_tensor(hf_name)  # a view into the memory map: no copy yet
                    if hf_name == "lm_head.weight":
                        head_file = file
                    state[names[hf_name]] = _convert_in(stored, hf_name, names[hf_name], config, dtype)
                    release_if_copied(file, stored, state[names[hf_name]])  # copied: the file's pages are done
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                                  "the file is truncated or corrupt: re-download or re-export it") from None
    if config.tie_embeddings and "output.weight" in state:
        head = state.pop("output.weight")
        embedding = state.get("tok_embeddings.weight")
        if embedding is not None and not torch.equal(head, embedding):
            raise CheckpointError(f"{folder}: config.json says tie_word_embeddings=true but lm_head.weight "
                                  "differs from model.embed_tokens.weight; fix the config")
        release_pages(head_file, head.data_ptr(), head.nbytes)  # the dropped copy (if still a mapped view)
    return config, state


def _convert_in(w: torch.Tensor, hf_name: str, meta_name: str, config: ModelConfig,
                dtype: torch.dtype | None) -> torch.Tensor:
    heads = _rotary_heads(meta_name, config)
    if heads is not None:
        if w.dim() != 2 or w.shape[0] != heads * config.head_dim:
            raise CheckpointError(f"tensor {hf_name!r} has shape {list(w.shape)} but the config needs "
                                  f"[{heads * config.head_dim}, {config.dim}]; config.json contradicts the weights")
        w = hf_to_meta_rotary(w, heads)
    return w if dtype is None else w.to(dtype)


# ------------------------------------------------------------------- writing
def hf_state_dict(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our model's weights under HF names and layout (tied models: no lm_head.weight)."""
    meta_to_hf = {meta: hf for hf, meta in name_map(config.n_layers).items()}
    tensors = {}
    for name, w in model.state_dict().items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        heads = _rotary_heads(name, config)
        w = w.detach()
        tensors[meta_to_hf[name]] = (meta_to_hf_rotary(w, heads) if heads else w).contiguous().cpu()
    return tensors


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split into groups of at most max_bytes each (a tensor bigger than that gets its own)."""
    shards, current, size = [], {}, 0
    for name, w in tensors.items():
        nbytes = w.numel() * w.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = w
        size += nbytes
    return shards + [current]


def write_hf(llm, folder: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `llm` as a HF folder that transformers' AutoModelForCausalLM loads.

    config.json, model.safetensors (or model-0000k-of-0000n.safetensors + index when
    bigger than max_shard_bytes) in the model's dtype, and, when `llm.tokenizer` is
    set, the tokenizer files and a generation_config.json naming its stop ids.  Atomic: see `atomic_folder`.
    """
    from safetensors.torch import save_file

    config = llm.config
    tensors = hf_state_dict(llm.model, config)
    hf_config = config_to_hf(config)
    hf_config["torch_dtype"] = str(llm.model.dtype).removeprefix("torch.")
    tokenizer = llm.tokenizer
    if tokenizer is not None:
        hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    with atomic_folder(folder, stale=("model*.safetensors", INDEX_FILE, "generation_config.json")) as tmp:
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for k, shard in enumerate(shards, start=1):
                file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
            total = sum(w.numel() * w.element_size() for w in tensors.values())
            write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        write_json(tmp / "config.json", hf_config)
        if tokenizer is not None:
            # transformers' generate() stops at these ids (e.g. <|eot_id|> as well as <|end_of_text|>).
            stop = list(getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id])
            write_json(tmp / "generation_config.json", {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop})
            if hasattr(tokenizer, "save"):
                tokenizer.save(tmp)
