"""What a run reports: a JSONL metrics log, a loss-curve PNG, and the FLOP/MFU arithmetic.

metrics.jsonl has one JSON object per line: training lines
    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "elapsed_s"}
and validation lines {"step", "val_loss", "val_ppl"}.  A resumed run drops the
lines after its checkpoint's step first, so the file always tells one story.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from llama3.checkpoint.files import atomic_file
from llama3.config import ModelConfig

# Dense bf16 peak FLOP/s of common accelerators (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def flops_per_token(config: ModelConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 N for the matrix multiplies (2 forward, 4 backward)
    plus 12 * layers * H * Dh * T for attention scores and values."""
    return 6 * n_params + 12 * config.n_layers * config.n_heads * config.head_dim * seq_len


def peak_flops(device, amp_dtype, override: float | None) -> float | None:
    """Peak FLOP/s to divide by for MFU: the override, or a known GPU in bf16; None when unknown (CPUs)."""
    if override:
        return override
    import torch

    if device.type != "cuda" or amp_dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class MetricsLog:
    """Appends JSON lines to OUT/metrics.jsonl (rank 0 only); keeps the lines up to `resume_step`."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = []
        if resume_step and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]


def plot_loss(metrics: list[dict], path: str | os.PathLike) -> None:
    """Training and validation loss against step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
