"""The one GGUF reader: header, metadata, tensor list and block codecs, with one error type.

Used by the checkpoint loader (`checkpoint/gguf.py`), the tokenizer (`tokenizer/gguf_vocab.py`,
metadata only) and the quantized loaders (`fast/gguf_quantized.py`, which read the blocks).

Layout (ggml/docs/gguf.md), little-endian throughout:

    b"GGUF", uint32 version (2 or 3), uint64 tensor count, uint64 key count
    per key:     string key, uint32 value type, value
                 (strings: uint64 length + UTF-8 bytes; arrays: uint32 item type, uint64 length, items)
    per tensor:  string name, uint32 n_dims, uint64 dims[n_dims] (row length first),
                 uint32 ggml type, uint64 offset (from the start of the data section)
    padding to `general.alignment` (default 32), then the data section

Our own parser rather than `gguf.GGUFReader`: that one builds a numpy view for every string
of the vocabulary, ~3 s and ~160 MB for SmolLM2's 49,152 tokens and 48,900 merges on every
load (measured); this one reads the header once into Python values and maps the data.
Dequantizing the block types is the `gguf` package's (`gguf.quants.dequantize`).
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

import numpy as np
import torch

from llama3.checkpoint.files import release_pages
from llama3.errors import CheckpointError
from llama3.tokenizer.base import TokenizerError


class GGUFError(CheckpointError, TokenizerError):
    """A GGUF file is missing, truncated or malformed (a checkpoint error and a tokenizer error alike)."""


def invalid(path, why: str) -> GGUFError:
    return GGUFError(f"{path}: not a valid GGUF file ({why}); "
                     "the file is corrupt or truncated, download or export it again")


# Value types of the GGUF spec: id -> struct format (strings and arrays are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(f, path) -> tuple[int, dict]:
    """(tensor count, metadata) from a GGUF file object at its start; leaves `f` just after
    the metadata, where the tensor list begins."""
    data = f.read(16)
    if len(data) < 16 or data[:4] != b"GGUF":
        raise invalid(path, "no GGUF magic number")
    version, n_tensors = struct.unpack_from("<IQ", data, 4)
    if version not in (2, 3):
        raise invalid(path, f"GGUF version {version}; versions 2 and 3 are supported")

    def read(fmt):
        size = struct.calcsize(fmt)
        raw = f.read(size)
        if len(raw) < size:
            raise invalid(path, "truncated inside its metadata")
        return struct.unpack(fmt, raw)[0]

    def read_string():
        n = read("<Q")
        raw = f.read(n)
        if len(raw) < n:
            raise invalid(path, "truncated inside its metadata")
        return raw.decode("utf-8", errors="replace")

    def read_value(kind):
        if kind in _SCALARS:
            return read(_SCALARS[kind])
        if kind == _STRING:
            return read_string()
        if kind == _ARRAY:
            item_kind, n = read("<I"), read("<Q")
            if item_kind in _SCALARS:  # numbers: one read for the whole array
                fmt = _SCALARS[item_kind]
                raw = f.read(n * struct.calcsize(fmt))
                if len(raw) < n * struct.calcsize(fmt):
                    raise invalid(path, "truncated inside its metadata")
                return list(struct.unpack(f"<{n}{fmt[1]}", raw))
            return [read_value(item_kind) for _ in range(n)]
        raise invalid(path, f"unknown metadata value type {kind}")

    try:
        n_keys = read("<Q")
        metadata = {}
        for _ in range(n_keys):
            key = read_string()
            metadata[key] = read_value(read("<I"))
    except (struct.error, MemoryError, OverflowError):
        raise invalid(path, "truncated inside its metadata") from None
    return n_tensors, metadata


def read_metadata(path: str | os.PathLike) -> dict:
    """The key/value metadata of a GGUF file, without reading the tensor list or the weights."""
    try:
        with open(path, "rb") as f:
            return read_header(f, path)[1]
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror}") from None


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file: its name, GGUF shape (row length first), type and bytes.

    data is a view into the memory-mapped file: F32/F16 (and other one-value-per-element
    types) as a numpy array of torch's shape order; BF16 and quantized types as uint8 rows
    [..., bytes per row] (numpy has no bfloat16) -- the same arrays `gguf.GGUFReader` gives."""
    name: str
    shape: tuple[int, ...]
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray


class GGUFFile(NamedTuple):
    """A GGUF file opened by `open_gguf`: its metadata (key -> int, float, bool, str or list)
    and its tensors, in file order."""
    metadata: dict
    tensors: list[GGUFTensor]


# GGML types numpy can hold one element per value of (GGUF ids): F32, F16, I8, I16, I32, I64, F64.
_NUMPY_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


