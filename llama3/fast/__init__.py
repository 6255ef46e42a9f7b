"""Speed, beside the readable model: applied after loading, from outside model.py.

    fuse.py       q/k/v and gate/up projections stacked into one matmul each; RMSNorm as one kernel
    decode.py     a lean one-token decoding step (RoPE as a complex multiply, GQA without copies)
    quantize.py   weight-only int8 linears with per-row scales
    packed.py     bf16 linears packed once for oneDNN's CPU kernels
    int4.py       weight-only int4 linears, 32-weight groups (the Q4_1 scheme of the embedded model)
    gguf_quantized.py  a GGUF file straight to int8/int4 (Q8_0/Q4_x blocks never become float matrices)
    compile.py    torch.compile of the forward (opt-in: compiling takes minutes on a small CPU)
    native.c/.py  the whole one-token step in C (CPU): compiled on first use, read via ctypes
    static.py     greedy decoding with a fixed-address KV cache, compiled into one CUDA graph
    measure.py    prefill / time-to-first-token / decode speed and peak memory

Each transformation keeps the model's forward signature, so the generation
engine, perplexity and the benchmarks use a transformed model unchanged.
"""

from __future__ import annotations

from torch import nn

QUANTIZATIONS = ("int8", "int4")


def speed_up(model: nn.Module, quantize: str | None = None, fuse: bool = True, pack: bool = True,
             native: bool = True) -> nn.Module:
    """Apply the inference speed-ups in place; returns the model.

    fuse: stack q/k/v and gate/up, RMSNorm as one kernel, and decode one token at a
          time through the lean step (`decode.py`); the same numbers up to float rounding.
    quantize: None (keep the float weights), "int8" (weight-only, per-row scales) or "int4"
          (weight-only, a scale and offset per 32 weights; CPU only; the head stays bf16).
    native: with fuse, on the CPU, decode one token per sequence through the C step (`native.py`;
          compiled on first use, skipped where no C compiler is found).  It reads the
          weights in place, so bfloat16 linears are then not packed for oneDNN.
    With fuse and pack (and no native step), bfloat16 linears on a CPU with bf16 instructions
    are packed for oneDNN (bit-identical results; torch.compile cannot lower them, so compiling
    callers pass pack=False).  fuse=False with quantize=None changes nothing.
    The model keeps its forward signature; it is meant for inference (fused, packed and
    int8 weights do not train).
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
    elif quantize == "int4":
        from llama3.fast.int4 import quantize_int4

        quantize_int4(model)
    from llama3.fast import native as c_step

    native = native and fuse and model.norm.weight.device.type == "cpu" and c_step.library() is not None
    if fuse and pack and quantize is None and not native:
        from llama3.fast.packed import pack_linears

        pack_linears(model)
    from llama3.fast.int4 import Int4Linear

    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack()  # now, not on the first token
    if fuse:
        from llama3.fast.decode import use_decoding_step

        use_decoding_step(model)
        model.native_step = c_step.native_step(model) if native else None
    return model


def load_fast(source=None, dtype=None, quantize: str | None = None, fuse: bool = True, compile: bool = False,
              device=None):
    """`llama3.load(source, dtype=dtype, device=device)` then `speed_up`; returns the LLM.

    int8/int4 from a .gguf file is read by `load_gguf_quantized`: Q8_0 blocks go straight
    to int8 rows and Q4_0/Q4_1 blocks to int4 groups, without a float copy of the weights.  compile=True wraps
    the model in torch.compile (see compile.py: minutes of compiling on first use).
    """
    import llama3
    from llama3.errors import Llama3Error
    from llama3.llm import DEFAULT_MODEL, parse_device, parse_dtype, resolve_source

    if quantize not in (None, *QUANTIZATIONS):
        raise Llama3Error(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    if quantize == "int4" and device is not None and parse_device(device).type != "cpu":
        raise Llama3Error("int4 weights run on the CPU only; on an accelerator use --quantize int8 or --dtype bfloat16")
    path = resolve_source(source)
    if quantize and path.lower().endswith(".gguf"):
        from llama3.fast.gguf_quantized import load_gguf_quantized

        llm = load_gguf_quantized(path, quantize, parse_dtype(dtype))
        llm.source = str(source) if source is not None else DEFAULT_MODEL
        if device is not None:
            llm.model.to(parse_device(device))
        quantize = None  # already quantized
    else:
        llm = llama3.load(source, dtype=dtype, device=device)
    speed_up(llm.model, quantize, fuse, pack=not compile, native=not compile)  # inductor cannot trace C
    if compile:
        from llama3.fast.compile import compile_model

        llm.model = compile_model(llm.model)
    return llm
