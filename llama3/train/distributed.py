"""Training on several processes with `torch.distributed`: DDP or FSDP2, applied from outside the model.

    torchrun --nproc-per-node 4 -m llama3 train --data DIR --out OUT --strategy ddp

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `init_distributed` reads them.  The backend is
NCCL on CUDA and gloo on CPU (so all of this runs, slowly, on a laptop).

Strategies:
  * ddp:  every process holds the whole model; gradients are averaged with
          all-reduce after backward (torch.nn.parallel.DistributedDataParallel).
  * fsdp: parameters, gradients and optimizer state are sharded across processes
          (FSDP2, `torch.distributed.fsdp.fully_shard`, one unit per block plus the
          root); each block's weights are all-gathered just before use.
Either way each process reads a different slice of every global batch, only
rank 0 logs and writes files, and checkpoints are gathered into full, unsharded
tensors, so a checkpoint written by N processes loads in one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank r of world_size processes, on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) prints, logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    from llama3.llm import parse_device

    device = parse_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun set up (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def shutdown() -> None:
    """Leave the process group; everyone waits for everyone first, so no process tears down
    its connections while another still sends."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_strategy(strategy: str, d: Dist) -> str:
    """"auto" -> "ddp" when there are several processes, "none" otherwise."""
    if strategy == "auto":
        return "ddp" if d.enabled else "none"
    return strategy if d.enabled else "none"


def wrap_model(model: nn.Module, strategy: str, d: Dist) -> nn.Module:
    """Apply DDP or FSDP2 from outside; "none" returns the model itself."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # one all-gather per block, just before it runs
            fully_shard(block)
        return fully_shard(model)   # the embeddings, final norm and output head
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


def gradient_sync(model: nn.Module, enabled: bool):
    """Gradient accumulation: skip the all-reduce on all but the last micro-batch of a step."""
    import contextlib

    if hasattr(model, "no_sync"):                       # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):    # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def mean_across(values: list[float], d: Dist) -> list[float]:
    """Average a few numbers over all processes (for logging losses)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / d.world_size).tolist()


def gather_objects(obj, d: Dist) -> list:
    """One picklable object from every process, as a list indexed by rank."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every process."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
