"""The training loop, shared by pretraining (`llama3 train`) and fine-tuning (`llama3 sft`).

One optimizer step:

    for each of grad_accum micro-batches:            (gradients add up)
        logits = model(tokens, positions, mask)      [B, T, V]
        loss   = cross_entropy(logits, targets)      mean over the target tokens
        (loss / grad_accum).backward()
    clip the global gradient norm to grad_clip
    AdamW step with the learning rate of this step (linear warmup, cosine decay)

Data: the samples of step s are the global sample indices
samples_seen .. samples_seen + global_batch - 1, mapped through a seeded
permutation (`SampleOrder`); process r takes its own slice of each micro-batch.
So the data a step sees depends only on (seed, samples_seen), which is what makes
resuming exact and a 2-process run train like a 1-process one.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama3.train.checkpointing import find_latest, load_training_checkpoint, save_training_checkpoint
from llama3.train.config import TrainConfig
from llama3.train.data import Batch, SampleOrder
from llama3.train.distributed import Dist, gradient_sync, mean_across, resolve_strategy, wrap_model
from llama3.train.metrics import MetricsLog, flops_per_token, peak_flops, perplexity, plot_loss


# --------------------------------------------------------------- the pieces
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to cfg.lr over warmup_steps,
    then cosine decay to cfg.min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (embeddings, projections), none on norm gains.
    Frozen parameters (LoRA's base weights) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW as one fused kernel on CUDA and CPU: the per-parameter loop's update up to float
    rounding, in 2 ms instead of 14 ms a step for the tiny-cpu preset on one CPU core."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cuda", "cpu"))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that count (-100 = no loss); 0 when none count.
    logits [B, T, V], targets [B, T]."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def amp_dtype_for(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 autocast where the hardware does it well (CUDA with bf16); float32 otherwise."""
    if cfg.amp_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.amp_dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def micro_batch(dataset, order: SampleOrder, start: int, cfg: TrainConfig, d: Dist) -> Batch:
    """The `cfg.batch_size` samples of this process starting at global sample `start`."""
    first = start + d.rank * cfg.batch_size
    return dataset.batch([order[g] for g in range(first, first + cfg.batch_size)])


# --------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset, cfg: TrainConfig, d: Dist, amp: torch.dtype) -> float:
    """Mean validation loss over the first eval_batches micro-batches (every process the same count)."""
    was_training = model.training
    model.eval()
    per_round = cfg.batch_size * d.world_size
    rounds = min(cfg.eval_batches, math.ceil(len(dataset) / per_round))
    order = SampleOrder(len(dataset), cfg.seed, shuffle=False)
    loss_sum, count = 0.0, 0
    for r in range(rounds):
        batch = micro_batch(dataset, order, r * per_round, cfg, d).to(d.device)
        with autocast(d.device, amp):
            logits = model(batch.tokens, positions=batch.positions, mask=batch.mask)
        n = batch.n_targets
        loss_sum += float(loss_fn(logits, batch.targets)) * n
        count += n
    model.train(was_training)
    total_loss, total_count = mean_across([loss_sum, float(count)], d)
    return total_loss / max(total_count, 1.0)


def last_logged_loss(metrics: MetricsLog, step: int) -> float:
    """The training loss metrics.jsonl recorded last at or before `step`; NaN when it has none."""
    try:
        records = metrics.read()
    except (OSError, ValueError):
        return float("nan")
    logged = [r["loss"] for r in records if "loss" in r and r.get("step", 0) <= step]
    return float(logged[-1]) if logged else float("nan")


def describe(result: "TrainResult", val: bool = True) -> str:
    """`N steps, train loss X, val loss Y` for the closing line of a command (NaN losses left out);
    a run that had nothing left to do says so."""
    parts = [f"{result.step} steps" if result.losses else f"already at step {result.step}, nothing trained"]
    if not math.isnan(result.loss):
        parts.append(f"train loss {result.loss:.4f}")
    if val and not math.isnan(result.val_loss):
        parts.append(f"val loss {result.val_loss:.4f}")
    return ", ".join(parts)


# --------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    step: int
    loss: float
    val_loss: float
    tokens: int
    elapsed_s: float
    losses: list[float]  # the training loss of every step run in this call


