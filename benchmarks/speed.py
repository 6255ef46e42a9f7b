"""Inference speed side by side: ours, transformers and llama.cpp on the same weights and threads.

    python benchmarks/speed.py [--model SOURCE] [--threads 2] [--configs a,b,...] [--runs 1] [--out results.json]

Each configuration runs in its own subprocess, one after another, so each has
the machine to itself and its own peak RSS.  With --runs N the whole list runs N
times round-robin, in fresh processes each time, and each number is the best of
the N (on a shared VM a whole process can land in a slow stretch: the same
matrix products 1.8x slower for its whole life).  Every one reports load time,
prefill tokens/s (512 tokens, logits of the last position only: what generation asks of
a prompt, and what llama.cpp computes), time to first token (16-token prompt), decode
tokens/s (128 greedy tokens) and peak RSS.  The weights are exported once to
a work folder: a Hugging Face folder for transformers, F32/F16 GGUFs (our
writer) and Q8_0/Q4_1 (llama.cpp's own quantizer; for the embedded model, Q4_1 is
the shipped file itself) for llama.cpp.

Configurations:
    ours-fp32 ours-bf16 ours-int8 ours-int4
                                      llama3 with llama3.fast (fused projections, lean decode step; int8 =
                                      weight-only, per-row, read from the same Q8_0 file llama.cpp runs;
                                      int4 = the same Q4_1 file, the embedded model as shipped)
    hf-fp32 hf-bf16                   transformers LlamaForCausalLM, SDPA attention, a greedy loop
    llamacpp-f32 llamacpp-f16 llamacpp-q8_0 llamacpp-q4_1
                                      llama-cpp-python (`pip install -e .[bench]`); its own timers

Needs: transformers (dev extra) and llama-cpp-python (bench extra); a missing
peer is reported and skipped.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama3, however it is installed

CONFIGS = ["ours-fp32", "ours-bf16", "ours-int8", "ours-int4", "hf-fp32", "hf-bf16",
           "llamacpp-f32", "llamacpp-f16", "llamacpp-q8_0", "llamacpp-q4_1"]
PEER_OF = {"ours-fp32": ["hf-fp32", "llamacpp-f32"], "ours-bf16": ["hf-bf16", "llamacpp-f16"],
           "ours-int8": ["llamacpp-q8_0", "hf-fp32"], "ours-int4": ["llamacpp-q4_1", "hf-fp32"]}
PREFILL, PROMPT, NEW = 512, 16, 128


# --------------------------------------------------------------- preparation
def prepare(model: str | None, work: Path) -> None:
    """Export the weights once: HF folder, F32/F16 GGUF (ours), Q8_0 GGUF (llama.cpp's quantizer)."""
    import llama3

    work.mkdir(parents=True, exist_ok=True)
    llm = None
    if not (work / "hf" / "config.json").exists():
        llm = llm or llama3.load(model)
        llm.save(work / "hf", format="hf")
    for kind in ("f32", "f16"):
        if not (work / f"model-{kind}.gguf").exists():
            from llama3.checkpoint.gguf import write_gguf

            llm = llm or llama3.load(model)
            write_gguf(llm, work / f"model-{kind}.gguf", file_type=kind)
    q4 = work / "model-q4_1.gguf"
    if model is None and not q4.exists():  # the embedded model *is* a Q4_1 file: both sides run it as shipped
        from llama3.llm import resolve_source

        q4.symlink_to(resolve_source(None))
    try:
        import llama_cpp
    except ImportError:
        return
    for kind, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1)):
        target = work / f"model-{kind}.gguf"
        if target.exists():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        status = llama_cpp.llama_model_quantize(str(work / "model-f32.gguf").encode(), str(target).encode(), params)
        if status != 0:
            raise SystemExit(f"llama.cpp could not quantize to {kind.upper()} (status {status})")


# ---------------------------------------------------------- one configuration
def run_ours(model: str | None, work: Path, precision: str) -> dict:
    """int8 reads llama.cpp's Q8_0 file and int4 its Q4_1 file (the same quantized weights
    llama.cpp runs) when there is one."""
    from llama3.fast import load_fast
    from llama3.fast.measure import measure

    quantize = precision if precision in ("int8", "int4") else None
    quantized_file = work / {"int8": "model-q8_0.gguf", "int4": "model-q4_1.gguf"}.get(precision, "-")
    if quantized_file.exists():
        model = str(quantized_file)
    start = time.perf_counter()
    llm = load_fast(model, dtype="bfloat16" if precision == "bf16" else "float32", quantize=quantize)
    return measure(llm.model, time.perf_counter() - start, PREFILL, NEW).as_dict()


