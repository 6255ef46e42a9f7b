"""Speed on a CUDA GPU: ours (plain, fused, fused + int8, optionally compiled) against transformers,
the same random weights, bfloat16.

    python benchmarks/cuda_speed.py [--configs smollm2-135m,llama-3.2-1b] [--compile] [--out cuda_speed.json]
    python benchmarks/cuda_speed.py --device cpu --tiny      # a tiny config and a few tokens: checks the script
    python benchmarks/cuda_speed.py --batches 1,8,32 --configs smollm2-135m [--peers transformers-compiled]
                                                             # decode per batch size (below)

Model shapes (weights are random, seeded: the real files do not travel):
    smollm2-135m   SmolLM2-135M's exact config (576 wide, 30 layers, 9 query / 3 key-value heads,
                   hidden 1536, vocabulary 49152, tied embeddings, RoPE theta 100000)
    llama-3.2-1b   the `llama-3.2-1b` preset of llama3/config.py

Every variant reports:
    prefill    tokens/s of one forward over a 512-token prompt, into a fresh KV cache (best of 3)
    decode     tokens/s of the one-token-at-a-time loop after a 16-token prompt, 128 greedy tokens
               (ours: the serving engine `llama3.engine`, one request alone, its own timer, every step
               ends in a device->host read of the new id; transformers: the same loop written with
               its DynamicCache, `.item()` per step), best of 2
    e2e        seconds for the whole 128-token request (prefill + decode), best of 2
GPU work is bracketed by torch.cuda.synchronize().  "transformers-generate" is `generate()` with
do_sample=False and min_new_tokens = max_new_tokens = 128: end-to-end only.

Variants: ours-plain (model.py as written), ours-fused (`speed_up`: on CUDA that is fused projections and
the engine's decoding steps replayed as CUDA graphs, llama3/fast/cuda_decode.py), ours-compiled (fused +
torch.compile, mode --compile-mode, only with --compile), ours-static (`llama3.fast.static`:
fixed-address cache, step compiled with CUDA graphs; only with --static), ours-int8 (fused + weight-only int8),
transformers (LlamaForCausalLM, SDPA attention).  Ratios are ours / transformers (> 1: ours faster).
A markdown table goes to stdout; the JSON (rewritten after each config) to --out.

--batches B1,B2,...: one row per batch size instead, B prompts of --prompt tokens, --new greedy tokens each:
    ours                   the engine (`llama3.engine`: what generate, chat and serve run) on the model with
                           its decoding plan (`speed_up`: fused projections; on CUDA the decoding steps
                           padded to a bucket and replayed as CUDA graphs, rows sampled on the device)
    transformers           `generate()`, its dynamic cache, eager (disable_compile)
    transformers-compiled  `generate()` with cache_implementation="static" and its CompileConfig
                           (torch.compile, mode reduce-overhead: transformers' own CUDA-graph path;
                           on a CPU dry run backend "eager")
    decode tokens/s = B x (new - 1) / (time of the last new token - time of the first), all rows together
    (ours: the engine's per-row timers; transformers: a streamer's timestamps, one per step); e2e: the
    whole call.  Best of 2 after warm-up runs (which capture / compile).  --peers picks the peers
    (default transformers); --merge A.json B.json prints one table from runs made apart.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama3, however it is installed

import torch  # noqa: E402

from llama3.checkpoint.hf import config_to_hf  # noqa: E402
from llama3.config import ModelConfig, get_preset  # noqa: E402
from llama3.fast.measure import prompt_of  # noqa: E402
from llama3.engine import Engine  # noqa: E402
from llama3.generate import GenerationSettings  # noqa: E402
from llama3.model import KVCache, Transformer  # noqa: E402

CONFIGS = {
    "smollm2-135m": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                                norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "llama-3.2-1b": get_preset("llama-3.2-1b"),
}
TINY = {"tiny": get_preset("tiny")}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the models
@torch.no_grad()
def build_ours(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """Random weights as `Transformer.init_weights` makes them (normal(0, 0.02), wo/w2 scaled by
    1/sqrt(2 n_layers), norms 1), but drawn on the device from a seeded generator: the CPU would
    take ~20 s for the 1.2B numbers of Llama-3.2-1B.  Speed does not depend on the values."""
    with torch.device(device):
        model = Transformer(config)
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            std = 0.02 / math.sqrt(2 * config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            p.normal_(0.0, std, generator=gen)
    model = model.to(dtype).eval()
    assert not config.tie_embeddings or model.output.weight is model.tok_embeddings.weight
    return model


def build_transformers(ours: Transformer, config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """transformers' LlamaForCausalLM (SDPA) holding exactly our weights (HF names and q/k layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama3.checkpoint.hf import hf_state_dict

    hf_config = LlamaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "model_type"})
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours, config), strict=False)
    missing = [name for name in missing if not (config.tie_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"transformers model does not match ours: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf.eval()


# ------------------------------------------------------------------ timing
def best_seconds(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of fn() over `repeats` runs after one warm-up run, GPU work included."""
    best = math.inf
    for attempt in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def ours_prefill(model, config: ModelConfig, n: int, device: torch.device, dtype: torch.dtype) -> float:
    tokens = torch.tensor([prompt_of(n, config.vocab_size)], device=device)  # [1, T]
    cache = KVCache(config, 1, n, dtype=dtype, device=device)  # positions 0..n-1 are overwritten each run
    return n / best_seconds(lambda: model(tokens, 0, cache), device, repeats=3)


def ours_decode(model, config: ModelConfig, prompt_len: int, new: int, device: torch.device,
                warm_new: int) -> dict:
    """Greedy generation through our engine (`llama3.engine`, as `llama3 generate` and the server
    run it: paged KV cache, one request alone); decode rate from its own timer (first new token
    to the last; each step ends in a device->host read of the new id), end-to-end from outside."""
    prompt = prompt_of(prompt_len, config.vocab_size, seed=1)
    settings = GenerationSettings(max_new_tokens=new)
    engine = Engine.sized_for(model, None, [prompt], settings)
    engine.run([prompt], GenerationSettings(max_new_tokens=warm_new))  # warm-up
    decode, e2e, tokens = 0.0, math.inf, None
    for _ in range(2):
        sync(device)
        start = time.perf_counter()
        result = engine.run([prompt], settings)[0]
        sync(device)
        e2e = min(e2e, time.perf_counter() - start)
        assert result.completion_tokens == new, f"generated {result.completion_tokens} of {new} tokens"
        decode = max(decode, result.decode_tokens_per_second)
        tokens = result.token_ids
    engine.close()
    return dict(decode_tokens_per_second=decode, e2e_seconds=e2e, tokens=tokens)


def static_decode(model, config: ModelConfig, args, device: torch.device, dtype: torch.dtype) -> dict:
    """llama3.fast.static: a fixed-address KV cache and a decode step compiled with CUDA graphs
    (reduce-overhead). Decode rate = (new - 1) tokens / (time for new tokens - time for 1)."""
    from llama3.fast.static import StaticDecoder

    prompt = torch.tensor([prompt_of(args.prompt, config.vocab_size, seed=1)], device=device)
    started = time.perf_counter()
    decoder = StaticDecoder(model, 1, args.prompt + args.new)
    for _ in range(2):  # compiles, then records the graph
        decoder.generate(prompt, args.new)
    sync(device)
    warm = time.perf_counter() - started

    def timed(n):
        sync(device)
        start = time.perf_counter()
        out = decoder.generate(prompt, n)
        sync(device)
        return time.perf_counter() - start, out

    first = min(timed(1)[0] for _ in range(3))
    runs = [timed(args.new) for _ in range(2)]
    e2e = min(t for t, _ in runs)
    return dict(compile_and_warmup_seconds=round(warm, 1),
                prefill_tokens_per_second=ours_prefill(model, config, args.prefill, device, dtype),
                decode_tokens_per_second=(args.new - 1) / (e2e - first), e2e_seconds=e2e,
                tokens=runs[0][1][0].tolist())


def hf_prefill(hf, vocab: int, n: int, device: torch.device) -> float:
    tokens = torch.tensor([prompt_of(n, vocab)], device=device)
    return n / best_seconds(lambda: hf(tokens, use_cache=True), device, repeats=3)


@torch.inference_mode()
def hf_decode(hf, vocab: int, prompt_len: int, new: int, device: torch.device, warm_new: int) -> dict:
    """transformers' cached greedy loop (what generate() runs, minus its logits processors)."""
    import inspect

    prompt = torch.tensor([prompt_of(prompt_len, vocab, seed=1)], device=device)
    # transformers 5.2x renamed past_key_values to cache (the old name still works, more slowly)
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def greedy(n):
        sync(device)
        start = time.perf_counter()
        out = hf(prompt, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = [token.item()]
        first = time.perf_counter()
        for _ in range(n - 1):
            cache = out.get(name)
            out = hf(token, **{name: cache if cache is not None else out.past_key_values}, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids.append(token.item())
        sync(device)
        end = time.perf_counter()
        return (n - 1) / (end - first), end - start, ids

    greedy(warm_new)
    runs = [greedy(new) for _ in range(2)]
    return dict(decode_tokens_per_second=max(r[0] for r in runs), e2e_seconds=min(r[1] for r in runs),
                tokens=runs[-1][2])


@torch.inference_mode()
def hf_generate(hf, vocab: int, prompt_len: int, new: int, device: torch.device, warm_new: int) -> dict:
    prompt = torch.tensor([prompt_of(prompt_len, vocab, seed=1)], device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    hf.generate(prompt, max_new_tokens=warm_new, min_new_tokens=warm_new, **kwargs)
    seconds = best_seconds(lambda: hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kwargs),
                           device, repeats=2)
    return dict(e2e_seconds=seconds)


@torch.inference_mode()
def logits_check(ours, hf, config: ModelConfig, n: int, device: torch.device) -> dict:
    """Same weights? Prefill logits of ours and transformers on the same prompt."""
    tokens = torch.tensor([prompt_of(n, config.vocab_size)], device=device)
    a, b = ours(tokens).float(), hf(tokens).logits.float()
    return dict(max_abs_diff=float((a - b).abs().max()), max_abs_logit=float(b.abs().max()),
                argmax_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()))


# ------------------------------------------------------------------ one config
def timed(results: dict, variant: str, fn, label: str) -> None:
    """results[variant] = fn()'s numbers and its wall time, logged; an error is recorded, not raised
    (one broken variant must not hide the others' numbers)."""
    start = time.perf_counter()
    try:
        results[variant] = fn()
    except Exception as e:
        results[variant] = {"error": f"{type(e).__name__}: {e}"[:500]}
    results[variant]["wall_seconds"] = round(time.perf_counter() - start, 2)
    log(f"{label}: {variant}: { {k: v for k, v in results[variant].items() if k != 'tokens'} }")


def bench_config(name: str, config: ModelConfig, args, device: torch.device, dtype: torch.dtype) -> dict:
    from llama3.fast import speed_up

    results: dict[str, dict] = {}
    start = time.perf_counter()
    model = build_ours(config, device, dtype, args.seed)
    hf = build_transformers(model, config, device, dtype)
    log(f"{name}: built ours and transformers in {time.perf_counter() - start:.1f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    check = logits_check(model, hf, config, min(args.prefill, 128), device)
    log(f"{name}: logits check {check}")

    def record(variant, fn):
        timed(results, variant, fn, name)

    def ours_variant():
        return dict(prefill_tokens_per_second=ours_prefill(model, config, args.prefill, device, dtype),
                    **ours_decode(model, config, args.prompt, args.new, device, args.warm))

    record("transformers", lambda: dict(prefill_tokens_per_second=hf_prefill(hf, config.vocab_size, args.prefill, device),
                                        **hf_decode(hf, config.vocab_size, args.prompt, args.new, device, args.warm)))
    record("transformers-generate", lambda: hf_generate(hf, config.vocab_size, args.prompt, args.new, device, args.warm))
    del hf
    record("ours-plain", ours_variant)
    speed_up(model)
    record("ours-fused", ours_variant)
    if args.compile:
        plain_model = model

        def compiled_variant():
            nonlocal model
            started = time.perf_counter()
            plain_model.__dict__.pop("forward", None)  # torch.compile makes its own graphs of model.py's forward
            model = torch.compile(plain_model, mode=args.compile_mode, dynamic=args.dynamic)
            # warm-up at full length, twice: every prompt and cache length the timed runs will see,
            # after the recompiles that mark sizes dynamic
            for _ in range(2):
                ours_decode(model, config, args.prompt, args.new, device, args.new)
                ours_prefill(model, config, args.prefill, device, dtype)
            warm = time.perf_counter() - started
            log(f"{name}: compiled ({args.compile_mode}) and warmed up in {warm:.1f} s")
            result = dict(compile_and_warmup_seconds=round(warm, 1), mode=args.compile_mode,
                          prefill_tokens_per_second=ours_prefill(model, config, args.prefill, device, dtype),
                          **ours_decode(model, config, args.prompt, args.new, device, args.warm))
            from torch._dynamo.utils import counters

            result.update(unique_graphs=counters["stats"]["unique_graphs"],
                          graph_breaks={" ".join(reason.split())[:300]: n for reason, n in counters["graph_break"].items()})
            return result

        record("ours-compiled", compiled_variant)
        model = plain_model
        speed_up(model)  # its CUDA graphs back (fusing again changes nothing)
    if args.static:
        record("ours-static", lambda: static_decode(model, config, args, device, dtype))
    speed_up(model, quantize="int8")
    record("ours-int8", ours_variant)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    ratios = {}
    peer = results.get("transformers", {})
    for variant, r in results.items():
        if not variant.startswith("ours") or "error" in r or "error" in peer:
            continue
        ratios[variant] = dict(prefill=r["prefill_tokens_per_second"] / peer["prefill_tokens_per_second"],
                               decode=r["decode_tokens_per_second"] / peer["decode_tokens_per_second"],
                               e2e=peer["e2e_seconds"] / r["e2e_seconds"])
    same_tokens = {v: r.get("tokens") == peer.get("tokens") for v, r in results.items()
                   if v.startswith("ours") and "tokens" in r and "tokens" in peer}
    for r in results.values():
        r.pop("tokens", None)
    return dict(config=config.to_dict(), logits_check=check, greedy_tokens_equal_transformers=same_tokens,
                results=results, ratios=ratios)


# ------------------------------------------------------------------ per batch size (--batches)
def batch_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [prompt_of(length, vocab, seed=1 + row) for row in range(batch)]


def ours_batch(model, prompts: list[list[int]], new: int, device: torch.device) -> dict:
    """The engine over B prompts at once: a warm-up run (the buckets' CUDA graphs are captured in it),
    then best of 2; decode rate from the engine's own per-row timers."""
    from llama3.fast.graph import graphs_of

    settings = GenerationSettings(max_new_tokens=new)
    engine = Engine.sized_for(model, None, prompts, settings, step_tokens=max(256, sum(map(len, prompts))))
    if device.type != "cuda":  # as PagedKVCache makes it on a GPU: a padded step reads whole blocks
        engine.cache.k.zero_()
        engine.cache.v.zero_()
    try:
        engine.run(prompts, settings)
        best = dict(decode_tokens_per_second=0.0, e2e_seconds=math.inf)
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            results = engine.run(prompts, settings)
            sync(device)
            e2e = time.perf_counter() - start
            assert all(r.completion_tokens == new for r in results), "every row makes all its tokens"
            decode = sum(r.decode_steps for r in results) / max(r.decode_seconds for r in results)
            if decode > best["decode_tokens_per_second"]:
                best = dict(decode_tokens_per_second=decode, e2e_seconds=e2e, tokens=[r.token_ids for r in results])
    finally:
        engine.close()
    graphs = graphs_of(model)
    best.update(path=type(graphs).__name__ if graphs is not None else "eager",
                captures=getattr(graphs, "captures", 0), replays=getattr(graphs, "replays", 0),
                padded_steps=getattr(graphs, "padded_steps", 0))
    return best


def hf_batch(hf, prompts: list[list[int]], new: int, device: torch.device, compiled: bool, args) -> dict:
    """transformers' generate() over the same B prompts (greedy, exactly `new` tokens), eager or with
    its static cache compiled; decode rate from a streamer's timestamps (generate reads each step's
    tokens to the host before it calls put)."""
    from transformers import CompileConfig
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # the prompt first, then one call a step
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(prompts, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                  pad_token_id=0, eos_token_id=None)
    if compiled:
        backend = args.hf_backend or ("inductor" if device.type == "cuda" else "eager")
        config = CompileConfig(backend=backend, mode=args.compile_mode if backend == "inductor" else None)
        if device.type != "cuda":
            config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        kwargs.update(cache_implementation="static", compile_config=config)
    else:
        kwargs.update(disable_compile=True)
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(2 if compiled else 1):  # compiled: compiles, then records its graphs
            hf.generate(ids, **kwargs)
        sync(device)
        warm = time.perf_counter() - started
        best = dict(decode_tokens_per_second=0.0, e2e_seconds=math.inf)
        for _ in range(2):
            stamps = Stamps()
            sync(device)
            start = time.perf_counter()
            out = hf.generate(ids, streamer=stamps, **kwargs)
            sync(device)
            e2e = time.perf_counter() - start
            assert out.shape == (len(prompts), ids.shape[1] + new) and len(stamps.times) == new + 1
            decode = len(prompts) * (new - 1) / (stamps.times[new] - stamps.times[1])
            if decode > best["decode_tokens_per_second"]:
                best = dict(decode_tokens_per_second=decode, e2e_seconds=e2e, tokens=out[:, ids.shape[1]:].tolist())
    best["warmup_seconds"] = round(warm, 1)
    if compiled:
        best["compile"] = dict(backend=backend, mode=config.mode)
    return best


def bench_batches(name: str, config: ModelConfig, args, device: torch.device, dtype: torch.dtype,
                  save=None) -> dict:
    """One row per batch size: ours and each peer of --peers on the same prompts and weights;
    save(result so far) after each row, so a timeout keeps the rows measured."""
    from llama3.fast import speed_up

    model = build_ours(config, device, dtype, args.seed)
    hf = build_transformers(model, config, device, dtype) if args.peers else None
    speed_up(model)
    if device.type != "cuda":  # a dry run: the CUDA path's padded steps and device sampling, without capture
        from llama3.fast.cuda_decode import CudaGraphs

        model.forward = CudaGraphs(model, capture=False)
    from llama3.fast.plan import plan_of

    log(f"{name}: ours runs {plan_of(model)}")
    rows = {}
    for batch in args.batches:
        prompts = batch_prompts(batch, args.prompt, config.vocab_size)
        row = rows[str(batch)] = {}

        def record(variant, fn):
            timed(row, variant, fn, f"{name} batch {batch}")

        if "ours" in args.variants:
            record("ours", lambda: ours_batch(model, prompts, args.new, device))
        for peer in args.peers:
            record(peer, lambda: hf_batch(hf, prompts, args.new, device, peer == "transformers-compiled", args))
        ours = row.get("ours", {})
        for peer in args.peers:
            if "tokens" in ours and "tokens" in row[peer]:
                row[peer]["greedy_rows_equal_ours"] = sum(a == b for a, b in zip(ours["tokens"], row[peer]["tokens"]))
        for r in row.values():
            r.pop("tokens", None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if save is not None:
            save(dict(config=config.to_dict(), batches=rows))
    return dict(config=config.to_dict(), batches=rows)


def batch_table(reports: list[dict]) -> str:
    """Markdown: one row per (config, batch size), ratios ours / peer within the run(s)."""
    merged: dict[str, dict[str, dict]] = {}
    for report in reports:
        for name, c in report["configs"].items():
            for batch, row in c["batches"].items():
                merged.setdefault(name, {}).setdefault(batch, {}).update(row)
    first = reports[0]
    lines = []
    for name, batches in merged.items():
        lines += [f"### {name}: decode per batch size ({first['dtype']}, {first['device_name']}, "
                  f"prompt {first['settings']['prompt']}, {first['settings']['new']} new tokens each)", "",
                  "| batch | ours tok/s | transformers tok/s | compiled transformers tok/s | ours / transformers "
                  "| ours / compiled | e2e s: ours, transformers, compiled | transformers' greedy rows equal ours |",
                  "|---|---|---|---|---|---|---|---|"]
        for batch, row in sorted(batches.items(), key=lambda kv: int(kv[0])):
            def rate(variant):
                r = row.get(variant)
                if r is None:
                    return None, "-"
                if "error" in r:
                    return None, "error: " + r["error"][:60]
                return r["decode_tokens_per_second"], f"{r['decode_tokens_per_second']:,.0f}"

            (ours, ours_s), (tf, tf_s), (comp, comp_s) = rate("ours"), rate("transformers"), rate("transformers-compiled")
            e2e = ", ".join(f"{row[v]['e2e_seconds']:.2f}" if v in row and "e2e_seconds" in row[v] else "-"
                            for v in ("ours", "transformers", "transformers-compiled"))
            equal = ", ".join(f"{short} {row[v]['greedy_rows_equal_ours']}/{batch}"
                              for v, short in (("transformers", "eager"), ("transformers-compiled", "compiled"))
                              if "greedy_rows_equal_ours" in row.get(v, {}))
            lines.append(f"| {batch} | {ours_s} | {tf_s} | {comp_s} | "
                         f"{f'{ours / tf:.2f}' if ours and tf else '-'} | {f'{ours / comp:.2f}' if ours and comp else '-'} "
                         f"| {e2e} | {equal or '-'} |")
        lines.append("")
    lines.append("tok/s: decode tokens per second of all rows together; ratio > 1 means ours is faster.")
    return "\n".join(lines)


# ------------------------------------------------------------------ report
def table(report: dict) -> str:
    rows = []
    for name, c in report["configs"].items():
        rows += [f"### {name} ({report['dtype']}, {report['device_name']})", "",
                 "| variant | prefill tok/s | decode tok/s | e2e s | prefill x | decode x | e2e x |",
                 "|---|---|---|---|---|---|---|"]
        for variant, r in c["results"].items():
            if "error" in r:
                rows.append(f"| {variant} | error: {r['error'][:120]} | | | | | |")
                continue
            ratio = c["ratios"].get(variant)
            cells = [f"{r['prefill_tokens_per_second']:,.0f}" if "prefill_tokens_per_second" in r else "-",
                     f"{r['decode_tokens_per_second']:,.1f}" if "decode_tokens_per_second" in r else "-",
                     f"{r['e2e_seconds']:.3f}"]
            cells += [f"{ratio[k]:.2f}" for k in ("prefill", "decode", "e2e")] if ratio else ["-", "-", "-"]
            rows.append(f"| {variant} | " + " | ".join(cells) + " |")
        chk = c["logits_check"]
        rows += ["", f"logits ours vs transformers: max |Δ| {chk['max_abs_diff']:.3g} of max |logit| "
                     f"{chk['max_abs_logit']:.3g}, argmax agreement {chk['argmax_agreement']:.0%}; "
                     f"greedy tokens equal: {c['greedy_tokens_equal_transformers']}", ""]
    rows.append("x = ours / transformers (e2e: transformers seconds / ours seconds); > 1 means ours is faster.")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--tiny", action="store_true", help="a tiny config and a few tokens (checks the script)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--warm", type=int, default=8, help="new tokens of the warm-up generation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time fused + torch.compile")
    parser.add_argument("--static", action="store_true",
                        help="also time llama3.fast.static (fixed-address cache, CUDA graphs)")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--dynamic", default=None, type=lambda s: {"true": True, "false": False}.get(s.lower()),
                        help="torch.compile dynamic= (true/false; default: torch's automatic choice)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes: the per-batch decode table")
    parser.add_argument("--peers", default="transformers",
                        help="with --batches: comma-separated from transformers, transformers-compiled (or none)")
    parser.add_argument("--variants", default="ours", help="with --batches: 'ours' or none (peers only)")
    parser.add_argument("--hf-backend", default=None,
                        help="torch.compile backend for transformers-compiled (default inductor on CUDA, eager elsewhere)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="print one per-batch table from these --batches reports and exit")
    args = parser.parse_args()
    if args.merge:
        reports = [json.loads(Path(f).read_text()) for f in args.merge if Path(f).is_file()]
        if not reports:
            raise SystemExit(f"none of {', '.join(args.merge)} exists; run with --batches --out first")
        print(batch_table(reports))
        return
    args.peers = [p for p in args.peers.split(",") if p and p != "none"]
    args.variants = [v for v in args.variants.split(",") if v and v != "none"]
    for peer in args.peers:
        if peer not in ("transformers", "transformers-compiled"):
            raise SystemExit(f"unknown peer {peer!r}; choose transformers, transformers-compiled or none")
    if args.batches:
        try:
            args.batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            raise SystemExit(f"--batches {args.batches!r}: give whole numbers, e.g. 1,8,32") from None

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; pass --device cpu (with --tiny) to check the script")
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        configs = TINY
        args.prefill, args.prompt, args.new, args.warm = min(args.prefill, 32), min(args.prompt, 4), min(args.new, 8), 2
    else:
        configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    import transformers

    report = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, transformers=transformers.__version__, dtype=args.dtype,
                  settings=dict(prefill=args.prefill, prompt=args.prompt, new=args.new, compile=args.compile,
                                compile_mode=args.compile_mode if args.compile else None, seed=args.seed),
                  configs={})
    torch.manual_seed(args.seed)
    if args.batches:
        report["settings"].update(batches=args.batches, peers=args.peers, variants=args.variants)
    def save(name, result):
        report["configs"][name] = result
        if args.out:  # after each config (and batch row), so a timeout keeps what was measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            temporary = Path(args.out).with_suffix(".tmp")
            temporary.write_text(json.dumps(report, indent=2) + "\n")
            temporary.replace(args.out)

    for name, config in configs.items():
        if args.batches:
            save(name, bench_batches(name, config, args, device, dtype, lambda result: save(name, result)))
        else:
            save(name, bench_config(name, config, args, device, dtype))
    print(batch_table([report]) if args.batches else table(report))


if __name__ == "__main__":
    main()
