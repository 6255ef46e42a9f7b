"""Speed, beside the readable model: kernels that model.py's block calls, chosen once and swapped in.

    plan.py       the decoding plan: which kernels, chosen once per device/dtype, applied with setattr
    kernels.cpp/.py  C++ kernels as PyTorch operators: matvec (fp32/bf16/int8/int4), rms_norm, rope,
                  attention over the KV cache in place (built with torch.utils.cpp_extension)
    fuse.py       q/k/v and gate/up projections stacked into one matmul each
    quantize.py   weight-only int8 linears, a float16 scale per 32 weights (GGUF's Q8_0)
    packed.py     bf16 linears packed once for oneDNN's CPU kernels (where the C++ kernels are not)
    int4.py       weight-only int4 linears, 32-weight groups (the Q4_1 scheme of the embedded model)
    gguf_quantized.py  a GGUF file straight to int8/int4 (Q8_0/Q4_x blocks never become float matrices)
    compile.py    torch.compile of the forward (opt-in: compiling takes minutes on a small CPU)
    cuda_decode.py  CUDA: the engine's decoding steps padded to batch buckets and replayed as CUDA
                  graphs; every row's token sampled on the device (chosen by the plan on CUDA)
    static.py     greedy decoding with a fixed-address KV cache, compiled into one CUDA graph (a benchmark)
    measure.py    prefill / time-to-first-token / decode speed and peak memory

The forward is always model.py's: prompts, one-token decoding, batches, training and
tracing run `Transformer.forward`, which calls what the plan put in its slots.
"""

from __future__ import annotations

from torch import nn

QUANTIZATIONS = ("int8", "int4")


def speed_up(model: nn.Module, quantize: str | None = None, fuse: bool = True, pack: bool = True,
             native: bool = True) -> nn.Module:
    """Choose the decoding plan for `model` and apply it in place (`plan.py`); returns the model.

    fuse: stack q/k/v and gate/up (same numbers up to float rounding).
    quantize: None (keep the float weights), "int8" (weight-only, a scale per 32 weights) or "int4"
          (weight-only, a scale and offset per 32 weights; CPU only; the head stays bf16).
    native: on the CPU, the C++ kernels (`kernels.py`; built on first use, skipped where no
          compiler is found): decoding's matrix-vector products, RMSNorm, RoPE and attention
          over the cache each one call.
    pack: bfloat16 linears packed for oneDNN where the C++ kernels are not used (torch.compile
          cannot lower them, so compiling callers pass pack=False).
    The model keeps model.py's forward; fused and quantized weights are for inference.
    """
    from llama3.errors import Llama3Error
    from llama3.fast.plan import apply_plan, choose_plan

    if quantize not in (None, *QUANTIZATIONS):
        raise Llama3Error(f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    return apply_plan(model, choose_plan(model, quantize, fuse, native, pack))


def load_fast(source=None, dtype=None, quantize: str | None = None, fuse: bool = True, compile: bool = False,
              device=None):
    """`llama3.load(source, dtype=dtype, device=device, plain=True)` then the decoding plan for
    `quantize` and `fuse` (`llm.plan`, applied); returns the LLM.  fuse=False with no quantize
    is the readable path (`--plain`).

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
    path, already = resolve_source(source), None
    if quantize and path.lower().endswith(".gguf"):
        from llama3.fast.gguf_quantized import load_gguf_quantized

        llm = load_gguf_quantized(path, quantize, parse_dtype(dtype))
        llm.source = str(source) if source is not None else DEFAULT_MODEL
        if device is not None:
            llm.model.to(parse_device(device))
        already, quantize = quantize, None  # already quantized
    elif quantize is None and not fuse:  # --plain: model.py's own functions, PyTorch's kernels
        return llama3.load(source, dtype=dtype, device=device, plain=True)
    else:
        llm = llama3.load(source, dtype=dtype, device=device, plain=True)
    import dataclasses

    from llama3.fast.plan import apply_plan, choose_plan

    # --plain (fuse=False) keeps PyTorch's kernels; torch.compile's inductor cannot trace the C++ ones
    plan = choose_plan(llm.model, quantize, fuse, native=fuse and not compile, pack=not compile)
    apply_plan(llm.model, plan)
    llm.plan = dataclasses.replace(plan, quantize=already or quantize)
    if compile:
        from llama3.fast.compile import compile_model

        llm.model = compile_model(llm.model)
    return llm
