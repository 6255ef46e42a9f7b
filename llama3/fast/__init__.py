"""Speed, beside the readable model: applied after loading, from outside model.py.

    fuse.py       q/k/v and gate/up projections stacked into one matmul each; RMSNorm as one kernel
    quantize.py   weight-only int8 linears with per-row scales
    gguf_int8.py  a GGUF file straight to int8 (Q8_0 blocks never become float matrices)
    compile.py    torch.compile of the forward (opt-in: compiling takes minutes on a small CPU)
    measure.py    prefill / time-to-first-token / decode speed and peak memory

Each transformation keeps the model's forward signature, so the generation
engine, perplexity and the benchmarks use a transformed model unchanged.
"""

from __future__ import annotations

from torch import nn

QUANTIZATIONS = ("int8",)


def speed_up(model: nn.Module, quantize: str | None = None, fuse: bool = True) -> nn.Module:
    """Apply the inference speed-ups in place: fuse projections, then (optionally) quantize.

    quantize: None (keep the float weights) or "int8" (weight-only, per-row scales).
    The model keeps its forward signature; it is meant for inference (fused weights
    do not train).  Returns the model.
    """
    from llama3.errors import Llama3Error

    if quantize not in (None, *QUANTIZATIONS):
        raise Llama3Error(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if fuse:
        from llama3.fast.fuse import fuse_norms, fuse_projections

        fuse_projections(model)
        fuse_norms(model)
    if quantize == "int8":
        from llama3.fast.quantize import quantize_int8

        quantize_int8(model)
    return model


def load_fast(source=None, dtype=None, quantize: str | None = None, fuse: bool = True, compile: bool = False):
    """`llama3.load(source, dtype=dtype)` then `speed_up`; returns the LLM.

    int8 from a .gguf file is read by `load_gguf_int8`: Q8_0 blocks go straight to
    int8 rows, without a float copy of the weights in memory.  compile=True wraps
    the model in torch.compile (see compile.py: minutes of compiling on first use).
    """
    import llama3
    from llama3.errors import Llama3Error
    from llama3.llm import DEFAULT_MODEL, parse_dtype, resolve_source

    if quantize not in (None, *QUANTIZATIONS):
        raise Llama3Error(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    path = resolve_source(source)
    if quantize == "int8" and path.lower().endswith(".gguf"):
        from llama3.fast.gguf_int8 import load_gguf_int8

        llm = load_gguf_int8(path, parse_dtype(dtype))
        llm.source = str(source) if source is not None else DEFAULT_MODEL
        quantize = None  # already int8
    else:
        llm = llama3.load(source, dtype=dtype)
    speed_up(llm.model, quantize, fuse)
    if compile:
        from llama3.fast.compile import compile_model

        llm.model = compile_model(llm.model)
    return llm