def run_hf(work: Path, precision: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from llama3.fast.measure import peak_rss_bytes, prompt_of

    start = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                                             attn_implementation="sdpa").eval()
    load = time.perf_counter() - start
    vocab = model.config.vocab_size

    @torch.inference_mode()
    def prefill_seconds(ids):
        start = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)  # the last position's, as generation asks
        return time.perf_counter() - start, out

    # transformers 5.2x renamed past_key_values to cache; the old name still works through a
    # deprecation wrapper on every layer, which costs time per token: use the current name.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def greedy(ids, n):  # the loop generate() runs, minus its logits processors: fair to transformers
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter()
        for _ in range(n - 1):
            out = model(token, **{name: out[name]}, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.item()
        return first, time.perf_counter()

    long_prompt = prompt_of(PREFILL, vocab)
    prefill_seconds(long_prompt)  # warm-up
    prefill = min(prefill_seconds(long_prompt)[0] for _ in range(3))
    short = prompt_of(PROMPT, vocab, seed=1)
    greedy(short, 8)  # warm-up
    ttft, per_token = float("inf"), float("inf")
    for _ in range(2):
        start = time.perf_counter()
        first, end = greedy(short, NEW)
        ttft, per_token = min(ttft, first - start), min(per_token, (end - first) / (NEW - 1))
    return dict(load_seconds=load, prefill_tokens=PREFILL, prefill_tokens_per_second=PREFILL / prefill,
                ttft_seconds=ttft, decode_tokens=NEW, decode_tokens_per_second=1 / per_token,
                peak_rss_bytes=peak_rss_bytes())


def run_llamacpp(work: Path, precision: str, threads: int) -> dict:
    import llama_cpp

    from llama3.fast.measure import peak_rss_bytes, prompt_of

    start = time.perf_counter()
    llm = llama_cpp.Llama(str(work / f"model-{precision}.gguf"), n_ctx=1024, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load = time.perf_counter() - start
    vocab = llm.n_vocab()

    def timings(ids, n_new):
        """llama.cpp's own timers: (prompt ms, prompt tokens, decode ms, decode tokens)."""
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        for i, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True)):
            if i + 1 >= n_new:
                break
        perf = llama_cpp.llama_perf_context(llm.ctx)
        return perf.t_p_eval_ms, perf.n_p_eval, perf.t_eval_ms, perf.n_eval

    long_prompt, short = prompt_of(PREFILL, vocab), prompt_of(PROMPT, vocab, seed=1)
    timings(long_prompt, 1)  # warm-up
    prefill = min(t / n for t, n, _, _ in (timings(long_prompt, 1) for _ in range(3))) / 1000
    timings(short, 8)        # warm-up
    runs = [timings(short, NEW) for _ in range(2)]
    ttft = min(t for t, _, _, _ in runs) / 1000
    per_token = min(t / n for _, _, t, n in runs) / 1000
    return dict(load_seconds=load, prefill_tokens=PREFILL, prefill_tokens_per_second=1 / prefill,
                ttft_seconds=ttft, decode_tokens=NEW, decode_tokens_per_second=1 / per_token,
                peak_rss_bytes=peak_rss_bytes())


def run_one(name: str, model: str | None, work: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    family, precision = name.split("-", 1)
    if family == "ours":
        return run_ours(model, work, precision)
    if family == "hf":
        return run_hf(work, precision)
    return run_llamacpp(work, precision, threads)


# ------------------------------------------------------------------- report
def versions() -> dict:
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "llama_cpp"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def table(results: dict[str, dict]) -> str:
    rows = ["| config | load s | prefill tok/s | TTFT ms | decode tok/s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | {r['error']} | | | | |")
            continue
        rows.append(f"| {name} | {r['load_seconds']:.2f} | {r['prefill_tokens_per_second']:.0f} | "
                    f"{r['ttft_seconds'] * 1000:.0f} | {r['decode_tokens_per_second']:.1f} | "
                    f"{r['peak_rss_bytes'] / 2**20:.0f} |")
    rows += ["", "| ours vs peer | decode | prefill | TTFT (peer / ours) | peak RSS |", "|---|---|---|---|---|"]
    for ours, peers in PEER_OF.items():
        for peer in peers:
            a, b = results.get(ours, {}), results.get(peer, {})
            if "decode_tokens_per_second" in a and "decode_tokens_per_second" in b:
                rows.append(f"| {ours} / {peer} | {a['decode_tokens_per_second'] / b['decode_tokens_per_second']:.2f}x | "
                            f"{a['prefill_tokens_per_second'] / b['prefill_tokens_per_second']:.2f}x | "
                            f"{b['ttft_seconds'] / a['ttft_seconds']:.2f}x | "
                            f"{a['peak_rss_bytes'] / b['peak_rss_bytes']:.2f}x |")
    return "\n".join(rows)


def best_of(a: dict | None, b: dict) -> dict:
    """Two runs of one configuration merged number by number: the higher tokens/s, the lower
    seconds and bytes (an error only where neither run gave numbers)."""
    if a is None or "error" in a:
        return b if a is None or "error" not in b else a
    if "error" in b:
        return a
    return {key: (max if key.endswith("per_second") else min)(a[key], b[key]) for key in a}


def main() -> int:
    global PREFILL, NEW
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="any llama3.load source (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--work", default="/tmp/llama3-bench", help="folder for the exported weights")
    parser.add_argument("--prefill-tokens", type=int, default=PREFILL)
    parser.add_argument("--new-tokens", type=int, default=NEW)
    parser.add_argument("--runs", type=int, default=1,
                        help="run the list this many times, round-robin, each config's best kept (default 1)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args()
    PREFILL, NEW = args.prefill_tokens, args.new_tokens
    work = Path(args.work)
    if args.one:
        print(json.dumps(run_one(args.one, args.model, work, args.threads)))
        return 0
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {CONFIGS}")
    prepare(args.model, work)
    results = {}
    for run in range(args.runs):
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads), "--work", str(work),
                   "--prefill-tokens", str(PREFILL), "--new-tokens", str(NEW)]
            cmd += ["--model", args.model] if args.model else []
            print(f"running {name} ({run + 1}/{args.runs}) ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            try:
                result = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                result = {"error": last[:120]}
            print(f"  {result}", file=sys.stderr, flush=True)
            results[name] = best_of(results.get(name), result)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "prefill_tokens": PREFILL,
              "new_tokens": NEW, "runs": args.runs, "machine": os.uname().machine,
              "load_average": os.getloadavg(), "versions": versions(), "results": results}
    print(table(results))
    print(f"\nthreads {args.threads}, load average before/after {report['load_average']}, {report['versions']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
