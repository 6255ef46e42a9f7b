"""The training loop, shared by pretraining (`llama3 train`) and fine-tuning (`llama3 sft`).

One optimizer step, `train_step(model, optimizer, micro_batches, lr=...) -> StepStats`:

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

`train_loop` composes the pieces: set-up (wrap, optimizer, compile, resume.py), then per step
train_step, the Reporter (bar, metrics.jsonl, loss.png), evaluation and checkpoints.
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

from llama3.train.checkpointing import save_training_checkpoint
from llama3.train.config import TrainConfig
from llama3.train.data import Batch, SampleOrder
from llama3.train.distributed import Dist, gradient_sync, mean_across, resolve_strategy, wrap_model
from llama3.train.metrics import MetricsLog, flops_per_token, peak_flops, perplexity, plot_loss
from llama3.train.resume import resume_run


# --------------------------------------------------------------- the pieces
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr over warmup_steps,
    then cosine decay to min_lr at the last step (cfg.schedule)."""
    s = cfg.schedule
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (embeddings, projections), none on norm gains.
    Frozen parameters (LoRA's base weights) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW as one fused kernel on CUDA and CPU: the per-parameter loop's update up to float
    rounding, in 2 ms instead of 14 ms a step for the tiny-cpu preset on one CPU core."""
    o = cfg.optimizer
    return torch.optim.AdamW(param_groups(model, o.weight_decay), lr=cfg.schedule.lr, betas=(o.beta1, o.beta2),
                             fused=device.type in ("cuda", "cpu"))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that count (-100 = no loss); 0 when none count.
    logits [B, T, V], targets [B, T]."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def amp_dtype_for(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 autocast where the hardware does it well (CUDA with bf16); float32 otherwise."""
    if cfg.parallel.amp_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.parallel.amp_dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def micro_batch(dataset, order: SampleOrder, start: int, cfg: TrainConfig, d: Dist) -> Batch:
    """The `cfg.data.batch_size` samples of this process starting at global sample `start`."""
    first = start + d.rank * cfg.data.batch_size
    return dataset.batch([order[g] for g in range(first, first + cfg.data.batch_size)])


# --------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, dataset, cfg: TrainConfig, d: Dist, amp: torch.dtype) -> float:
    """Mean validation loss over the first eval_batches micro-batches (every process the same count)."""
    was_training = model.training
    model.eval()
    per_round = cfg.data.batch_size * d.world_size
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


# --------------------------------------------------------------- one step
@dataclass
class StepStats:
    """What one optimizer step did (on this process)."""

    loss: float        # mean training loss over the step's micro-batches
    grad_norm: float   # global gradient norm before clipping
    tokens: int        # input tokens this process read
    seconds: float     # wall time of the step
    lr: float          # the learning rate it used


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch], *, lr: float,
               grad_clip: float = 0.0, amp: torch.dtype = torch.float32, forward: nn.Module | None = None) -> StepStats:
    """One optimizer step over k micro-batches: the gradients of loss/k add up over them (so k micro-batches
    of B windows step like one batch of k*B), the global norm is clipped to grad_clip (0: not clipped), then
    AdamW steps at `lr`.  model: the (DDP/FSDP-wrapped) module whose gradients sync on the last micro-batch;
    forward: what computes the logits, when that differs (torch.compile of model)."""
    started = time.perf_counter()
    forward = forward or model
    device = next(model.parameters()).device
    for group in optimizer.param_groups:
        group["lr"] = lr
    k, loss, tokens = len(micro_batches), 0.0, 0
    for m, batch in enumerate(micro_batches):
        batch = batch.to(device)
        with gradient_sync(model, enabled=m == k - 1):
            with autocast(device, amp):
                logits = forward(batch.tokens, positions=batch.positions, mask=batch.mask)  # [B, T, V]
            micro_loss = loss_fn(logits, batch.targets)
            (micro_loss / k).backward()
        loss += micro_loss.item() / k
        tokens += batch.tokens.numel()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=loss, grad_norm=grad_norm, tokens=tokens, seconds=time.perf_counter() - started, lr=lr)


def step_batches(dataset, order: SampleOrder, samples_seen: int, cfg: TrainConfig, d: Dist) -> list[Batch]:
    """This process's grad_accum micro-batches of the step that starts at global sample `samples_seen`."""
    return [micro_batch(dataset, order, samples_seen + m * cfg.data.batch_size * d.world_size, cfg, d)
            for m in range(cfg.data.grad_accum)]