def open_gguf(path: str | os.PathLike, mode: str = "r") -> GGUFFile:
    """The metadata and tensor list of a GGUF file, the tensors memory-mapped (read only when
    touched), or a GGUFError naming the file when it is not a complete GGUF file.

    mode "r" maps the file read-only; "c" copy-on-write (writable arrays whose changes
    never reach the file), so a tensor can become a parameter without a copy.
    """
    import gguf

    path = str(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n_tensors, metadata = read_header(f, path)

            def read(fmt: str):
                raw = f.read(struct.calcsize(fmt))
                if len(raw) < struct.calcsize(fmt):
                    raise invalid(path, "the tensor list is cut short")
                return struct.unpack(fmt, raw)

            if n_tensors > size // 24:  # each entry takes at least 24 bytes: a garbage count
                raise invalid(path, f"it claims {n_tensors} tensors")
            infos = []
            for _ in range(n_tensors):
                (length,) = read("<Q")
                name = f.read(length).decode("utf-8", errors="replace")
                (n_dims,) = read("<I")
                if not 1 <= n_dims <= 4:
                    raise invalid(path, f"tensor {name!r} has {n_dims} dimensions")
                dims = read(f"<{n_dims}Q")
                kind, offset = read("<IQ")
                infos.append((name, tuple(int(d) for d in dims), kind, offset))
            alignment = int(metadata.get("general.alignment", 32))
            start = -(-f.tell() // alignment) * alignment  # tensor data begins at the next aligned byte
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror}") from None
    mapped = np.memmap(path, mode=mode) if infos else np.zeros(0, np.uint8)
    tensors = []
    for name, dims, kind, offset in infos:
        try:
            tensor_type = gguf.GGMLQuantizationType(kind)
            block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        except (ValueError, KeyError):
            raise invalid(path, f"tensor {name!r} has unknown type {kind}") from None
        if dims[0] % block:
            raise invalid(path, f"tensor {name!r} rows of {dims[0]} are not whole {block}-value blocks")
        n_values = int(np.prod(dims))
        n_bytes = n_values // block * block_bytes
        begin = start + offset
        if begin + n_bytes > size:
            raise invalid(path, f"tensor {name!r} ends past the end of the file")
        raw = mapped[begin:begin + n_bytes]
        if kind in _NUMPY_TYPES:
            data = raw.view(_NUMPY_TYPES[kind]).reshape(tuple(reversed(dims)))
        else:
            data = raw.reshape(*reversed(dims[1:]), dims[0] // block * block_bytes)
        tensors.append(GGUFTensor(name, dims, tensor_type, data))
    return GGUFFile(metadata, tensors)


# ------------------------------------------------------------------- block codecs
def torch_shape(tensor: GGUFTensor) -> tuple[int, ...]:
    """GGUF lists shapes row length first: GGUF [576, 1536] is torch [1536, 576]."""
    return tuple(int(n) for n in reversed(tensor.shape))


def dequantize(tensor: GGUFTensor, path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One GGUF tensor -> a torch tensor of `dtype` in torch's shape order.

    Dequantized a few million weights at a time straight into the result, so the
    temporaries of `gguf.quants.dequantize` (several float32 copies of what it is
    given) stay small even for the 49152 x 576 embedding.
    """
    from gguf.quants import dequantize as dequantize_blocks

    shape = torch_shape(tensor)
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(-1, shape[-1])                           # [R, C]: C = the GGUF row length ne[0]
    raw = tensor.data.reshape(rows.shape[0], -1)             # [R, bytes or values per row]
    step = max(1, (1 << 22) // shape[-1])                    # ~4M weights (16 MB of float32) per chunk
    for start in range(0, rows.shape[0], step):
        try:
            chunk = dequantize_blocks(raw[start:start + step], tensor.tensor_type)  # float32 [rows, C]
        except NotImplementedError:
            raise GGUFError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the "
                            "gguf package cannot dequantize; convert the file to F16 or Q8_0 with llama.cpp"
                            ) from None
        if not chunk.flags.writeable:                        # F32 data is a view into the read-only memory map
            chunk = chunk.copy()
        rows[start:start + step] = torch.from_numpy(chunk).reshape(-1, shape[-1])
    release_pages(path, tensor.data.ctypes.data, tensor.data.nbytes)  # the file's pages are no longer needed
    return out


# GGUF float types whose bytes torch reads as they are: no dequantizing, at most a cast.
_TORCH_FLOATS = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16


def to_torch(tensor: GGUFTensor, path: str, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor (of a file opened with mode "c") -> a torch tensor of `dtype`, torch's shape order.

    A float tensor already of `dtype` is a view into the memory-mapped file (no copy);
    another float type is cast by torch; quantized ones go through `dequantize`.
    Whatever is copied has its mapped pages released, so the file is never held twice.
    """
    stored = _TORCH_FLOATS.get(int(tensor.tensor_type))
    if stored is None:
        return dequantize(tensor, path, dtype)
    raw = torch.from_numpy(tensor.data)
    view = (raw.view(stored) if raw.dtype != stored else raw).reshape(torch_shape(tensor))  # BF16 arrives as uint8
    if stored == dtype:
        return view
    out = view.to(dtype)
    release_pages(path, view.data_ptr(), view.nbytes)
    return out
