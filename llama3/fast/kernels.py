"""CPU kernels for what model.py's block calls, as PyTorch operators (`kernels.cpp`, `torch.ops.llama3`).

Why: decoding one token of SmolLM2-135M on a 2-core CPU is ~211 small matrix-vector
products and a few hundred tiny operations around them.  PyTorch's own kernels for
the products are built for matrices (int8/int4 weight-only kernels, oneDNN bf16) and
the readable RoPE, norm and grouped-query attention are several calls each.  These
kernels do each step in one call, reading weights and the KV cache where they lie:

    matvec           y = x Wᵀ for a few rows (fp32, bf16, int8 rows, PyTorch's packed int4 layout)
    dequantize_int4  a packed int4 matrix widened to bf16, for prompts (one bf16 GEMM beats the int4 kernel)
    dequantize_int8  an int8-groups matrix (with or without offsets) widened to bf16 in one pass, for prompts
    rms_norm         RMSNorm in one pass, rounded as model.py rounds
    rope             model.py's `apply_rope` in one pass
    silu_mul         SwiGLU's silu(gate) * up in one pass (FeedForward.kernel)
    attend           one query row per sequence over the cache in place, key/value heads shared without copies
    store_attend     a recorded step's layer over a KVCache: the new key/value written at the slot, then
                     `attend` over slots 0..slot (cache_attend.cpp; graph.py's `_Slots.attend`)
    thread_stats     the thread pool's counters (threads.h: chunks claimed one at a time, so a busy
                     machine's pre-empted thread costs little; `thread_stats()` below)
    dpbf16           whether the build multiplies a bf16 x by bf16 weights as they are (AVX512_BF16)

They know nothing of a Llama block: model.py calls them through the slots `plan.py`
fills (`RMSNorm.kernel`, `FeedForward.kernel`, `Attention.rope_kernel`, `Attention.attention_kernel`) and through
the linear modules (`llama3.fast.linear`).  Each slot function below hands shapes it does
not cover (prompts, gradients, other devices) to model.py's own function, so a missing
kernel is never a wrong answer.

Built on first use with PyTorch's extension tooling (`torch.utils.cpp_extension.load`:
the machine's C++ compiler and ninja, ~20 s once) into ~/.cache/llama3 (or
$LLAMA3_CACHE), keyed by the source, the flags and the CPU.  No compiler, or
LLAMA3_NATIVE=0, and `library()` is None: the plan then uses PyTorch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

import torch

from llama3 import model as readable

SOURCE = Path(__file__).with_name("kernels.cpp")
# Every C++ file of the extension (one library, one thread pool: threads.h/.cpp); kernels added
# beside ours go in this list.
SOURCES = [SOURCE, Path(__file__).with_name("threads.cpp"),
           Path(__file__).with_name("paged_attention.cpp"),  # the engine's attention over its KV blocks
           Path(__file__).with_name("cache_attend.cpp")]  # a recorded step's store + attend over a KVCache
HEADERS = [Path(__file__).with_name("threads.h"), Path(__file__).with_name("softmax.h"),
           Path(__file__).with_name("attend_core.h")]  # attend and paged_attend's one loop
# -fopenmp: `#pragma omp simd` loops, and at::get_num_threads (the pool's thread count, threads.h)
# answers what torch.set_num_threads set.  The kernels split work with their own pool (threads.cpp),
# not at::parallel_for: an OpenMP region waits for every thread it starts, a pre-empted one too.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
F32, BF16, INT8, INT4 = 0, 1, 2, 3
INT8_GROUP = 4  # int8 with a float16 scale (and optional offset) per group of 32 weights (fast/quantize.py)
FEW_ROWS = 32  # up to this many token rows (decoding, a batch of sequences) the C++ passes run

_namespaces: dict[bool, str] = {}
_build_errors: dict[bool, str] = {}
_lock = threading.Lock()


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("LLAMA3_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llama3")
    return Path(root)


def library(plain: bool = False):
    """The kernels' operator namespace (`torch.ops.llama3`), built on first use; None where they
    cannot be (no compiler, LLAMA3_NATIVE=0): `build_error()` says why.  plain=True builds the
    plain-C++ loops instead of the AVX-512 ones, as `torch.ops.llama3_plain` (tests check both)."""
    with _lock:
        if plain not in _namespaces and plain not in _build_errors:
            if os.environ.get("LLAMA3_NATIVE", "1") == "0":
                _build_errors[plain] = "disabled by LLAMA3_NATIVE=0"
            else:
                result = _build(plain)
                (_namespaces if result.startswith("llama3") else _build_errors)[plain] = result
    name = _namespaces.get(plain)
    return None if name is None else getattr(torch.ops, name)


def build_error(plain: bool = False) -> str | None:
    """Why `library()` returned None (None if it built or was not tried)."""
    return _build_errors.get(plain)


def _build(plain: bool) -> str:
    """Compile (unless already in the cache) and load; returns the namespace, or what went wrong."""
    import shutil

    from torch.utils import cpp_extension

    namespace = "llama3_plain" if plain else "llama3"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) on PATH"
    if shutil.which("ninja") is None and importlib_missing("ninja"):
        return "no ninja (pip install ninja) for torch.utils.cpp_extension"
    flags = FLAGS + [f"-DLLAMA3_NS={namespace}"] + (["-DLLAMA3_PLAIN_C"] if plain else [])
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join([*flags, torch.__version__, _cpu_signature()]).encode())
    name = f"{namespace}_kernels_{key.hexdigest()[:12]}"
    build_dir = _cache_dir() / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name, [str(p) for p in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           extra_include_paths=[str(SOURCE.parent)], build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
    except Exception as e:  # a compiler error, a missing header, a damaged cache: the plan falls back
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        return f"could not build {', '.join(p.name for p in SOURCES)}: {last}"
    return namespace


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


# ----------------------------------------------------------- the slots model.py calls
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.kernel`: one pass in C++ for decoding's few rows on the CPU (what it saves is call
    overhead); prompts through PyTorch's F.rms_norm (faster on many rows: measured, prefill
    0.9x with the C++ pass), gradients through model.py's formula."""
    if x.requires_grad and torch.is_grad_enabled():
        return readable.rms_norm(x, weight, eps)
    if x.device.type == "cpu" and x.numel() <= FEW_ROWS * x.shape[-1]:
        return torch.ops.llama3.rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.kernel` without our C++: PyTorch's `F.rms_norm` (float32 inside, rounded once to
    x's dtype, as model.py does: the same numbers, bit for bit on bf16) times the weight."""
    return weight * torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`FeedForward.kernel`: silu(gate) * up in one C++ pass for decoding's few rows on the CPU
    (one operator instead of two, no [B, T, F] temporary); prompts and gradients through
    model.py's `silu_mul`."""
    if (gate.device.type == "cpu" and gate.numel() <= FEW_ROWS * gate.shape[-1] and gate.dtype == up.dtype
            and gate.dtype in (torch.float32, torch.bfloat16) and gate.shape == up.shape
            and not ((gate.requires_grad or up.requires_grad) and torch.is_grad_enabled())):
        return torch.ops.llama3.silu_mul(gate, up)
    return readable.silu_mul(gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`Attention.rope_kernel`: model.py's `apply_rope` in one C++ pass for decoding's few rows on
    the CPU; prompts and gradients through `apply_rope` itself."""
    if x.device.type == "cpu" and x.shape[1] * x.shape[0] <= FEW_ROWS and not (x.requires_grad and torch.is_grad_enabled()):
        return torch.ops.llama3.rope(x, cos, sin)
    return readable.apply_rope(x, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`Attention.attention_kernel`: one new query row per sequence on the CPU reads the cache's
    keys and values where they lie (the views `cache.update` returns); everything else goes to
    model.py's `fused_attention`.  q [B, H, T, Dh]; k, v [B, Hkv, S, Dh]; mask None or bool
    [B or 1, 1, T, S]."""
    if (q.shape[2] == 1 and q.device.type == "cpu" and k.dtype in (torch.float32, torch.bfloat16)
            and not (q.requires_grad and torch.is_grad_enabled())
            and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1))):
        # the mask as it comes, [B or 1, 1, 1, S]: the kernel reads its rows as [B or 1, S] (no
        # per-layer slicing in a recorded step: graph.py's masks are one tensor for every layer)
        if mask is None or (mask.shape[0] in (1, q.shape[0]) and mask.shape[3] == k.shape[2]):
            return torch.ops.llama3.attend(q, k, v, mask)
    return readable.fused_attention(q, k, v, mask)


THREAD_STATS = ("jobs", "shared_jobs", "worker_chunks", "losses", "solo_jobs", "lost_seconds")


def thread_stats(reset: bool = False, build: bool = True) -> dict[str, float] | None:
    """The kernels' thread pool counters (threads.h): jobs run, jobs offered to workers, chunks
    workers ran, losses (the caller waited long for a worker that was not running), jobs run on
    the caller alone after losses, seconds lost.  None without the C++ kernels (build=False: None
    unless they are loaded already, so asking never compiles them)."""
    if not build and False not in _namespaces:  # the AVX-512 build (plain=False) is not loaded yet
        return None
    lib = library()
    if lib is None:
        return None
    values = lib.thread_stats(reset)
    return {name: (value if name == "lost_seconds" else int(value)) for name, value in zip(THREAD_STATS, values)}


def matvec(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, kind: int, n: int,
           namespace=None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ through the C++ kernel: x [..., K] float32/bfloat16 -> [..., N] in x's dtype
    (offsets: INT8_GROUP's per-group offsets, or None)."""
    return (namespace or torch.ops.llama3).matvec(x, weight, scales, kind, n, offsets)
