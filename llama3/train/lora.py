"""LoRA: fine-tune a few small matrices beside the frozen weights (Hu et al. 2021, arXiv:2106.09685).

A frozen linear layer y = W x  (W: [out, in]) gets a trainable low-rank detour:

    y = W x + (alpha / r) * B (A dropout(x))      A: [r, in], B: [out, r], r << in, out

A starts random and B at zero, so training starts exactly at the base model.
With r = 8 on wq/wk/wv/wo of a 4096-wide model, each layer trains 4 x 8 x (4096 +
4096) = 262K numbers instead of 4 x 16.8M (for grouped-query wk/wv, fewer).

Applied from outside the model: `apply_lora` swaps chosen nn.Linear modules for
`LoRALinear` wrappers (the base weight stays where it was, as `.base`), so the
architecture in model.py is untouched.  Adapters are saved on their own
(adapter_model.safetensors + adapter_config.json, a few hundred KB), loaded on
top of the base model with `load_adapter`, and folded in with `merge_lora`
(W' = W + (alpha/r) B A), after which the model is an ordinary Transformer again.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from llama3.checkpoint.files import atomic_file
from llama3.errors import Llama3Error, refuse_unknown

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Names of the linear layers in a block (model.py): attention wq wk wv wo, feed-forward w1 (gate) w2 (down) w3 (up).
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    base_model: str | None = None  # where the base weights came from (recorded, for loading later)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise Llama3Error(f"--lora-rank {self.rank} must be a positive integer (8 or 16 are typical)")
        if not 0 <= self.dropout < 1:
            raise Llama3Error(f"--lora-dropout {self.dropout} must be in [0, 1)")
        if not self.targets:
            raise Llama3Error(f"LoRA targets [] are not linear layers of a block; choose from {', '.join(TARGETS)}")
        refuse_unknown(self.targets, TARGETS, "LoRA targets {unknown} are not linear layers of a block; "
                       "choose from " + ", ".join(TARGETS))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """base(x) + scale * B(A(dropout(x))), with `base` frozen.  x [..., in] -> [..., out]."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))   # A: [r, in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # B: [out, r]
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detour = self.dropout(x) @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)  # [..., out]
        return self.base(x) + self.scale * detour

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B A folded in."""
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=False,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = self.scale * (self.lora_b.float() @ self.lora_a.float())  # [out, in]
            linear.weight.copy_((self.base.weight.float() + delta).to(linear.weight.dtype))
        return linear


def _targets(model: nn.Module, names) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every module whose last name part is in `names`."""
    found = []
    for full_name, module in model.named_modules():
        parent_name, _, attr = full_name.rpartition(".")
        if attr in names:
            found.append((model.get_submodule(parent_name) if parent_name else model, attr, module))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model`, then wrap the target linears with trainable LoRA detours (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, module in _targets(model, config.targets):
        if isinstance(module, nn.Linear):
            setattr(parent, attr, LoRALinear(module, config.rank, config.alpha, config.dropout))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter matrices, keyed like `layers.0.attention.wq.lora_a`."""
    return {name: p.detach() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def save_adapter(model: nn.Module, config: LoRAConfig, folder: str | os.PathLike,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter_model.safetensors and adapter_config.json into `folder` (atomically, file by file)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model) if state is None else state
    with atomic_file(folder / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.float().contiguous().cpu() for k, v in state.items()}, str(tmp))
    with atomic_file(folder / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
    return folder


def read_adapter_config(folder: str | os.PathLike) -> LoRAConfig:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise Llama3Error(f"{folder}: no {ADAPTER_CONFIG}; is this a LoRA adapter folder written by llama3 sft?")
    try:
        return LoRAConfig(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise Llama3Error(f"{path}: not a valid adapter config ({e})") from None


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Wrap `model` as the adapter's config says and load the adapter weights into it (strict)."""
    from safetensors.torch import load_file

    config = read_adapter_config(folder)
    apply_lora(model, config)
    weights = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    expected = lora_state_dict(model)
    if set(weights) != set(expected):
        raise Llama3Error(f"{folder}: the adapter does not fit this model (e.g. "
                          f"{sorted(set(weights) ^ set(expected))[:2]}); load it on the base model it was trained on")
    with torch.no_grad():
        for name, tensor in weights.items():
            if tensor.shape != expected[name].shape:
                raise Llama3Error(f"{folder}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(expected[name].shape)}; wrong base model?")
            model.get_parameter(name).copy_(tensor)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with its merged nn.Linear (in place); the result has the base model's
    parameter names and loads/saves like any Transformer."""
    for parent, attr, module in _targets(model, TARGETS):
        if isinstance(module, LoRALinear):
            setattr(parent, attr, module.merged())
    return model
