"""The output folder of a training run, before the run starts: never silently replace an earlier run,
and clean up what a killed run left behind.

    OUT/checkpoints/latest.json, metrics.jsonl, model.safetensors, adapter_model.safetensors
        any of these means OUT holds an earlier run: starting over needs --overwrite (which removes
        its checkpoints, metrics and loss curve; a prepared OUT/data/ is kept and reused only when it
        matches), and --resume continues it instead.
    .NAME.*.tmp, .step_*.tmp (in OUT, OUT/checkpoints, OUT/data)
        temporaries of a process killed while writing (every write is temp-then-rename): removed at
        the next start, since no live writer can own them (only one run writes a folder).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from llama3.errors import Llama3Error
from llama3.train.checkpointing import CHECKPOINTS, LATEST

EARLIER_RUN = (f"{CHECKPOINTS}/{LATEST}", "metrics.jsonl", "model.safetensors", "adapter_model.safetensors")
RUN_FILES = (CHECKPOINTS, "metrics.jsonl", "loss.png")  # what --overwrite removes


def earlier_run(out: Path) -> str | None:
    """A short description of the earlier run in `out` ("step 60"), or None when there is none."""
    present = [name for name in EARLIER_RUN if (out / name).exists()]
    if not present:
        return None
    try:
        return f"checkpoint at step {json.loads((out / CHECKPOINTS / LATEST).read_text())['step']}"
    except (OSError, ValueError, KeyError, TypeError):
        return present[0]


def clean_temporaries(out: Path) -> int:
    """Remove the temporaries a killed writer left in OUT, OUT/checkpoints and OUT/data; return how many."""
    removed = 0
    for folder in (out, out / CHECKPOINTS, out / "data"):
        if not folder.is_dir():
            continue
        for stale in folder.glob(".*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed += 1
    return removed


def prepare_out_folder(out: str | Path, resume: bool, overwrite: bool, is_main: bool = True) -> None:
    """Check OUT may be written (every process); on the main process remove leftovers and, with
    `overwrite`, the earlier run.  Raises Llama3Error when OUT holds an earlier run and neither
    --resume nor --overwrite was given, or when OUT is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Llama3Error(f"--out {out} is a file; give a folder")
    earlier = None if resume else earlier_run(out)
    if earlier and not overwrite:
        raise Llama3Error(f"--out {out} holds an earlier run ({earlier}); pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --out")
    if not is_main:
        return
    removed = clean_temporaries(out)
    if removed:
        print(f"removed {removed} temporary file(s) left in {out} by an interrupted run", file=sys.stderr, flush=True)
    if earlier and overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        print(f"--overwrite: removed the earlier run in {out} ({earlier})", file=sys.stderr, flush=True)
