"""The decoding plan: which kernels model.py's block calls on this device and dtype, chosen once.

    plan = choose_plan(model, quantize="int4")   # DecodingPlan(device, dtype, quantize, fuse, kernels, ...)
    apply_plan(model, plan)                      # swaps them in with setattr; the forward is model.py's

What a plan swaps (every module keeps its class from model.py or a linear's class):

    linears          nn.Linear -> KernelLinear (the same weight; few-row products through the C++
                     matvec), or Int8Linear / Int4Linear / Bf16Head with their C++ matvec on
    wqkv, w13        q/k/v and gate/up stacked (fuse.py), where `fuse`
    RMSNorm.kernel   one C++ pass (or PyTorch's F.rms_norm)      instead of model.py's `rms_norm`
    FeedForward.kernel one C++ pass of silu(gate) * up            instead of model.py's `silu_mul`
    rope_kernel      one C++ pass                                instead of `apply_rope`
    attention_kernel one query row per sequence over the cache in place (C++), else SDPA
    forward          with the C++ kernels, `DecodeGraphs` (graph.py): one-token steps over a KVCache
                     recorded once from model.py's forward and replayed without Python
    packed bf16      oneDNN-packed bf16 linears, only where the C++ kernels are not available

Nothing here computes a block: `Transformer.forward` (model.py) runs prompts, decoding, batches,
training and tracing alike, and calls whatever the plan put in these slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama3.model import Lean

from llama3.fast import kernels
from llama3.fast.quantize import PREFILL_ROWS, Int8Linear


@dataclass(frozen=True)
class DecodingPlan:
    """What runs: device, dtype, quantization, fused projections, and whose kernels."""

    device: str
    dtype: str
    quantize: str | None
    fuse: bool
    kernels: str            # "C++" (llama3/fast/kernels.cpp) or "PyTorch"
    why_not_cpp: str | None = None
    pack_bf16: bool = False
    graph: bool = False     # one-token steps recorded once and replayed without Python (graph.py)
    cuda_graphs: bool = False  # CUDA: the engine's decoding steps padded to buckets, captured as CUDA
                               # graphs, rows sampled on the device (cuda_decode.py)

    def describe(self) -> str:
        parts = [f"{self.device}, {self.dtype}", self.quantize or "float weights",
                 "fused q/k/v and gate/up" if self.fuse else "separate projections",
                 "C++ kernels (llama3/fast/kernels.cpp: matvec, rms_norm, rope, attention over the cache)"
                 if self.kernels == "C++" else "PyTorch kernels" + (f" (no C++ kernels: {self.why_not_cpp})"
                                                                   if self.why_not_cpp else "")]
        if self.pack_bf16:
            parts.append("bf16 linears packed for oneDNN")
        if self.graph:
            parts.append("decoding steps recorded and replayed (llama3/fast/graph.py)")
        if self.cuda_graphs:
            parts.append("decoding steps padded to batch buckets and replayed as CUDA graphs, "
                         "sampling on the device (llama3/fast/cuda_decode.py)")
        return "; ".join(parts) + "; forward: llama3/model.py"


def choose_plan(model: nn.Module | None = None, quantize: str | None = None, fuse: bool = True,
                native: bool = True, pack: bool = True, device=None, dtype=None) -> DecodingPlan:
    """The plan for `model` as it lies (or for `device`, `dtype`): C++ kernels on the CPU where
    they build (native=False: PyTorch's), bf16 packed for oneDNN where they do not and `pack`;
    on CUDA the engine's decoding steps as CUDA graphs (cuda_decode.py; native=False: eager)."""
    from llama3.fast.quantize import CPU_HAS_BF16

    device = torch.device(device or "cpu") if model is None else model.device
    dtype = (dtype or torch.float32) if model is None else model.dtype
    why = None
    if device.type != "cpu":
        use_cpp, why = False, f"not on the CPU ({device.type})"
    elif not native:
        use_cpp, why = False, "not asked for"
    else:
        use_cpp = kernels.library() is not None
        why = None if use_cpp else kernels.build_error()
    from llama3.fast import graph

    pack_bf16 = pack and fuse and not use_cpp and quantize is None and dtype == torch.bfloat16 and device.type == "cpu" and CPU_HAS_BF16
    # CUDA: the engine's decoding steps as CUDA graphs over its paged cache (decided from the device's
    # name alone: choosing allocates nothing and needs no GPU); not with native=False (torch.compile
    # callers: a compiled forward makes graphs of its own)
    cuda_graphs = device.type == "cuda" and native and graph.enabled()
    return DecodingPlan(str(device), str(dtype).removeprefix("torch."), quantize, fuse,
                        "C++" if use_cpp else "PyTorch", why, pack_bf16, graph=use_cpp and graph.enabled(),
                        cuda_graphs=cuda_graphs)


class KernelLinear(Lean, nn.Linear):
    """nn.Linear (the same weight Parameter) whose few-row products, decoding's matrix-vector
    products, run the C++ matvec; prompts and training run F.linear."""

    @classmethod
    def of(cls, linear: nn.Linear, namespace: str) -> "KernelLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, None
        new.native, new.kind = namespace, {torch.float32: kernels.F32, torch.bfloat16: kernels.BF16}[linear.weight.dtype]
        new.float_logits = False
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < PREFILL_ROWS * self.in_features and not (torch.is_grad_enabled() and self.weight.requires_grad):
            x = x.float() if self.float_logits else x  # the head: float32 logits from the kernel (float_logits_head)
            return getattr(torch.ops, self.native).matvec(x, self.weight, None, self.kind, self.out_features)
        return F.linear(x, self.weight)


def _kernel_linears(model: nn.Module, namespace: str) -> None:
    """Every linear the C++ matvec reads gets it; the others keep PyTorch's kernels."""
    from llama3.fast.int4 import Bf16Head, Int4Linear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.bias is None and child.weight.dtype in (torch.float32, torch.bfloat16) \
                    and child.in_features % 16 == 0:
                setattr(module, name, KernelLinear.of(child, namespace))
            elif isinstance(child, Int8Linear) and child.in_features % 16 == 0:
                child.native = namespace
            elif isinstance(child, Int4Linear) and child.out_features % 64 == 0 and child.in_features % 16 == 0:
                child.native = namespace
            elif isinstance(child, Bf16Head) and child.table.shape[1] % 16 == 0:
                child.native, child.packed = namespace, None
    float_logits_head(model)


def float_logits_head(model: nn.Module) -> None:
    """A 16-bit model's head, where the C++ matvec runs it, takes its [B, 1, D] input in float32 and
    answers float32 logits, so model.py's `.float()` on them copies nothing.  That copy of [B, 1, V]
    (V = 49,152 for SmolLM2) was the one ATen operator of a decoding step big enough to open an
    OpenMP region, after which libgomp's thread spins on the core the kernels' pool needs: bf16
    decode 44 tok/s with it, 64 with the spinning off (GOMP_SPINCOUNT=0), on a 2-core Zen 4.
    The logits are the head's float32 sums not rounded to 16 bits: closer to exact, not equal to
    the readable path's bf16 logits (within their rounding)."""
    head = model.output
    if model.dtype != torch.float32 and getattr(head, "native", None) is not None and hasattr(head, "float_logits"):
        head.float_logits = True


@torch.no_grad()
def apply_plan(model: nn.Module, plan: DecodingPlan, namespace: str = "llama3") -> nn.Module:
    """Swap in what `plan` says (in place, with setattr); returns the model.  Quantizing and fusing
    make it an inference model (its weights no longer train); without them it still trains and
    saves as before (the kernels hand gradients and prompts to PyTorch)."""
    from llama3.fast.int4 import Int4Linear

    if plan.fuse:
        from llama3.fast.fuse import fuse_projections

        fuse_projections(model)
    if plan.quantize == "int8":
        from llama3.fast.quantize import quantize_int8

        quantize_int8(model)
    elif plan.quantize == "int4":
        from llama3.fast.int4 import quantize_int4

        quantize_int4(model)
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack()  # now, not on the first token
    cpp = plan.kernels == "C++"
    if cpp:
        _kernel_linears(model, namespace)
    elif plan.pack_bf16:
        from llama3.fast.packed import pack_linears

        pack_linears(model)
    from llama3.model import Attention, FeedForward, RMSNorm

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernel = kernels.rms_norm if cpp else kernels.rms_norm_torch
        elif isinstance(module, FeedForward) and cpp:
            module.kernel = kernels.silu_mul  # model.py runs it only while act is nn.SiLU and no tap is hooked
        elif isinstance(module, Attention) and cpp:
            module.rope_kernel, module.attention_kernel = kernels.rope, kernels.attention
    if plan.graph:
        from llama3.fast import graph

        graph.install(model)
    if plan.cuda_graphs:
        from llama3.fast import cuda_decode

        cuda_decode.install(model)
    return model


def plan_of(model: nn.Module) -> str:
    """What the model's slots hold now, in words (for models not made through a plan)."""
    from llama3.fast.fuse import is_fused
    from llama3.fast.graph import graphs_of

    norm = model.norm.kernel
    cpp = norm is kernels.rms_norm
    return (f"{model.device}, {str(model.dtype).removeprefix('torch.')}; "
            + ("fused q/k/v and gate/up; " if is_fused(model) else "")
            + ("C++ kernels (llama3/fast/kernels.cpp)" if cpp else "PyTorch kernels")
            + (("; decoding steps replayed as CUDA graphs (llama3/fast/cuda_decode.py)"
                if hasattr(graphs_of(model), "pick_rows") else
                "; decoding steps recorded and replayed (llama3/fast/graph.py)") if graphs_of(model) else "")
            + "; forward: llama3/model.py")
