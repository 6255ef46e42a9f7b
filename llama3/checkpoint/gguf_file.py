"""The one GGUF reader: header, metadata, tensor list and block codecs, with one error type.

Used by the checkpoint loader (`checkpoint/gguf.py`), the tokenizer (`tokenizer/gguf_vocab.py`,
metadata only) and the quantized loaders (`fast/gguf_quantized.py`, which read the blocks).
The block layouts the quantized loaders run as they are (Q8_0, Q4_0, Q4_1: integers and fp16
scales) are decoded by this module's sibling `gguf_blocks.py`; `dequantize` here turns any
type into float.

Layout (ggml/docs/gguf.md), little-endian throughout:

    b"GGUF", uint32 version (2 or 3), uint64 tensor count, uint64 key count
    per key:     string key, uint32 value type, value
                 (strings: uint64 length + UTF-8 bytes; arrays: uint32 item type, uint64 length, items)
    per tensor:  string name, uint32 n_dims, uint64 dims[n_dims] (row length first),
                 uint32 ggml type, uint64 offset (from the start of the data section)
    padding to `general.alignment` (default 32), then the data section

Every length, count and offset is checked against the bytes of the file before anything is
read or allocated: tensor data must be aligned, inside the file and not overlapping.

Our own parser rather than `gguf.GGUFReader`: that one builds a numpy view for every string
of the vocabulary, ~3 s and ~160 MB for SmolLM2's 49,152 tokens and 48,900 merges on every
load (measured); this one reads the header once into Python values and maps the data.
Dequantizing the block types is the `gguf` package's (`gguf.quants.dequantize`).
"""

from __future__ import annotations

import math
import mmap
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


class _Cursor:
    """Reads GGUF values from a buffer (the memory-mapped file) at a moving position; every
    length is checked against the bytes left before anything is read or allocated, so a
    hostile length is an error instead of a MemoryError or a gigabyte-long read."""

    def __init__(self, buf, path, pos: int = 0):
        self.buf, self.path, self.pos, self.size = buf, path, pos, len(buf)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise invalid(self.path, f"{what} needs {n} bytes but only {self.size - self.pos} are left")

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n, "a value")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.need(n, f"a string of {n} bytes")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise invalid(self.path, f"arrays nested more than {_MAX_ARRAY_DEPTH} deep")
            item_kind, n = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALARS:  # numbers: one read for the whole array
                fmt = _SCALARS[item_kind]
                self.need(n * struct.calcsize(fmt), f"an array of {n} numbers")
                values = struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos)
                self.pos += n * struct.calcsize(fmt)
                return list(values)
            # every string or array item takes at least 8 bytes (its length)
            self.need(n * 8, f"an array of {n} items")
            return [self.value(item_kind, depth + 1) for _ in range(n)]
        raise invalid(self.path, f"unknown metadata value type {kind}")


_MAX_ARRAY_DEPTH = 2  # the spec allows arrays of arrays; no real file nests deeper


def _read_header(buf, path) -> tuple[_Cursor, int, dict]:
    """(cursor just after the metadata, tensor count, metadata) of a GGUF file's bytes."""
    if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
        raise invalid(path, "no GGUF magic number" if bytes(buf[:4]) != b"GGUF" else "truncated inside its header")
    cursor = _Cursor(buf, path, 4)
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise invalid(path, f"GGUF version {version}; versions 2 and 3 are supported")
    n_tensors, n_keys = cursor.scalar("<Q"), cursor.scalar("<Q")
    if n_keys > (cursor.size - cursor.pos) // 13:  # a key takes at least 8 + 1 + 4 bytes
        raise invalid(path, f"it claims {n_keys} metadata keys")
    metadata = {}
    for _ in range(n_keys):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    return cursor, n_tensors, metadata


