"""One client alone: how fast the engine decodes a lone request, against `llama3 bench`'s decode
(the one-batch TokenGeneration over a contiguous KVCache) on the same model and threads, in one
process, rounds alternating so a busy machine slows them alike.

    python benchmarks/engine_lone_client.py [--rounds 3] [--new 128] [--context 16,1000] [--threads 2]
    python benchmarks/engine_lone_client.py --serve      # also one streaming client of `llama3 serve`
    python benchmarks/engine_lone_client.py --serve --compare-interval 0   # and events handed over one by one

Per prompt length (--context: random token ids, as `llama3 bench` uses) and round, decode
tokens/s (from the first new token to the last, so prefill is not in it) of:
    bench     llama3.fast.measure's decode: TokenGeneration, contiguous KVCache
    gather    the engine reading keys side by side (the way before paged_attend)
    engine    the engine attending in the blocks (llama3/fast/paged_attention.cpp)
(the engine rows with the tokenizer making text as the server does, the stop ids banned by
logit_bias so every run makes --new tokens)
    served    (--serve) one streaming client of `llama3 serve` (a subprocess: --quantize, 1 GB of
              KV, no prefix cache, OMP_NUM_THREADS=--threads), POST /v1/completions with the same
              token ids, greedy, streamed; usage's completion tokens over first to last chunk
Also CPU milliseconds per new token of the whole request (every thread of the process that runs
it: this process for bench and the engine, the server's for served), which a busy machine disturbs less
than wall time.  And the share of each request's kernel calls that the kernels' thread pool ran on
one thread (llama3/fast/threads.h: it falls back to the calling thread alone while a worker loses
time, i.e. while another process has a core; the server's from its /metrics): on this 2-core VM a
request's speed swings +-40% with it, so the medians are also given over the quiet rounds only
(bench, engine and served each <= 5% on one thread).  Ratios are within one round.  Prints markdown
tables at the end (medians).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from llama3.engine import Engine, EngineConfig
from llama3.fast import kernels, load_fast
from llama3.fast.measure import prompt_of
from llama3.generate import GenerationSettings, generate_tokens


def in_a_thread(fn):
    """fn() run in a fresh thread (see bench_decode: the main thread's OpenMP team is not what the
    engine's thread gets)."""
    import threading

    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def bench_decode(model, prompt, new: int) -> tuple[float, float]:
    """(decode tokens/s, CPU ms per new token of the whole request) of `llama3 bench`'s decode:
    TokenGeneration's decode seconds per step, run in a fresh thread
    as the engine runs in its own: on a busy 2-core machine, 2 OpenMP threads driven from the
    main thread decoded at 0.5-3 tok/s where a new thread's (or 1 thread) did ~30 (measured
    2026-12-02, load 10-13), so comparing the main thread with the engine's thread measures that."""
    def run_it():
        cpu, tokens = cpu_seconds(), 0
        run = generate_tokens(model, [prompt], GenerationSettings(max_new_tokens=new))
        for _ in run:
            tokens += 1
        return run.decode_steps / run.decode_seconds, 1000 * (cpu_seconds() - cpu) / tokens

    return in_a_thread(run_it)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, every thread) of this process or of process `pid`."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_decode(engine: Engine, prompt, settings: GenerationSettings, in_blocks: bool) -> tuple[float, float]:
    """(decode tokens/s, CPU ms per new token of the whole request) of one request alone in the
    engine (with the tokenizer: text pieces are made as the server makes them); tokens/s from
    its first new token to its last."""
    engine.cache.attend_in_blocks = in_blocks
    try:
        cpu = cpu_seconds()
        result = engine.run([prompt], settings)[0]
        return result.decode_tokens_per_second, 1000 * (cpu_seconds() - cpu) / result.completion_tokens
    finally:
        engine.cache.attend_in_blocks = True


