"""Training speed: our Transformer vs transformers' LlamaForCausalLM, same config, optimizer and batch.

    python benchmarks/train_speed.py [--preset tiny] [--batch 16] [--seq 256] [--steps 10] [--threads 2] [--profile]

Both models are built from the same ModelConfig (ours directly, transformers from
`checkpoint.hf.config_to_hf`), both train in float32 with AdamW(lr=3e-4, weight_decay=0.1) on
the same random token batches: forward, cross-entropy, backward, optimizer step.
Rounds alternate between the two (ours, theirs, ours, theirs, ...) so machine
noise hits both alike; each reports its best round in tokens/s.

--profile also runs each eager model's steps under torch.profiler and splits the time into
the kernels both models call with the same shapes (matrix products, SDPA's flash attention,
log-softmax and the loss, forward and backward) and everything else. If everything else cost
nothing, ours would take its shared time: transformers' step / ours' shared time is the most
ours could gain over it while calling those kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama3, however it is installed

import torch
import torch.nn.functional as F


def build(preset: str, compile: bool = False):
    """{name: (model, tokens -> logits)}: ours and transformers, and with compile=True also a
    torch.compile'd copy of each (what `llama3 train --compile` does; transformers the same way)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama3.checkpoint.hf import config_to_hf
    from llama3.config import get_preset
    from llama3.model import Transformer

    config = get_preset(preset)
    hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
    hf_config._attn_implementation = "sdpa"
    models = {}
    for suffix in ["", "-compiled"] if compile else [""]:
        ours = Transformer(config).init_weights(seed=0).train()
        theirs = LlamaForCausalLM(hf_config).train()
        run_ours, run_theirs = (torch.compile(ours), torch.compile(theirs)) if suffix else (ours, theirs)
        models["ours" + suffix] = (ours, run_ours)
        models["transformers" + suffix] = (theirs, lambda x, run=run_theirs: run(x).logits)
    return config, models


def round_seconds(model, logits_of, optimizer, batches) -> float:
    """Time len(batches) training steps (forward, loss, backward, AdamW step)."""
    start = time.perf_counter()
    for x, y in batches:
        logits = logits_of(x)                                            # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


SHARED_KERNELS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_log_softmax",
                  "aten::_log_softmax_backward_data", "aten::nll_loss_forward", "aten::nll_loss_backward")


def profile_split(model, logits_of, optimizer, batches) -> tuple[float, float]:
    """(seconds a step, of which in SHARED_KERNELS), from torch.profiler's self CPU times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        round_seconds(model, logits_of, optimizer, batches)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / len(batches)
    shared = sum(e.self_cpu_time_total for e in events if e.key in SHARED_KERNELS) / 1e6 / len(batches)
    return total, shared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd copies of both models (compiling happens in the warm-up)")
    parser.add_argument("--profile", action="store_true",
                        help="split each eager model's step into the kernels both call and the rest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, models = build(args.preset, args.compile)
    seq = min(args.seq, config.max_seq_len)
    gen = torch.Generator().manual_seed(0)
    batches = [(lambda t: (t[:, :-1], t[:, 1:]))(torch.randint(0, config.vocab_size, (args.batch, seq + 1), generator=gen))
               for _ in range(args.steps)]
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.1) for name, (m, _) in models.items()}
    best = {name: float("inf") for name in models}
    for name, (model, logits_of) in models.items():  # warm-up
        round_seconds(model, logits_of, optimizers[name], batches[:2])
    for _ in range(args.rounds):
        for name, (model, logits_of) in models.items():
            best[name] = min(best[name], round_seconds(model, logits_of, optimizers[name], batches))
    tokens = args.batch * seq * args.steps
    speed = {name: tokens / seconds for name, seconds in best.items()}
    import transformers

    print(f"preset {args.preset}, batch {args.batch} x {seq} tokens, float32, AdamW, {args.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name, tps in speed.items():
        print(f"{name:22s} {tps:10.0f} training tokens/s")
    print(f"ratio ours / transformers: {speed['ours'] / speed['transformers']:.2f}x")
    if args.compile:
        print(f"ratio ours-compiled / transformers: {speed['ours-compiled'] / speed['transformers']:.2f}x, "
              f"/ transformers-compiled: {speed['ours-compiled'] / speed['transformers-compiled']:.2f}x")
    if args.profile:
        split = {name: profile_split(model, logits_of, optimizers[name], batches)
                 for name, (model, logits_of) in models.items() if not name.endswith("-compiled")}
        print("profiled (self CPU time a step): total, in the shared kernels, the rest")
        for name, (total, shared) in split.items():
            print(f"{name:22s} {total * 1e3:8.1f} ms {shared * 1e3:8.1f} ms ({shared / total:.0%}) "
                  f"{(total - shared) * 1e3:8.1f} ms")
        print(f"if everything but the shared kernels cost nothing: ours at most "
              f"{split['transformers'][0] / split['ours'][1]:.2f}x transformers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
