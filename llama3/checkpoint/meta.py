"""Meta checkpoint folders: params.json + consolidated.00.pth [... consolidated.NN.pth] [+ tokenizer.model].

This module owns everything Meta-specific: params.json <-> ModelConfig
(`config_from_meta`, `config_to_meta`), the shard layout, reading and writing.

The tensor names in Meta's files are this project's parameter names, so no
renaming is needed.  Two things need care:

1. Model-parallel shards.  Meta trained the big models split over several GPUs
   with fairscale, and saved one file per GPU (70B: 8 files).  Each weight was
   split the way its layer computes (see `SHARD_DIM`), so merging concatenates
   the pieces along that dimension; norms were replicated and are taken from
   shard 0.
2. RoPE scaling.  params.json says only `use_scaled_rope: true`.  Meta's code
   (llama-models, llama3/model.py `apply_scaling`) then uses factor 8, low 1,
   high 4, original context 8192; we use those constants too, with one
   exception: the Llama 3.2 1B and 3B shapes get factor 32, the value their
   published HF configs carry (Meta's reference code uses 8 for them too,
   llama-models issues #166 and #241).  A `rope_scaling` dict in params.json
   (written by our own `write_meta`) overrides both.

Files are opened with `torch.load(weights_only=True, mmap=True)`: no code in
the file runs, and tensors are paged in from disk only as they are used.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path

import torch

from llama3.checkpoint.checks import check_fits, check_layers, naming
from llama3.checkpoint.files import atomic_folder, read_json, release_if_copied, release_pages, write_json
from llama3.config import PRESETS, ModelConfig, RopeScaling, ffn_hidden_dim, rope_scaling_from_dict
from llama3.errors import CheckpointError, ConfigError, refuse_unknown

# Which dimension fairscale split each weight along (the name's second-to-last part).
#   ColumnParallelLinear (wq wk wv w1 w3 output): output features, dim 0 of the [out, in] weight.
#   RowParallelLinear (wo w2): input features, dim 1.
#   VocabParallelEmbedding (tok_embeddings, Llama 3): vocabulary rows, dim 0.
# Anything not listed (the RMSNorm weights) is replicated in every shard.
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}

SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
LONG_CONTEXT = 131072  # Llama 3.1/3.2 context length, used when params.json says use_scaled_rope



# ------------------------------------------------------------ params.json <-> ModelConfig
PARAMS_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "rope_scaling"}


def config_from_meta(params: dict, vocab_size: int | None = None) -> ModelConfig:
    """A ModelConfig from a Meta `params.json`.

    Meta's file carries `use_scaled_rope: true` but not the constants; we use
    Meta's own constants (factor 8, low 1, high 4, original 8192: llama-models
    `apply_scaling`).  Llama 3.2 1B/3B checkpoints need factor 32: `_config`
    below recognises their shapes (and `llama3 doctor` warns).
    """
    refuse_unknown(params, PARAMS_KEYS, "params.json has unknown keys {unknown}; this loader knows {known}",
                   ConfigError)
    try:
        dim = params["dim"]
        n_heads = params["n_heads"]
        vocab = params.get("vocab_size", -1)
        if vocab in (-1, None):
            vocab = vocab_size
        if vocab is None:
            raise ConfigError("params.json has no vocab_size; pass vocab_size (128256 for Llama 3)")
        return ModelConfig(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            vocab_size=vocab,
            hidden_dim=ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=(rope_scaling_from_dict(params["rope_scaling"], "params.json") if params.get("rope_scaling")
                          else RopeScaling() if params.get("use_scaled_rope") else None),
            max_seq_len=params.get("max_seq_len", 8192),
        )
    except KeyError as e:
        raise ConfigError(f"params.json lacks the required key {e.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ConfigError(f"params.json has a value of the wrong type: {e}") from None


def config_to_meta(config: ModelConfig) -> dict:
    """A Meta `params.json` dict.  `multiple_of`/`ffn_dim_multiplier` are chosen to
    reproduce `hidden_dim` exactly (Meta's files store only those two)."""
    params = {
        "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
        "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "use_scaled_rope": config.rope_scaling is not None, "max_seq_len": config.max_seq_len,
    }
    for multiple_of in (1024, 4096, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ffn_hidden_dim(config.dim, multiple_of, None) == config.hidden_dim:
            params.update(multiple_of=multiple_of)
            break
        mult = config.hidden_dim / int(2 * (4 * config.dim) / 3)
        for m in (round(mult, 1), round(mult, 2), round(mult, 4)):
            if ffn_hidden_dim(config.dim, multiple_of, m) == config.hidden_dim:
                params.update(multiple_of=multiple_of, ffn_dim_multiplier=m)
                break
        if "multiple_of" in params:
            break
    else:
        raise ConfigError(f"hidden_dim={config.hidden_dim} cannot be expressed in Meta's params.json form")
    if config.rope_scaling is not None and config.rope_scaling != RopeScaling():
        # Meta's format cannot say "factor 32"; record it so our own loader can restore it.
        params["rope_scaling"] = dataclasses.asdict(config.rope_scaling)
    return params


def shard_files(folder: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ... in order; a gap is an error."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))}
    if not found:
        raise CheckpointError(f"{folder}: no consolidated.00.pth; is this a Meta model folder?")
    for k in range(len(found)):
        if k not in found:
            raise CheckpointError(f"{folder}: shard consolidated.{k:02d}.pth is missing "
                                  f"({len(found)} shards found); re-download it")
    return [found[k] for k in range(len(found))]


def load_shard(file: Path) -> dict[str, torch.Tensor]:
    """One .pth file, memory-mapped and without running pickled code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({first[:200]}); "
                              "the file is truncated or corrupt: re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state dict)")
    return state


def merge_shards(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    """Concatenate model-parallel pieces along each weight's `SHARD_DIM` (one shard: returned as is).

    Weight by weight: once a weight is merged, its pieces' memory-mapped pages are
    released, so the merge holds the merged weights and one weight's pieces, not
    every shard's pages as well.
    """
    if len(shards) == 1:
        return dict(shards[0])
    _check_same_names(shards, files)
    merged = {}
    for name in shards[0]:
        dim = SHARD_DIM.get(name.split(".")[-2]) if "." in name else None
        pieces = [s[name] for s in shards]
        if dim is None or pieces[0].dim() < 2:
            merged[name] = pieces[0]  # replicated: shard 0's copy is kept, the others released
            released = zip(pieces[1:], files[1:])
        else:
            merged[name] = torch.cat(pieces, dim=dim)
            released = zip(pieces, files)
        for piece, file in released:
            release_pages(file, piece.data_ptr(), piece.nbytes)
    return merged


def _check_same_names(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> None:
    for shard, file in zip(shards[1:], files[1:]):
        if shard.keys() != shards[0].keys():
            odd = sorted(shard.keys() ^ shards[0].keys())[0]
            raise CheckpointError(f"{file}: tensor {odd!r} is in only some of the shards; re-download them")


def _config(params: dict, state: dict[str, torch.Tensor]) -> ModelConfig:
    """ModelConfig from params.json plus what only the tensors tell: vocabulary size and tying."""
    embedding = state.get("tok_embeddings.weight")
    vocab = embedding.shape[0] if embedding is not None and embedding.dim() == 2 else None
    config = config_from_meta(params, vocab_size=vocab)
    head = state.get("output.weight")
    tied = head is None or (embedding is not None and head.shape == embedding.shape and torch.equal(head, embedding))
    config = config.replace(tie_embeddings=tied)
    if params.get("use_scaled_rope") and "max_seq_len" not in params:
        config = config.replace(max_seq_len=LONG_CONTEXT)
    if config.rope_scaling is not None and "rope_scaling" not in params:
        for name in ("llama-3.2-1b", "llama-3.2-3b"):
            preset = PRESETS[name]
            if config.replace(rope_scaling=preset.rope_scaling, tie_embeddings=preset.tie_embeddings) == preset:
                config = config.replace(rope_scaling=preset.rope_scaling)
    return config


CONFIG_TENSORS = ("tok_embeddings.weight", "output.weight")  # what `_config` reads besides params.json


def _open(folder: str | os.PathLike) -> tuple[dict, list[Path], list[dict[str, torch.Tensor]]]:
    """params.json, the shard files, and each shard's tensors (memory-mapped, nothing read yet)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    params = read_json(folder / "params.json")
    files = shard_files(folder)
    shards = [load_shard(f) for f in files]
    _check_same_names(shards, files)
    return params, files, shards


def _read_config(params: dict, shards: list[dict], files: list[Path]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config, and the (merged) embedding and head it was read from."""
    merged = merge_shards([{n: s[n] for n in CONFIG_TENSORS if n in s} for s in shards], files)
    where = str(files[0].parent / "params.json")
    with naming(where):
        config = _config(params, merged)
    check_layers(config, shards[0], r"layers\.(\d+)\.", where, "n_layers")
    check_fits(config, sum(f.stat().st_size for f in files), 8, where)
    return config, merged


def read_meta(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict]:
    """Read a Meta folder -> (ModelConfig, merged state dict), tensors cast to dtype (None: as stored).
    A tied model's state dict has no output.weight.

    One shard at its stored dtype: the tensors are views into the memory-mapped file
    (no copy).  Several shards are merged weight by weight (a tied head is dropped
    before the rest is merged), and casting goes tensor by tensor, each source
    released (its mapped pages, or the merged tensor) as soon as its cast exists.
    """
    params, files, shards = _open(folder)
    config, merged = _read_config(params, shards, files)
    if config.tie_embeddings:
        merged.pop("output.weight", None)
    merged.update(merge_shards([{n: t for n, t in s.items() if n not in CONFIG_TENSORS} for s in shards], files))
    merged.pop("rope.freqs", None)  # a precomputed RoPE table in some Meta files; we compute our own
    state = {name: merged[name] for name in shards[0] if name in merged}  # the file's order
    del merged, shards
    if dtype is not None:
        from tqdm import tqdm

        for name in tqdm(list(state), desc=f"casting to {dtype}", unit="tensor", leave=False, disable=None):
            stored = state[name]
            state[name] = stored.to(dtype)
            release_if_copied(files[0], stored, state[name])  # no-op unless a mapped view
            del stored
    return config, state


def read_meta_config(folder: str | os.PathLike) -> ModelConfig:
    """Only the config (the tensors are memory-mapped; only the embedding and head are read and merged)."""
    params, files, shards = _open(folder)
    return _read_config(params, shards, files)[0]


def write_meta(llm, folder: str | os.PathLike) -> None:
    """Write `llm` as a Meta folder: params.json, consolidated.00.pth (one shard), tokenizer files.

    output.weight is always written (a tied model's shares the embedding's storage,
    so it costs no bytes), so Meta's own code loads the file with strict=True.
    """
    state = {name: w.detach().cpu() for name, w in llm.model.state_dict().items()}
    with atomic_folder(folder, stale=("consolidated.*.pth",)) as tmp:
        torch.save(state, tmp / "consolidated.00.pth")
        write_json(tmp / "params.json", config_to_meta(llm.config))
        if llm.tokenizer is not None and hasattr(llm.tokenizer, "save"):
            llm.tokenizer.save(tmp)