def train_loop(model: nn.Module, cfg: TrainConfig, train_set, val_set, d: Dist, extra_state: dict | None = None):
    """Train `model` (already on d.device) for cfg.steps optimizer steps, writing metrics, the loss curve
    and training checkpoints under cfg.out; resume first when cfg.resume.  Returns (wrapped model, result):
    the wrapped model (DDP/FSDP) is what `full_model_state` gathers from."""
    out = Path(cfg.out)
    strategy = resolve_strategy(cfg.strategy, d)
    torch.manual_seed(cfg.seed + d.rank)  # dropout streams differ per process, reproducibly
    wrapped = wrap_model(model, strategy, d)
    optimizer = make_optimizer(wrapped, cfg, d.device)
    runner = torch.compile(wrapped) if cfg.compile else wrapped
    amp = amp_dtype_for(cfg, d.device)
    step, samples_seen, tokens_seen, elapsed = 0, 0, 0, 0.0
    latest = find_latest(out) if cfg.resume else None
    if latest is not None:
        state = load_training_checkpoint(latest, wrapped, optimizer, d)
        step, samples_seen = state["step"], state["samples_seen"]
        tokens_seen, elapsed = state["tokens_seen"], state["elapsed_s"]
        if d.is_main:
            print(f"resuming from {latest} (step {step})", file=sys.stderr, flush=True)
    elif cfg.resume and d.is_main:
        print(f"no checkpoint in {out / 'checkpoints'}; starting from step 0", file=sys.stderr, flush=True)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    order = SampleOrder(len(train_set), cfg.seed)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step, enabled=d.is_main)
    n_params = sum(p.numel() for p in model.parameters())
    flops_tok = flops_per_token(model.config, cfg.seq_len, n_params)
    peak = peak_flops(d.device, amp, cfg.peak_flops)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    losses, loss, val_loss = [], float("nan"), float("nan")

    def checkpoint():
        save_training_checkpoint(out, wrapped, optimizer, {
            "step": step, "samples_seen": samples_seen, "tokens_seen": tokens_seen, "elapsed_s": elapsed,
            "config": cfg.to_dict(), "model_config": model.config.to_dict(), **(extra_state or {})},
            d, keep=cfg.keep_checkpoints)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", disable=not (d.is_main and cfg.progress),
               dynamic_ncols=True)
    wrapped.train()
    while step < cfg.steps:
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens = 0.0, 0
        for m in range(cfg.grad_accum):
            batch = micro_batch(train_set, order, samples_seen + m * cfg.batch_size * d.world_size, cfg, d)
            batch = batch.to(d.device)
            with gradient_sync(wrapped, enabled=m == cfg.grad_accum - 1):
                with autocast(d.device, amp):
                    logits = runner(batch.tokens, positions=batch.positions, mask=batch.mask)  # [B, T, V]
                micro_loss = loss_fn(logits, batch.targets)
                (micro_loss / cfg.grad_accum).backward()
            step_loss += micro_loss.item() / cfg.grad_accum
            step_tokens += batch.tokens.numel() * d.world_size
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, samples_seen, tokens_seen = step + 1, samples_seen + global_batch, tokens_seen + step_tokens
        (loss,) = mean_across([step_loss], d)
        losses.append(loss)
        seconds = time.perf_counter() - started
        elapsed += seconds
        tokens_per_s = step_tokens / seconds
        mfu = tokens_per_s * flops_tok / peak if peak else None
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
        if step % cfg.log_interval == 0 or step == cfg.steps:
            metrics.write({"step": step, "loss": loss, "lr": lr, "grad_norm": round(grad_norm, 4),
                           "tokens_per_s": round(tokens_per_s, 1), "tflops": round(tokens_per_s * flops_tok / 1e12, 4),
                           "mfu": mfu, "elapsed_s": round(elapsed, 2)})
        is_last = step == cfg.steps
        if val_set is not None and ((cfg.eval_interval and step % cfg.eval_interval == 0) or is_last):
            val_loss = evaluate(runner, val_set, cfg, d, amp)
            metrics.write({"step": step, "val_loss": round(val_loss, 5), "val_ppl": round(perplexity(val_loss), 3)})
            if d.is_main:
                bar.write(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f} "
                          f"(perplexity {perplexity(val_loss):.2f})")
                plot_loss(metrics.read(), out / "loss.png")
        if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or is_last:
            checkpoint()
    bar.close()
    if not losses:  # resumed a finished run: nothing trained, so report what the run ended with
        loss = last_logged_loss(metrics, step)
        if val_set is not None:
            val_loss = evaluate(runner, val_set, cfg, d, amp)
        if d.is_main:
            print(f"already at step {step} (--steps {cfg.steps}); nothing to train: raise --steps to train further",
                  file=sys.stderr, flush=True)
    if d.is_main and val_set is None and metrics.path.is_file():
        plot_loss(metrics.read(), out / "loss.png")
    return wrapped, TrainResult(step=step, loss=loss, val_loss=val_loss, tokens=tokens_seen,
                                elapsed_s=elapsed, losses=losses)