# --------------------------------------------------------------- reporting
class Reporter:
    """The progress bar, metrics.jsonl and loss.png of a run (rank 0 writes; every rank calls)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, d: Dist, amp: torch.dtype, step: int):
        from tqdm import tqdm

        self.cfg, self.d, self.out = cfg, d, Path(cfg.out)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=step, enabled=d.is_main)
        n_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = flops_per_token(model.config, cfg.data.seq_len, n_params)
        self.peak = peak_flops(d.device, amp, cfg.parallel.peak_flops)  # None on CPUs: then no MFU anywhere
        self.bar = tqdm(total=cfg.schedule.steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                        disable=not (d.is_main and cfg.progress))

    def step(self, step: int, loss: float, stats: StepStats, tokens: int, elapsed: float) -> None:
        tokens_per_s = tokens / stats.seconds
        mfu = tokens_per_s * self.flops_per_token / self.peak if self.peak else None
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                             **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
        if step % self.cfg.log_interval == 0 or step == self.cfg.schedule.steps:
            record = {"step": step, "loss": loss, "lr": stats.lr, "grad_norm": round(stats.grad_norm, 4),
                      "tokens_per_s": round(tokens_per_s, 1),
                      "tflops": round(tokens_per_s * self.flops_per_token / 1e12, 4), "elapsed_s": round(elapsed, 2)}
            self.metrics.write(record if mfu is None else {**record, "mfu": mfu})

    def validation(self, step: int, loss: float, val_loss: float) -> None:
        self.metrics.write({"step": step, "val_loss": round(val_loss, 5), "val_ppl": round(perplexity(val_loss), 3)})
        if self.d.is_main:
            self.bar.write(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f} "
                           f"(perplexity {perplexity(val_loss):.2f})")
            self.plot()

    def plot(self) -> None:
        if self.d.is_main and self.metrics.path.is_file():
            plot_loss(self.metrics.read(), self.out / "loss.png")


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
    """Train `model` (already on d.device) for cfg.schedule.steps optimizer steps: train_step, then reporting,
    evaluation every eval_interval steps and a checkpoint every checkpoint_interval steps (and both at
    the end); resume first when cfg.resume.  Returns (wrapped model, result): the wrapped model
    (DDP/FSDP) is what `full_model_state` gathers from."""
    torch.manual_seed(cfg.seed + d.rank)  # dropout streams differ per process, reproducibly
    wrapped = wrap_model(model, resolve_strategy(cfg.parallel.strategy, d), d)
    optimizer = make_optimizer(wrapped, cfg, d.device)
    forward = torch.compile(wrapped) if cfg.parallel.compile else wrapped
    amp = amp_dtype_for(cfg, d.device)
    saved = resume_run(cfg, wrapped, optimizer, d) if cfg.resume else None
    step, samples_seen, tokens_seen, elapsed = ((saved["step"], saved["samples_seen"], saved["tokens_seen"],
                                                 saved["elapsed_s"]) if saved else (0, 0, 0, 0.0))
    order = SampleOrder(len(train_set), cfg.seed)
    report = Reporter(model, cfg, d, amp, step)
    losses, loss, val_loss = [], float("nan"), float("nan")
    wrapped.train()
    last = cfg.schedule.steps
    while step < last:
        stats = train_step(wrapped, optimizer, step_batches(train_set, order, samples_seen, cfg, d),
                           lr=lr_at(step, cfg), grad_clip=cfg.optimizer.grad_clip, amp=amp, forward=forward)
        step, samples_seen = step + 1, samples_seen + cfg.data.batch_size * cfg.data.grad_accum * d.world_size
        tokens_seen, elapsed = tokens_seen + stats.tokens * d.world_size, elapsed + stats.seconds
        (loss,) = mean_across([stats.loss], d)
        losses.append(loss)
        report.step(step, loss, stats, stats.tokens * d.world_size, elapsed)
        if val_set is not None and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == last):
            val_loss = evaluate(forward, val_set, cfg, d, amp)
            report.validation(step, loss, val_loss)
        if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == last:
            save_training_checkpoint(cfg.out, wrapped, optimizer, {
                "step": step, "samples_seen": samples_seen, "tokens_seen": tokens_seen, "elapsed_s": elapsed,
                "config": cfg.to_dict(), "model_config": model.config.to_dict(), **(extra_state or {})},
                d, keep=cfg.keep_checkpoints)
    report.bar.close()
    if not losses:  # resumed a finished run: nothing trained, so report what the run ended with
        loss = last_logged_loss(report.metrics, step)
        if val_set is not None:
            val_loss = evaluate(forward, val_set, cfg, d, amp)
        if d.is_main:
            print(f"already at step {step} (--steps {last}); nothing to train: raise --steps to train further",
                  file=sys.stderr, flush=True)
    if val_set is None:
        report.plot()
    return wrapped, TrainResult(step=step, loss=loss, val_loss=val_loss, tokens=tokens_seen,
                                elapsed_s=elapsed, losses=losses)
