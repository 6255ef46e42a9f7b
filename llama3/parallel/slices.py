"""Read one rank's slice of each weight straight from a checkpoint file, never the whole tensor.

    open_slices(path) -> (ModelConfig, SliceReader)
    reader.read(name, dim, start, stop) -> rows (dim 0) or columns (dim 1) start:stop of weight `name`
                                           (our = Meta names); dim None reads it whole (the norms)

Every format is memory-mapped, so only the pages of the asked-for slice are ever read:
  * Hugging Face safetensors: `safe_open(...).get_slice(name)[a:b]`.  q/k rows are permuted
    within each head (`hf.hf_to_meta_rotary`), and a rank always gets whole heads, so the
    slice is permuted with its own head count and equals the slice of the permuted matrix.
  * Meta `consolidated.NN.pth` shards (torch.load mmap=True, weights_only=True): a weight split
    along `meta.SHARD_DIM` over K shards is a row or column range of the concatenation; a rank's
    range takes the overlapping parts of the pieces (when N is a multiple of K, exactly one
    piece; when N divides K, K/N whole pieces), and a slice across the split dimension takes
    that slice of every piece.  Any N works, not only divisors and multiples of K.
  * GGUF: float tensors are numpy views of the map; quantized ones store whole rows of blocks,
    so a row range is a byte range, dequantized alone; a column range is dequantized a few
    thousand rows at a time and cut, so only one chunk of float32 exists at once.

The readers of `llama3.checkpoint` turn a file into a whole state dict; this module only adds
the slicing and reuses their names, layouts and checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llama3.checkpoint.gguf_file import TORCH_FLOATS
from llama3.config import ModelConfig
from llama3.errors import CheckpointError

ROWS_PER_CHUNK = 4096  # GGUF column slices dequantize this many rows at a time
GGUF_FLOATS = TORCH_FLOATS  # the GGUF types torch reads as they are: the one reader's table


def _narrow(w: torch.Tensor, dim: int | None, start: int, stop: int) -> torch.Tensor:
    return w if dim is None else w.narrow(dim, start, stop - start)


class HFSlices:
    def __init__(self, folder: Path, config: ModelConfig):
        from safetensors import safe_open

        from llama3.checkpoint.hf import weight_files, name_map

        self.config = config
        names = name_map(config.n_layers)
        self.where: dict[str, tuple[object, str]] = {}
        for file in weight_files(folder):
            handle = safe_open(str(file), framework="pt")
            for hf_name in handle.keys():
                if hf_name in names:
                    self.where[names[hf_name]] = (handle, hf_name)

    def read(self, name: str, dim: int | None, start: int = 0, stop: int = 0) -> torch.Tensor:
        from llama3.checkpoint.hf import hf_to_meta_rotary

        if name not in self.where:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        handle, hf_name = self.where[name]
        piece = handle.get_slice(hf_name)
        w = piece[:] if dim is None else (piece[start:stop] if dim == 0 else piece[:, start:stop])
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            w = hf_to_meta_rotary(w, w.shape[0] // self.config.head_dim)  # whole heads: permute locally
        return w


class MetaSlices:
    def __init__(self, folder: Path):
        from llama3.checkpoint.meta import load_shard, shard_files

        self.files = shard_files(folder)
        self.shards = [load_shard(f) for f in self.files]

    def read(self, name: str, dim: int | None, start: int = 0, stop: int = 0) -> torch.Tensor:
        from llama3.checkpoint.meta import SHARD_DIM

        if name not in self.shards[0]:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        pieces = [s[name] for s in self.shards]
        split = SHARD_DIM.get(name.split(".")[-2]) if len(pieces) > 1 and pieces[0].dim() >= 2 else None
        if split is None:                                 # one shard, or replicated in every shard
            return _narrow(pieces[0], dim, start, stop)
        if dim is None:
            return torch.cat(pieces, dim=split)
        if dim != split:                                  # my columns of every piece, side by side
            return torch.cat([_narrow(p, dim, start, stop) for p in pieces], dim=split)
        parts, offset = [], 0
        for p in pieces:                                  # the pieces that overlap start:stop
            size = p.shape[split]
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                parts.append(p.narrow(split, lo - offset, hi - lo))
            offset += size
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=split)


class GGUFSlices:
    def __init__(self, path: str):
        from llama3.checkpoint.gguf import ROPE_FREQS, gguf_to_meta_name, open_gguf

        self.path = path
        self.reader = open_gguf(path, mode="c")
        self.tensors = {gguf_to_meta_name(t.name): t for t in self.reader.tensors if t.name != ROPE_FREQS}

    def read(self, name: str, dim: int | None, start: int = 0, stop: int = 0) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self.tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"{self.path}: lacks tensor {name!r}")
        shape = tuple(int(n) for n in reversed(tensor.shape))
        stored = GGUF_FLOATS.get(int(tensor.tensor_type))
        if stored is not None:
            raw = torch.from_numpy(tensor.data)
            view = (raw.view(stored) if raw.dtype != stored else raw).reshape(shape)
            return _narrow(view, dim, start, stop)
        raw = tensor.data.reshape(shape[0] if len(shape) > 1 else 1, -1)  # [rows, bytes per row]
        if dim == 0:
            raw = raw[start:stop]
        chunks = []
        for begin in range(0, raw.shape[0], ROWS_PER_CHUNK):
            rows = torch.from_numpy(dequantize(raw[begin:begin + ROWS_PER_CHUNK], tensor.tensor_type).copy())
            chunks.append(rows[:, start:stop].clone() if dim == 1 else rows)
        out = torch.cat(chunks)
        return out.reshape(shape) if dim is None else out


def open_slices(path: str | os.PathLike):
    """(ModelConfig, a reader with `.read(name, dim, start, stop)`) for any checkpoint format."""
    from llama3.checkpoint import detect_format, read_config

    fmt = detect_format(path)
    config = read_config(path)
    if fmt == "hf":
        return config, HFSlices(Path(path), config)
    if fmt == "meta":
        return config, MetaSlices(Path(path))
    return config, GGUFSlices(str(path))
