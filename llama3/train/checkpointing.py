"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    OUT/checkpoints/step_0000500/model.safetensors   the weights (full, unsharded tensors)
    OUT/checkpoints/step_0000500/state.pt            optimizer state, step, data position,
                                                     RNG states, the TrainConfig
    OUT/checkpoints/latest.json                      {"step": 500, "folder": "step_0000500"}

Atomic: each step folder is written under a temporary name and renamed into
place in one step, and `latest.json` is replaced only afterwards, so killing
the process at any moment leaves the previous checkpoint intact and pointed to.

The learning-rate schedule is a function of the step, and the data order a
function of the number of samples seen, so these two numbers are the whole
"scheduler" and "data loader" state.  State dicts are gathered with
`torch.distributed.checkpoint.state_dict` into full tensors keyed by parameter
name, whatever the strategy (none, DDP, FSDP), so a checkpoint written by N
processes loads in one, and the reverse.  `state.pt` holds only tensors and
plain Python values and is read with `torch.load(weights_only=True)`.

Reading falls back: when the newest checkpoint cannot be read (a disk error, a file cut short),
`checkpoint_candidates` offers the older ones, newest first.  Writing checks the disk: a full
one is a one-line error naming the folder and the space the checkpoint needs.

Ordinary model folders (`llama3.load`) are a different thing: the trainer
writes one of those at the end, through `LLM.save`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from llama3.checkpoint.files import atomic_file, atomic_folder
from llama3.errors import CheckpointError
from llama3.train.distributed import Dist, barrier, gather_objects

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


class CorruptCheckpoint(CheckpointError):
    """A training checkpoint's files cannot be read (truncated, damaged, foreign): an older one may do."""


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors keyed by parameter name; collective under FSDP (call on every rank;
    under several processes only rank 0 gets the tensors, the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_dict_options(cpu_offload=True))


def save_training_checkpoint(out: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict, d: Dist, keep: int = 2) -> Path | None:
    """Write a checkpoint for `state["step"]`; every process must call this (gathering is collective)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_dict_options(cpu_offload=True))
    rngs = gather_objects(rng_state(d.device), d)
    folder = None
    if d.is_main:
        root = Path(out) / CHECKPOINTS
        folder = root / f"step_{state['step']:07d}"
        for stale in root.glob(".step_*.tmp"):  # temporaries of a process killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():  # left over from a run that was killed before it updated latest.json
            shutil.rmtree(folder)
        try:
            with atomic_folder(folder) as tmp:
                # clone: tied weights share storage, which safetensors refuses to write twice
                save_file({k: v.detach().clone().contiguous() for k, v in model_sd.items()},
                          str(tmp / "model.safetensors"))
                torch.save({**state, "optimizer": optim_sd, "rng": rngs, "world_size": d.world_size}, tmp / "state.pt")
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as "[enforce fail ...] file write failed"
            raise write_error(root, e, _nbytes(model_sd) + _nbytes(optim_sd)) from None
        with atomic_file(root / LATEST) as tmp:
            tmp.write_text(json.dumps({"step": state["step"], "folder": folder.name}) + "\n", encoding="utf-8")
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return folder


def _nbytes(tree) -> int:
    """Bytes of the tensors in a nested dict/list (a state dict, an optimizer state)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0


def write_error(root: Path, error: Exception, needed: int) -> CheckpointError:
    """One line for a failed checkpoint write: a full disk says where and how much is needed."""
    from llama3.params import human_bytes

    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = None
    if getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < needed * 1.05):
        have = f", {human_bytes(free)} free" if free is not None else ""
        return CheckpointError(f"{root}: no space left on the disk to write a training checkpoint (it needs about "
                               f"{human_bytes(needed)}{have}); free some space or point --out elsewhere, then "
                               "--resume from the last checkpoint")
    return CheckpointError(f"{root}: cannot write the training checkpoint ({str(error).splitlines()[0]})")


def checkpoint_candidates(out: str | os.PathLike) -> list[Path]:
    """Checkpoint folders to resume from, best first: the one latest.json names, then the other
    complete-looking step folders, newest first (so a damaged newest one falls back to its predecessor)."""
    root = Path(out) / CHECKPOINTS
    named = find_latest(out)
    others = sorted((p for p in root.glob("step_*") if p.is_dir() and p != named
                     and (p / "state.pt").is_file() and (p / "model.safetensors").is_file()), reverse=True)
    return ([named] if named is not None else []) + others


def find_latest(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under OUT, or None."""
    root = Path(out) / CHECKPOINTS
    try:
        latest = json.loads((root / LATEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        folder = root / latest["folder"]
    except (KeyError, TypeError):
        return None
    return folder if (folder / "state.pt").is_file() and (folder / "model.safetensors").is_file() else None


def read_training_checkpoint(folder: str | os.PathLike) -> tuple[dict, dict]:
    """-> (model state dict, saved state) of `folder`, without touching any model; CorruptCheckpoint when
    its files cannot be read."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        model_sd = load_file(str(folder / "model.safetensors"))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
            raise ValueError("state.pt lacks the step or the optimizer state")
    except Exception as e:  # a truncated or foreign file
        raise CorruptCheckpoint(f"{folder}: cannot read the training checkpoint ({str(e).splitlines()[0]}); "
                                "delete it to start over, or point --out elsewhere") from None
    return model_sd, state


def load_training_checkpoint(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                             d: Dist) -> dict:
    """Restore weights, optimizer and this process's RNG from `folder`; return the saved state
    (step, samples_seen, config, ...).  Works whatever the strategy and process count that wrote it."""
    folder = Path(folder)
    return restore_training_checkpoint(folder, *read_training_checkpoint(folder), model, optimizer, d)


def restore_training_checkpoint(folder: Path, model_sd: dict, state: dict, model: nn.Module,
                                optimizer: torch.optim.Optimizer, d: Dist) -> dict:
    """Put what `read_training_checkpoint` read into the model, the optimizer and this process's RNG."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    expected = set(_plain(model).state_dict())
    if set(model_sd) != expected:
        missing, extra = sorted(expected - set(model_sd))[:3], sorted(set(model_sd) - expected)[:3]
        raise CheckpointError(f"{folder}: the checkpoint does not fit this model (missing {missing}, "
                              f"unexpected {extra}); resume with the settings it was written with")
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=state.pop("optimizer"),
                   options=_state_dict_options())
    rngs = state.pop("rng")
    if len(rngs) == d.world_size:  # same process count: each process gets its own generator back
        set_rng_state(rngs[d.rank], d.device)
    else:                          # otherwise a fresh, still deterministic, stream per process
        torch.manual_seed(state["config"]["seed"] + 7919 * state["step"] + d.rank)
    return state


def _plain(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)      # DDP
