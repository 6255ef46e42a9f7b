"""The C++ matvec (torch.ops.llama3.matvec) at SmolLM2-135M's decoding shapes: GB/s of weight bytes.

    python benchmarks/matvec_speed.py [--kinds int8o,int8g,int8row,f32] [--threads 1,2] [--mode model,hot]
                                      [--reps 20] [--old-lib /tmp/native.so]

Kinds: f32, bf16; int8o / int8g: INT8_GROUP (groups of 32, float16 scales; int8o with float16
offsets, the embedded model's Q4_1 held exactly); int8row: kind INT8 (one float32 scale a row: the
old C step's int8 kernel, the same loop as old046's native.c).  Modes:

    model  one pass over 30 layers' distinct matrices (wqkv [960, 576], wo [576, 576], w13
           [3072, 576], w2 [576, 1536]) and the head [49152, 576], as a decoding step reads them:
           they stream from memory (the int8 model is ~150 MB, the L3 32 MB here)
    hot    one shape repeated: it sits in L2/L3, so this is the kernel's compute rate

Best of --reps passes.  Each call pays PyTorch's dispatch from Python (~4 us a call here, against
~2 us for a torch.add): the `hot` times of small shapes include it.  --old-lib: old046's
native.c built as a shared library (`cc -O3 -march=native -mprefer-vector-width=512 -fopenmp
-fPIC -shared native.c -o native.so`), timed through its `llama3_matvec` (kinds f32 and int8row).
On a shared machine read ratios measured in the same run; other processes change every number.
"""

from __future__ import annotations

import argparse
import ctypes
import os

import torch

from llama3.fast.measure import best_seconds

SHAPES = {"wqkv": (960, 576), "wo": (576, 576), "w13": (3072, 576), "w2": (576, 1536), "head": (49152, 576)}
LAYERS = 30
KIND = {"f32": 0, "bf16": 1, "int8row": 2, "int8g": 4, "int8o": 4}


class Matrix(ctypes.Structure):  # old046 native.c's Matrix
    _fields_ = [("kind", ctypes.c_int), ("n", ctypes.c_int), ("k", ctypes.c_int),
                ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p)]


def make(kind: str, n: int, k: int, g: torch.Generator) -> dict:
    if kind in ("f32", "bf16"):
        w = torch.randn(n, k, generator=g).to(torch.float32 if kind == "f32" else torch.bfloat16)
        return dict(w=w, s=None, o=None, bytes=w.numel() * w.element_size())
    if kind == "int8row":
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        s = torch.rand(n, generator=g)
        return dict(w=w, s=s, o=None, bytes=w.numel() + 4 * n)
    w = torch.randint(0, 16, (n, k), dtype=torch.int8, generator=g)
    s = (torch.rand(n, k // 32, generator=g) * 0.01).half()
    o = (torch.rand(n, k // 32, generator=g) * 0.01).half() if kind == "int8o" else None
    return dict(w=w, s=s, o=o, bytes=w.numel() + 2 * s.numel() * (2 if o is not None else 1))


def caller(kind: str, m: dict, old):
    n, k = m["w"].shape
    if old is not None:
        matrix = Matrix(KIND[kind], n, k, m["w"].data_ptr(), m["s"].data_ptr() if m["s"] is not None else None)
        y = torch.empty(n)
        m["keep"] = (matrix, y)
        return lambda x, threads: old.llama3_matvec(ctypes.byref(matrix), ctypes.c_void_p(x.data_ptr()),
                                                    ctypes.c_void_p(y.data_ptr()), 1, threads)
    ops, code, w, s, o = torch.ops.llama3, KIND[kind], m["w"], m["s"], m["o"]
    return lambda x, threads: ops.matvec(x, w, s, code, n, o)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="int8o,int8g,int8row,f32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--mode", default="model,hot")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--old-lib", default=None, help="old046's native.c as a shared library (f32, int8row)")
    args = ap.parse_args()
    from llama3.fast import kernels
    if kernels.library() is None:
        raise SystemExit(f"no C++ kernels: {kernels.build_error()}")
    old = None
    if args.old_lib:
        old = ctypes.CDLL(args.old_lib)
        old.llama3_matvec.restype = None
    print(f"load {os.getloadavg()[0]:.2f}" + (" (old046's native.c)" if old else ""))
    g = torch.Generator().manual_seed(0)
    threads = [int(t) for t in args.threads.split(",")]
    for kind in args.kinds.split(","):
        if old is not None and kind not in ("f32", "int8row"):
            continue
        for mode in args.mode.split(","):
            if mode == "model":
                shapes = [SHAPES[name] for _ in range(LAYERS) for name in ("wqkv", "wo", "w13", "w2")] + [SHAPES["head"]]
                mats = [make(kind, n, k, g) for n, k in shapes]
                runs = [(caller(kind, m, old), torch.randn(1, m["w"].shape[1])) for m in mats]
                total = sum(m["bytes"] for m in mats)
                for t in threads:
                    torch.set_num_threads(t)
                    best = best_seconds(lambda: [run(x, t) for run, x in runs], args.reps)
                    print(f"{kind:8s} model      t={t}  {best * 1e3:8.2f} ms  {total / best / 1e9:6.2f} GB/s"
                          f"  ({total / 1e6:.0f} MB)", flush=True)
                del runs, mats
            else:
                for name, (n, k) in SHAPES.items():
                    m = make(kind, n, k, g)
                    run, x = caller(kind, m, old), torch.randn(1, k)
                    inner = max(3, int(4e6 / m["bytes"]))
                    for t in threads:
                        torch.set_num_threads(t)
                        best = best_seconds(lambda: [run(x, t) for _ in range(inner)], args.reps) / inner
                        print(f"{kind:8s} hot {name:5s}  t={t}  {best * 1e6:8.1f} us  {m['bytes'] / best / 1e9:6.2f} GB/s",
                              flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
