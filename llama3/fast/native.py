"""The one-token decoding step in C (`native.c`), on the CPU.

Why: on a 2-core CPU, PyTorch spends ~8 ms of a SmolLM2-135M token on the ~25 small
operations around each block's four matrix products (norms, RoPE, cache writes,
attention, SwiGLU, residual adds: 30 blocks x 25 calls x a few microseconds of Python
and dispatch each), as long as the int8 products themselves.  `native.c` runs the
whole step (every block and the head) as one call into C, inside one OpenMP parallel
region, reading the weights where the Python model already holds them:

    float32 / bfloat16 nn.Linear, Int8Linear, Int4Linear (PyTorch's packed int4 layout),
    the int4 model's bfloat16 head.

It computes the same thing as `decode_step` (`decode.py`), which stays the readable
reference and the path for everything else: prompts, training, CUDA, packed bfloat16.
Batches are taken whole (each block of weights read once for all rows), with the
per-row positions and padding mask of a left-padded batch.

The C file is compiled on first use with the machine's C compiler (`cc -O3
-march=native -fopenmp`, ~2 s) into ~/.cache/llama3 (or $LLAMA3_CACHE), keyed by the
source, the flags and the CPU, then loaded with ctypes.  No compiler, or
LLAMA3_NATIVE=0, and the Python step is used instead: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared"]
F32, BF16, INT8, INT4 = 0, 1, 2, 3


class Matrix(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("wqkv", Matrix), ("wo", Matrix), ("w13", Matrix), ("w2", Matrix)]


class Model(ctypes.Structure):
    _fields_ = [("dim", ctypes.c_int), ("n_layers", ctypes.c_int), ("n_heads", ctypes.c_int),
                ("n_kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int), ("hidden", ctypes.c_int),
                ("vocab", ctypes.c_int), ("threads", ctypes.c_int), ("eps", ctypes.c_float),
                ("layers", ctypes.POINTER(Layer)), ("norm", ctypes.c_void_p), ("head", Matrix)]


class Scratch(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("xb", "att", "qkv", "proj", "gate_up", "hidden", "scores")]


# --------------------------------------------------------------------------- building
def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("LLAMA3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama3")
    return Path(root)


_libraries: dict[bool, object] = {}
_build_errors: dict[bool, str] = {}


def library(plain: bool = False):
    """The compiled step as a ctypes library, built on first use; None where it cannot be
    (no C compiler, LLAMA3_NATIVE=0); `build_error()` says why.  plain=True builds the
    plain-C kernels instead of the AVX-512 ones (the tests check both against PyTorch)."""
    if plain in _libraries or plain in _build_errors:
        return _libraries.get(plain)
    if os.environ.get("LLAMA3_NATIVE", "1") == "0":
        _build_errors[plain] = "disabled by LLAMA3_NATIVE=0"
        return None
    lib = _build(plain)
    if isinstance(lib, str):
        _build_errors[plain] = lib
        return None
    _libraries[plain] = lib
    return lib


def build_error(plain: bool = False) -> str | None:
    """Why `library()` returned None (None if it built or was not tried)."""
    return _build_errors.get(plain)


class _CompileFailed(Exception):
    pass


def _build(plain: bool):
    """Compile (unless already in the cache) and load; a string says what went wrong."""
    from llama3.checkpoint.files import atomic_file

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (cc) on PATH"
    flags = FLAGS + (["-DLLAMA3_PLAIN_C"] if plain else [])
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags, _cpu_signature()]).encode())
    target = _cache_dir() / f"native-{key.hexdigest()[:16]}.so"

    def compile_into_cache():
        with atomic_file(target) as tmp:  # built aside, renamed in only if the compiler succeeded
            run = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp), "-lm"],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode != 0:
                last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
                raise _CompileFailed(f"{compiler} could not compile {SOURCE.name}: {last}")

    try:
        if not target.exists():
            compile_into_cache()
        try:
            lib = ctypes.CDLL(str(target))  # CDLL releases the GIL during calls
        except OSError:  # a cached file that does not load (truncated, damaged): build it again, once
            target.unlink(missing_ok=True)
            compile_into_cache()
            lib = ctypes.CDLL(str(target))
    except _CompileFailed as e:
        return str(e)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not build or load {SOURCE.name}: {e}"
    lib.llama3_decode_step.restype = None
    lib.llama3_decode_step.argtypes = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(Scratch),
                                       ctypes.c_void_p]
    lib.llama3_dequantize_int4.restype = None
    lib.llama3_dequantize_int4.argtypes = [ctypes.POINTER(Matrix), ctypes.c_void_p, ctypes.c_int]
    lib.llama3_matvec.restype = None
    lib.llama3_matvec.argtypes = [ctypes.POINTER(Matrix), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_int]
    return lib


# --------------------------------------------------------------------------- weights
def describe(linear: nn.Module) -> tuple[Matrix, list[torch.Tensor]] | None:
    """A C view of one linear's weights (and the tensors it points into, to keep alive),
    or None for a kind the C step does not read (e.g. oneDNN-packed bf16)."""
    described = _describe(linear)
    if described is None or described[0].k % 16:  # the SIMD kernels step through rows 16 columns at a time
        return None
    return described


def _describe(linear: nn.Module) -> tuple[Matrix, list[torch.Tensor]] | None:
    from llama3.fast.int4 import Bf16Head, Int4Linear
    from llama3.fast.quantize import Int8Linear

    if isinstance(linear, Bf16Head):
        weight = linear.table
        return Matrix(BF16, weight.shape[0], weight.shape[1], weight.data_ptr(), None), [weight]
    if type(linear) is nn.Linear and linear.bias is None:
        weight = linear.weight.detach()
        kind = {torch.float32: F32, torch.bfloat16: BF16}.get(weight.dtype)
        if kind is None or weight.device.type != "cpu" or not weight.is_contiguous():
            return None
        return Matrix(kind, weight.shape[0], weight.shape[1], weight.data_ptr(), None), [weight]
    if isinstance(linear, Int8Linear):
        weight, scales = linear.weight, linear.scales.float().contiguous()
        if weight.device.type != "cpu" or not weight.is_contiguous():
            return None
        return Matrix(INT8, weight.shape[0], weight.shape[1], weight.data_ptr(), scales.data_ptr()), [weight, scales]
    if isinstance(linear, Int4Linear) and linear.out_features % 64 == 0:
        linear.pack()
        packed, scales = linear.packed, linear.scales_and_zeros
        return Matrix(INT4, linear.out_features, linear.in_features, packed.data_ptr(), scales.data_ptr()), \
            [packed, scales]
    return None


def dequantize_int4(linear: nn.Module) -> torch.Tensor | None:
    """A packed Int4Linear's matrix as bfloat16 [N, K], in C (~0.1 ms for 3072 x 576; PyTorch
    operations take ~3 ms); None where the C library or the layout is not available."""
    lib = library()
    described = describe(linear) if lib is not None else None
    if described is None or described[0].kind != INT4:
        return None
    matrix, _ = described
    out = torch.empty(matrix.n, matrix.k, dtype=torch.bfloat16)
    lib.llama3_dequantize_int4(ctypes.byref(matrix), out.data_ptr(), torch.get_num_threads())
    return out


def _no_native_step():
    return None


def _fingerprint(model: nn.Module) -> tuple[int, ...]:
    """Where some of the model's parameters live: `model.to(...)` moves them all."""
    return tuple(p.data_ptr() for p in (model.norm.weight, model.layers[0].attention_norm.weight,
                                        model.layers[-1].ffn_norm.weight))