def _mapped(path: str):
    """The whole file as a read-only mmap (b"" when empty), or GGUFError when it cannot be read."""
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror}") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The key/value metadata of a GGUF file, without reading the tensor list or the weights."""
    return _read_header(_mapped(str(path)), str(path))[2]


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
    and its tensors, in file order; size is the file's length in bytes."""
    metadata: dict
    tensors: list[GGUFTensor]
    size: int = 0


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
    buf = _mapped(path)
    size = len(buf)
    cursor, n_tensors, metadata = _read_header(buf, path)
    if n_tensors > (size - cursor.pos) // 24:  # an entry takes at least 8 + 4 + 8 + 4 + 8 bytes
        raise invalid(path, f"it claims {n_tensors} tensors")
    infos = {}
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise invalid(path, f"tensor {name!r} has {n_dims} dimensions")
        dims = tuple(cursor.scalar("<Q") for _ in range(n_dims))
        kind, offset = cursor.scalar("<I"), cursor.scalar("<Q")
        if name in infos:
            raise invalid(path, f"tensor {name!r} is listed twice")
        infos[name] = (dims, kind, offset)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or not 1 <= alignment <= 1 << 20 or alignment & (alignment - 1):
        raise invalid(path, f"general.alignment = {alignment!r} is not a power of two")
    start = -(-cursor.pos // alignment) * alignment  # tensor data begins at the next aligned byte
    extents = []
    for name, (dims, kind, offset) in infos.items():
        try:
            tensor_type = gguf.GGMLQuantizationType(kind)
            block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        except (ValueError, KeyError):
            raise invalid(path, f"tensor {name!r} has unknown type {kind}") from None
        if min(dims) < 1 or dims[0] % block:
            raise invalid(path, f"tensor {name!r} has shape {list(dims)}: rows are not whole {block}-value blocks")
        n_bytes = math.prod(dims) // block * block_bytes  # Python ints: no overflow
        if offset % alignment:
            raise invalid(path, f"tensor {name!r} starts at offset {offset}, not a multiple of {alignment}")
        if start + offset + n_bytes > size:
            raise invalid(path, f"tensor {name!r} ends past the end of the file")
        extents.append((offset, offset + n_bytes, name))
    extents.sort()
    for (_, end, first), (begin, _, second) in zip(extents, extents[1:]):
        if begin < end:
            raise invalid(path, f"tensors {first!r} and {second!r} overlap")
    mapped = np.memmap(path, mode=mode) if infos else np.zeros(0, np.uint8)
    tensors = []
    for name, (dims, kind, offset) in infos.items():
        tensor_type = gguf.GGMLQuantizationType(kind)
        block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
        begin = start + offset
        raw = mapped[begin:begin + math.prod(dims) // block * block_bytes]
        if kind in _NUMPY_TYPES:
            data = raw.view(_NUMPY_TYPES[kind]).reshape(tuple(reversed(dims)))
        else:
            data = raw.reshape(*reversed(dims[1:]), dims[0] // block * block_bytes)
        tensors.append(GGUFTensor(name, dims, tensor_type, data))
    return GGUFFile(metadata, tensors, size)


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
TORCH_FLOATS = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16


def to_torch(tensor: GGUFTensor, path: str, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor (of a file opened with mode "c") -> a torch tensor of `dtype`, torch's shape order.

    A float tensor already of `dtype` is a view into the memory-mapped file (no copy);
    another float type is cast by torch; quantized ones go through `dequantize`.
    Whatever is copied has its mapped pages released, so the file is never held twice.
    """
    stored = TORCH_FLOATS.get(int(tensor.tensor_type))
    if stored is None:
        return dequantize(tensor, path, dtype)
    raw = torch.from_numpy(tensor.data)
    view = (raw.view(stored) if raw.dtype != stored else raw).reshape(torch_shape(tensor))  # BF16 arrives as uint8
    if stored == dtype:
        return view
    out = view.to(dtype)
    release_pages(path, view.data_ptr(), view.nbytes)
    return out