@torch.inference_mode()
def step_milliseconds(llm, engine: Engine, prompt, repeats: int) -> dict:
    """The fastest of `repeats` single decoding steps after `prompt` (a busy machine only ever
    slows a step down, so the minimum is the step's own cost): model.py's forward over the
    contiguous KVCache (bench's step), the engine's forward reading keys side by side (gather)
    and attending in the blocks (engine).  The same position is rewritten each time."""
    from llama3.model import KVCache

    model, n = llm.model, len(prompt)
    cache = KVCache(model.config, 1, n + 1, dtype=model.dtype if model.dtype.is_floating_point else torch.float32)
    model(torch.tensor([prompt]), 0, cache, last_only=True)
    token = torch.tensor([[prompt[-1]]])
    table = engine.pool.allocate_many(-(-(n + 1) // engine.pool.block_size))
    engine.forward(torch.tensor([prompt]), [(table, 0, n)], [n - 1])

    def best(fn) -> tuple[float, float]:  # (wall ms, CPU ms of every thread), fastest of repeats
        walls, cpus = [], []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        return 1000 * min(walls), 1000 * min(cpus)

    out = {}
    out["bench"], out["bench cpu"] = best(lambda: model(token, n, cache, last_only=True))
    engine.cache.attend_in_blocks = False
    out["gather"], out["gather cpu"] = best(lambda: engine.forward(token, [(table, n, n + 1)], [0]))
    engine.cache.attend_in_blocks = True
    out["engine"], out["engine cpu"] = best(lambda: engine.forward(token, [(table, n, n + 1)], [0]))
    for block in table:
        engine.pool.release(block)
    return out


class ServedClient:
    """`llama3 serve` in a subprocess and one streaming client of it."""

    def __init__(self, quantize: str, threads: int, stop_ids, stream_interval_ms: float | None = None):
        self.stop_ids = stop_ids
        import subprocess
        import sys

        from serve_concurrency import ROOT, free_port, wait_healthy

        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen([sys.executable, "-m", "llama3", "serve", "--port", self.url.rsplit(":", 1)[1],
                                         "--quantize", quantize, "--kv-memory", "1GB", "--no-prefix-cache"]
                                        + ([] if stream_interval_ms is None else
                                           ["--stream-interval", str(stream_interval_ms)]),
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.url, self.process)

    def decode_speed(self, prompt: list[int], new: int, temperature: float = 0.0, top_p: float = 1.0) -> float:
        import json

        import httpx

        body = {"prompt": prompt, "max_tokens": new, "temperature": temperature, "top_p": top_p, "seed": 1,
                "stream": True, "stream_options": {"include_usage": True},
                "logit_bias": {str(i): -100 for i in self.stop_ids}}
        first = last = None
        tokens = 0
        pool = self.kernel_calls()
        cpu = cpu_seconds(self.process.pid)
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
        cpu = 1000 * (cpu_seconds(self.process.pid) - cpu) / tokens
        calls, solo = (a - b for a, b in zip(self.kernel_calls(), pool))
        self.last_solo = solo / calls if calls else float("nan")  # the share of its kernel calls run on one thread
        return (tokens - 1) / (last - first), cpu

    def kernel_calls(self) -> tuple[float, float]:
        """The server's kernel-pool calls so far and those run on one thread (GET /metrics)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=30).text
        found = {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.samples}
        return found.get("llama3_kernel_calls", 0.0), found.get("llama3_kernel_calls_one_thread", 0.0)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--context", default="16,1000", help="prompt lengths, comma-separated (default 16,1000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--serve", action="store_true", help="also measure one streaming client of the server")
    def temperature_and_top_p(text: str) -> str:
        try:
            t, p = (float(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected T,P (two numbers, e.g. 0.7,0.9), got {text!r}") from None
        if t <= 0 or not 0 < p <= 1:
            raise argparse.ArgumentTypeError(f"temperature must be > 0 and top_p in (0, 1], got {text!r}")
        return text

    parser.add_argument("--sampled", default=None, metavar="T,P", type=temperature_and_top_p,
                        help="also a sampled request (temperature T, top_p P, seed 1) to the engine and, with "
                             "--serve, the server: rows 'engine T,P' and 'served T,P' (e.g. 0.7,0.9)")
    parser.add_argument("--compare-interval", type=float, default=None, metavar="MS",
                        help="also rows 'engine MSms' and 'served MSms': the engine and a second server handing "
                             "a stream's events over at most every MS ms (0: every event at once) instead of the "
                             "default --stream-interval")
    parser.add_argument("--step-repeats", type=int, default=40, help="single steps timed per context (default 40)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = load_fast(None, quantize=args.quantize)
    engine = Engine(llm.model, llm.tokenizer, EngineConfig(kv_memory="1GB", prefix_cache=False))
    server = ServedClient(args.quantize, args.threads, llm.tokenizer.stop_ids) if args.serve else None
    other = (ServedClient(args.quantize, args.threads, llm.tokenizer.stop_ids, args.compare_interval)
             if args.serve and args.compare_interval is not None else None)
    try:
        # the same work everywhere: no stop before --new tokens (the stop ids banned, as the server is asked)
        settings = GenerationSettings(max_new_tokens=args.new, logit_bias={i: -100.0 for i in llm.tokenizer.stop_ids})
        lengths = [int(n) for n in args.context.split(",")]
        prompts = {n: prompt_of(n, llm.model.config.vocab_size, seed=1) for n in lengths}
        bench_decode(llm.model, prompts[lengths[0]], 4)                                 # warm-up
        engine_decode(engine, prompts[lengths[0]], GenerationSettings(max_new_tokens=4), True)
        for client in (server, other):
            if client is not None:
                client.decode_speed(prompts[lengths[0]], 4)
        steps = in_a_thread(lambda: {n: step_milliseconds(llm, engine, prompts[n], args.step_repeats)
                                     for n in lengths})
        print(f"\nOne decoding step, fastest of {args.step_repeats}: wall ms (CPU ms of all threads):\n")
        print("| context | bench (KVCache) | gather | engine (paged_attend) | engine / bench | engine / gather |")
        print("|---|---|---|---|---|---|")
        for n, ms in steps.items():
            cell = lambda name: f"{ms[name]:.2f} ({ms[name + ' cpu']:.2f})"  # noqa: E731
            ratio = lambda a, b: f"{ms[a] / ms[b]:.2f} ({ms[a + ' cpu'] / ms[b + ' cpu']:.2f})"  # noqa: E731
            print(f"| {n} | {cell('bench')} | {cell('gather')} | {cell('engine')} | {ratio('engine', 'bench')} "
                  f"| {ratio('engine', 'gather')} |", flush=True)
        print()
        measure(args, llm, engine, server, settings, lengths, prompts, other)
    finally:
        for client in (server, other):
            if client is not None:
                client.close()


def engine_decode_at(engine: Engine, interval_s: float, *args) -> tuple[float, float]:
    """engine_decode with the engine handing events over at most every interval_s seconds."""
    default, engine.config.stream_interval = engine.config.stream_interval, interval_s
    try:
        return engine_decode(engine, *args)
    finally:
        engine.config.stream_interval = default


QUIET_SOLO = 0.05  # a round is quiet when no row ran more than this share of its kernel calls on one thread


def solo_share(run):
    """(run()'s result, the share of the kernels' calls its thread pool ran on the caller alone):
    the pool falls back to one thread while a worker loses time (llama3/fast/threads.h), so a
    request that ran mostly solo measured a busy machine, not the code."""
    kernels.thread_stats(reset=True)
    out = run()
    stats = kernels.thread_stats() or {}
    return out, stats.get("solo_jobs", 0) / max(1, stats.get("jobs", 0))


def measure(args, llm, engine, server, settings, lengths, prompts, other=None) -> None:
    results: dict[tuple[int, str], list[float]] = {}
    cpu: dict[str, float] = {}
    for r in range(args.rounds):
        for n in lengths:
            row, solo = {}, {}
            (row["bench"], cpu["bench"]), solo["bench"] = solo_share(lambda: bench_decode(llm.model, prompts[n], args.new))
            row["gather"], _ = engine_decode(engine, prompts[n], settings, False)
            (row["engine"], cpu["engine"]), solo["engine"] = solo_share(
                lambda: engine_decode(engine, prompts[n], settings, True))
            if server is not None:
                row["served"], cpu["served"] = server.decode_speed(prompts[n], args.new)
                solo["served"] = server.last_solo
            if args.compare_interval is not None:
                name = f"{args.compare_interval:g}ms"
                row["engine " + name], cpu["engine " + name] = engine_decode_at(
                    engine, args.compare_interval / 1000, prompts[n], settings, True)
                if other is not None:
                    row["served " + name], cpu["served " + name] = other.decode_speed(prompts[n], args.new)
            if args.sampled:
                t, p = (float(x) for x in args.sampled.split(","))
                sampled = dataclasses.replace(settings, temperature=t, top_p=p, seed=1)
                row[f"engine {args.sampled}"], cpu[f"engine {args.sampled}"] = engine_decode(engine, prompts[n],
                                                                                             sampled, True)
                if server is not None:
                    row[f"served {args.sampled}"], cpu[f"served {args.sampled}"] = server.decode_speed(
                        prompts[n], args.new, t, p)
            for name, value in row.items():
                results.setdefault((n, name), []).append(value)
            for name, value in cpu.items():
                results.setdefault((n, name + " cpu"), []).append(value)
            results.setdefault((n, "quiet"), []).append(all(v <= QUIET_SOLO for v in solo.values()))
            print(f"round {r}, prompt {n}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items())
                  + f" tok/s; engine/bench {row['engine'] / row['bench']:.2f}, engine/gather "
                  f"{row['engine'] / row['gather']:.2f}"
                  + (f", served/engine {row['served'] / row['engine']:.2f}, served/bench "
                     f"{row['served'] / row['bench']:.2f}" if server else "")
                  + "; CPU ms per token: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
                  + "; kernel calls on one thread: " + ", ".join(f"{k} {v:.0%}" for k, v in solo.items()), flush=True)
    names = ["bench", "gather", "engine"] + (["served"] if server else [])
    sampled = [f"engine {args.sampled}"] + ([f"served {args.sampled}"] if server else []) if args.sampled else []
    names += sampled
    if args.compare_interval is not None:
        names += [f"engine {args.compare_interval:g}ms"] + ([f"served {args.compare_interval:g}ms"] if other else [])
    print(f"\n{args.quantize} SmolLM2-135M, {args.threads} threads, {args.new} new tokens, "
          f"median of {args.rounds} rounds (ratios per round, then median)\n")
    print("| prompt tokens | " + " | ".join(f"{n} tok/s" for n in names) + " | engine / bench | engine / gather |"
          + (" served / engine |" if server else ""))
    print("|---" * (len(names) + 3 + bool(server)) + "|")
    for n in lengths:
        med = {name: statistics.median(results[(n, name)]) for name in names}
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(results[(n, a)], results[(n, b)]))  # noqa: E731
        print(f"| {n} | " + " | ".join(f"{med[name]:.1f}" for name in names)
              + f" | {ratio('engine', 'bench'):.2f} | {ratio('engine', 'gather'):.2f} |"
              + (f" {ratio('served', 'engine'):.2f} |" if server else ""))
    print("\nEach against bench, within a round (median):\n")
    others = [name for name in names if name != "bench"]
    print("| prompt tokens | " + " | ".join(f"{name} / bench" for name in others) + " |")
    print("|---" * (len(others) + 1) + "|")
    for n in lengths:
        print(f"| {n} | " + " | ".join(f"{statistics.median(x / y for x, y in zip(results[(n, name)], results[(n, 'bench')])):.2f}"
                                       for name in others) + " |")
    print(f"\nThe same, only rounds in which no row ran more than {QUIET_SOLO:.0%} of its kernel calls on one thread "
          "(the pool falls back to one while another process has a core):\n")
    print("| prompt tokens | quiet rounds | " + " | ".join(f"{name} / bench" for name in others) + " |")
    print("|---" * (len(others) + 2) + "|")
    for n in lengths:
        quiet = [i for i, yes in enumerate(results[(n, "quiet")]) if yes]
        cells = [f"{statistics.median(results[(n, name)][i] / results[(n, 'bench')][i] for i in quiet):.2f}"
                 if quiet else "-" for name in others]
        print(f"| {n} | {len(quiet)} of {args.rounds} | " + " | ".join(cells) + " |")
    print("\nCPU ms per new token (the whole request, every thread of the process that runs it):\n")
    print("| prompt tokens | bench | engine | engine / bench | " + ("served | served / engine | served / bench |"
                                                                  if server else ""))
    print("|---|---|---|---|" + ("---|---|---|" if server else ""))
    for n in lengths:
        per = lambda a, b: statistics.median(x / y for x, y in zip(results[(n, a + " cpu")], results[(n, b + " cpu")]))  # noqa: E731
        line = (f"| {n} | {statistics.median(results[(n, 'bench cpu')]):.1f} | "
                f"{statistics.median(results[(n, 'engine cpu')]):.1f} | {per('engine', 'bench'):.2f} |")
        if server:
            line += (f" {statistics.median(results[(n, 'served cpu')]):.1f} | {per('served', 'engine'):.2f} | "
                     f"{per('served', 'bench'):.2f} |")
        print(line)


if __name__ == "__main__":
    main()