class NativeStep:
    """The C decoding step bound to one model's weights; `native_step(model)` makes one.

    It holds raw pointers into the model's tensors (and references that keep them alive).
    If the model's parameters are replaced (`model.to(...)`), `supports` says no and the
    Python step decodes; copies and pickles of the model carry no C step (`copy.deepcopy`
    of a sped-up model decodes in Python until `speed_up` is applied to the copy)."""

    def __init__(self, model: nn.Module, lib, layers: list[Layer], final_norm: int, head: Matrix,
                 keep: list[torch.Tensor]):
        config = model.config
        self.lib, self.model, self.keep = lib, model, keep
        self.fingerprint = _fingerprint(model)
        self.lock = threading.Lock()  # one scratch area: one caller at a time
        self.layers = (Layer * len(layers))(*layers)
        self.struct = Model(config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim,
                            config.hidden_dim, config.vocab_size, 1, config.norm_eps,
                            self.layers, final_norm, head)
        self.row_sizes = {"xb": config.dim, "att": config.n_heads * config.head_dim,  # floats per batch row
                          "qkv": (config.n_heads + 2 * config.n_kv_heads) * config.head_dim,
                          "proj": config.dim, "gate_up": 2 * config.hidden_dim, "hidden": config.hidden_dim}
        self.scratch_for = (0, 0)

    def _scratch(self, batch: int, max_len: int) -> Scratch:
        if batch > self.scratch_for[0] or max_len > self.scratch_for[1]:  # grown for bigger batches / caches
            batch, max_len = max(batch, self.scratch_for[0]), max(max_len, self.scratch_for[1])
            sizes = {name: batch * size for name, size in self.row_sizes.items()}
            sizes["scores"] = self.model.config.n_heads * max_len
            self.tensors = {name: torch.empty(sizes[name], dtype=torch.float32) for name, _ in Scratch._fields_}
            self.scratch = Scratch(*(t.data_ptr() for t in self.tensors.values()))
            self.scratch_for = (batch, max_len)
        return self.scratch

    def __reduce_ex__(self, protocol):  # the pointers are only good for this model's tensors
        return (_no_native_step, ())

    def supports(self, tokens: torch.Tensor, start_pos: int, cache, mask) -> bool:
        """One new token per row on the CPU, a float32/bfloat16 cache laid out as KVCache makes
        it, a mask (if any) of one query row per sequence, [B or 1, 1, 1, >= start_pos + 1], and
        the model's parameters still the tensors this step points into."""
        k = cache.k
        return (tokens.dim() == 2 and tokens.shape[1] == 1 and tokens.shape[0] <= k.shape[1]
                and tokens.device.type == k.device.type == "cpu"
                and k.dtype in (torch.float32, torch.bfloat16) and k.is_contiguous() and cache.v.is_contiguous()
                and (mask is None or (mask.dim() == 4 and mask.shape[0] in (1, tokens.shape[0])
                                      and mask.shape[1:3] == (1, 1) and mask.shape[3] > start_pos))
                and _fingerprint(self.model) == self.fingerprint)

    def __call__(self, tokens: torch.Tensor, start_pos: int, cache, positions: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
        """tokens [B, 1] at cache slot start_pos -> logits [B, 1, V] float32 (as `decode_step`).
        positions: None or [B, 1]; mask: None or bool [B or 1, 1, 1, S >= start_pos + 1]."""
        if start_pos >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked to write up to {start_pos + 1}")
        model, batch = self.model, tokens.shape[0]
        if positions is None:
            positions = torch.full((batch, 1), start_pos)
        cos, sin = model.rope(positions.reshape(-1, 1).expand(batch, 1))    # [B, 1, Dh/2]
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        x = model.tok_embeddings(tokens).float().contiguous()               # [B, 1, D], overwritten by C
        visible = None
        if mask is not None:                                                # [B, S]: 1 = may attend
            visible = mask[:, 0, 0, :start_pos + 1].expand(batch, -1).to(torch.uint8).contiguous()
        logits = torch.empty(batch, 1, model.config.vocab_size)
        with self.lock:
            self.struct.threads = torch.get_num_threads()
            self.lib.llama3_decode_step(ctypes.byref(self.struct), x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                        start_pos, cache.k.data_ptr(), cache.v.data_ptr(),
                                        int(cache.k.dtype == torch.bfloat16), cache.max_len, batch, cache.k.shape[1],
                                        None if visible is None else visible.data_ptr(),
                                        ctypes.byref(self._scratch(batch, cache.max_len)), logits.data_ptr())
        return logits


def native_step(model: nn.Module, plain: bool = False) -> NativeStep | None:
    """The C step for `model` (fused projections, CPU weights of kinds `describe` reads),
    or None where it does not apply or the C library cannot be built."""
    from llama3.fast.fuse import is_fused

    if model.norm.weight.device.type != "cpu" or not is_fused(model):
        return None
    keep: list[torch.Tensor] = []

    def view(linear):
        described = describe(linear)
        if described is None:
            raise LookupError
        matrix, tensors = described
        keep.extend(tensors)
        return matrix

    def norm(module):
        weight = module.weight.detach().float().contiguous()
        keep.append(weight)
        return weight.data_ptr()

    try:
        layers = [Layer(norm(b.attention_norm), norm(b.ffn_norm), view(b.attention.wqkv), view(b.attention.wo),
                        view(b.feed_forward.w13), view(b.feed_forward.w2)) for b in model.layers]
        final_norm, head = norm(model.norm), view(model.output)
    except LookupError:
        return None
    lib = library(plain)
    if lib is None:
        return None
    return NativeStep(model, lib, layers, final_norm, head, keep)
