"""`--resume`: continue a run from its newest readable checkpoint, and only if it is the same run.

Which checkpoint: the one `latest.json` names; when its files cannot be read (a disk error, a copy
cut short), the older ones in turn, newest first, each fallback a warning on stderr.

Same run: the settings that decide what the run computes (the data and tokenizer, the model's
shape, the optimizer and schedule, the seed, the global batch, LoRA) must equal the checkpoint's,
or the losses would silently change course (a resumed run with twice the batch jumped from 1.35 to
5.0).  A change is refused with the list of what changed; `--allow-changes` continues anyway.
How the work is spread (batch per process x processes, strategy, device, compile) may change:
the global batch is what counts.  `--steps` may change too (training further is the point of
resuming); the cosine schedule then stretches from the resumed step on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llama3.errors import Llama3Error
from llama3.train.checkpointing import (CHECKPOINTS, CorruptCheckpoint, checkpoint_candidates, read_training_checkpoint,
                                        restore_training_checkpoint)
from llama3.train.config import TrainConfig
from llama3.train.distributed import Dist

# the settings that change what a run computes (besides the global batch, compared on its own)
COMPUTED = ("data", "tokenizer", "vocab_size", "preset", "model", "seq_len", "lr", "min_lr", "warmup_steps",
            "weight_decay", "beta1", "beta2", "grad_clip", "seed", "val_fraction", "amp_dtype",
            "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "pack")


def global_batch(config: dict, world_size: int) -> int:
    return int(config["batch_size"]) * int(config["grad_accum"]) * int(world_size)


def changed_settings(saved: dict, saved_world_size: int, cfg: TrainConfig, world_size: int) -> list[str]:
    """`name: old -> new` for each computed setting the new run changes."""
    now = cfg.to_dict()
    changes = [f"{name}: {saved[name]!r} -> {now[name]!r}" for name in COMPUTED
               if name in saved and saved[name] != now[name]]
    before, after = global_batch(saved, saved_world_size), global_batch(now, world_size)
    if before != after:
        changes.append(f"global batch (batch_size x grad_accum x processes): {before} -> {after}")
    return changes


def resume_run(cfg: TrainConfig, model, optimizer, d: Dist) -> dict | None:
    """Restore the newest readable checkpoint under cfg.out into model and optimizer; return its saved
    state (step, samples_seen, ...), or None when there is none (a fresh start)."""
    out = Path(cfg.out)
    candidates = checkpoint_candidates(out)
    for i, folder in enumerate(candidates):
        try:
            model_sd, state = read_training_checkpoint(folder)
        except CorruptCheckpoint as e:
            if i + 1 == len(candidates):
                raise
            if d.is_main:
                print(f"warning: {e}; resuming from the previous checkpoint, {candidates[i + 1].name}, instead",
                      file=sys.stderr, flush=True)
            continue
        changes = changed_settings(state.get("config", {}), state.get("world_size", 1), cfg, d.world_size)
        if changes and not cfg.allow_changes:
            raise Llama3Error(f"--resume would change what the run in {out} computes ({'; '.join(changes)}); "
                              "resume with its settings, or add --allow-changes to continue with the new ones")
        if changes and d.is_main:
            print(f"--allow-changes: resuming with {'; '.join(changes)}", file=sys.stderr, flush=True)
        state = restore_training_checkpoint(folder, model_sd, state, model, optimizer, d)
        if d.is_main:
            print(f"resuming from {folder} (step {state['step']})", file=sys.stderr, flush=True)
        return state
    if d.is_main:
        print(f"no checkpoint in {out / CHECKPOINTS}; starting from step 0", file=sys.stderr, flush=True)
    return None
