"""Many clients at once: our server (the engine) against llama.cpp's `llama-server --parallel N`.

    python benchmarks/serve_concurrency.py [--clients 1,4,8,16] [--new 128] [--threads 2]
        [--llama-server /work/peers/build/bin/llama-server | --skip-peer] [--quantize int4] [--out results.json]

Both servers serve the same GGUF (the embedded SmolLM2-135M-Instruct Q4_1; ours reads its
Q4_1 blocks as int4 groups) on the same number of threads and stay up for the whole run.
For each client count N, N streaming clients POST /v1/completions at once, each with its
own prompt, greedy, `max_tokens` --new; ours and the peer take turns (ours, peer, ours,
peer, ... with --rounds), so a slow stretch of the shared machine hits both.  Reported per
server and N: aggregate decode tokens/s (completion tokens of all clients / wall time from
the first request to the last token), p95 request latency and p95 time to first token.

Then, in this process, over the same model and engine (`llama3.engine`):
  * time to first token of turn 5 of a chat whose earlier turns are ~1,500 tokens, with the
    prefix cache (turns 1-4 sent before, as a chat client does) and without it;
  * KV blocks held by 32 short prompts against one.
`uptime` is recorded before and after.  Ends with the results as markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow", "a dragon who hated gold", "an old map",
          "a clock that ran backwards", "a small bakery", "the last train", "a talking cat", "a desert city",
          "a broken violin", "the moon's twin", "a library at night", "a garden on Mars", "a silent river",
          "a paper boat"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become healthy in {timeout:.0f} s")


def one_client(url: str, prompt: str, new: int, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                first = first or time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    out.update(latency=end - start, ttft=(first or end) - start, end=end, start=start,
               tokens=usage["completion_tokens"] if usage else chunks)


def crowd(url: str, n: int, new: int, offset: int) -> dict:
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=one_client, args=(url, f"Write a long story about {TOPICS[(offset + i) % 16]}."
                                                         f" Chapter {i + 1}:", new, results[i])) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)

    def p95(values):
        return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]

    return {"clients": n, "tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1),
            "p95_latency_s": round(p95([r["latency"] for r in results]), 2),
            "p95_ttft_s": round(p95([r["ttft"] for r in results]), 2)}


def chat_prefix_ttft(llm, quantized_engine_config) -> dict:
    """TTFT of turn 5 after four turns of ~1,500 tokens in all, with and without the prefix cache."""
    from llama3.engine import Engine
    from llama3.generate import GenerationSettings

    filler = ("The history of the valley is long. Farmers came first, then traders, then the railway, and each "
              "left roads, songs and arguments behind them that the town still keeps. ")
    turns = [(f"Question {i}: tell me about part {i} of the valley's history.", filler * 10) for i in range(4)]
    messages = [{"role": "system", "content": "You are a patient historian."}]
    for question, reply in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    earlier = len(llm.tokenizer.encode_chat(messages, add_generation_prompt=False))
    one = GenerationSettings(max_new_tokens=1)
    out = {"earlier_turn_tokens": earlier}
    for cached in (True, False):
        engine = Engine(llm.model, llm.tokenizer, quantized_engine_config(prefix_cache=cached))
        for k in range(1, 5):  # the client sent turns 1..4 before (their prompts and answers)
            history = messages[:1 + 2 * k]
            engine.run([llm.tokenizer.encode_chat(history, add_generation_prompt=False)], one)
        best = None
        for attempt in range(3):  # a new last question each time: only turns 1-4 are ever cached
            final = messages + [{"role": "user", "content": f"Now summarise all of it in {attempt + 1} sentences."}]
            ids = llm.tokenizer.encode_chat(final, add_generation_prompt=True)
            start = time.perf_counter()
            stream = engine.stream([ids], one)
            next(iter(stream))
            ttft = time.perf_counter() - start
            best = ttft if best is None else min(best, ttft)
            for _ in stream:
                pass
        out["ttft_cached_s" if cached else "ttft_uncached_s"] = round(best, 3)
        out["cached_tokens" if cached else "uncached_cached_tokens"] = stream.results[0].cached_tokens
        engine.close()
    out["ratio"] = round(out["ttft_cached_s"] / out["ttft_uncached_s"], 3)
    return out


def kv_per_prompt(llm, config) -> dict:
    from llama3.engine import Engine
    from llama3.generate import GenerationSettings

    def blocks(n):
        engine = Engine(llm.model, llm.tokenizer, config(prefix_cache=False, parallel=32, step_tokens=2048))
        prompts = [llm.tokenizer.encode(f"Short prompt {i}.") for i in range(n)]
        engine.submit(prompts, GenerationSettings(max_new_tokens=2), lambda event: None)  # still held after one step
        engine.step()
        used = engine.stats()["kv_blocks_used"]
        block_bytes = engine.cache.k[0, 0].numel() * 2 * engine.cache.k.shape[0] * engine.cache.k.element_size()
        return used, used * block_bytes  # k[0, 0]: one block of one layer, [Hkv, block_size, Dh]

    (one, one_bytes), (many, many_bytes) = blocks(1), blocks(32)
    from llama3.engine.paged_cache import bytes_per_token

    context = llm.model.config.max_seq_len
    return {"blocks_1": one, "blocks_32": many, "ratio": round(many / one, 2), "bytes_1": one_bytes,
            "bytes_32": many_bytes, "context": context,
            "context_bytes_32": 32 * context * bytes_per_token(llm.model.config, engine_dtype(llm))}


def engine_dtype(llm):
    import torch

    return llm.model.dtype if llm.model.dtype.is_floating_point else torch.float32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--llama-server", default="/work/peers/build/bin/llama-server")
    parser.add_argument("--peer", action="append", default=None, metavar="THREADS:CLIENTS",
                        help="a llama-server run: its thread count and client counts, e.g. 2:1,8 (repeatable; "
                             "default: --threads with every --clients count)")
    parser.add_argument("--skip-peer", action="store_true",
                        help="measure ours only (also when --llama-server does not exist)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.skip_peer and not os.path.exists(args.llama_server):
        print(f"note: {args.llama_server} does not exist; measuring ours only (build the peer, or "
              "pass --llama-server)", file=sys.stderr)
        args.skip_peer = True
    counts = [int(c) for c in args.clients.split(",")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(args.threads)}
    gguf = subprocess.run([sys.executable, "-c", "from llama3.llm import resolve_source; print(resolve_source(None))"],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    report = {"uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "gguf": gguf, "threads": args.threads, "new_tokens": args.new, "runs": []}
    peers = [(int(p.split(":")[0]), [int(c) for c in p.split(":")[1].split(",")]) for p in args.peer] \
        if args.peer else [(args.threads, counts)]
    if args.skip_peer:
        peers = []
    ports = {"ours": free_port()}
    servers = {"ours": subprocess.Popen([sys.executable, "-m", "llama3", "serve", "--port", str(ports["ours"]),
                                         "--quantize", args.quantize, "--parallel", str(max(counts)),
                                         "--kv-memory", "1GB"], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)}
    for threads, _ in peers:  # llama.cpp's server: continuous batching on, one slot per client
        name = f"llama-server-t{threads}"
        ports[name] = free_port()
        servers[name] = subprocess.Popen([args.llama_server, "-m", gguf, "-t", str(threads), "-tb", str(threads),
                                          "--parallel", str(max(counts)), "-c", str(max(counts) * 512), "-cb",
                                          "--port", str(ports[name])],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        for name, process in servers.items():
            wait_healthy(urls[name], process)
            crowd(urls[name], 1, 8, 0)  # warm-up
        for round_ in range(args.rounds):
            for n in counts:
                names = ["ours"] + [f"llama-server-t{t}" for t, peer_counts in peers if n in peer_counts]
                for name in names:
                    row = {"server": name, "round": round_, **crowd(urls[name], n, args.new, round_ + n)}
                    print(json.dumps(row), flush=True)
                    report["runs"].append(row)
    finally:
        for process in servers.values():
            process.terminate()
            process.wait(30)
    torch_threads(args.threads)
    from llama3.engine import EngineConfig
    from llama3.fast import load_fast

    llm = load_fast(None, quantize=args.quantize)
    config = lambda **kw: EngineConfig(kv_memory="1GB", **kw)  # noqa: E731
    report["chat_turn5"] = chat_prefix_ttft(llm, config)
    print(json.dumps(report["chat_turn5"]), flush=True)
    report["kv_32_vs_1"] = kv_per_prompt(llm, config)
    print(json.dumps(report["kv_32_vs_1"]), flush=True)
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(report["uptime_before"], "|", report["uptime_after"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print()
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    """The three results as ready-to-paste markdown tables (medians over rounds)."""
    runs = report["runs"]
    names = sorted({r["server"] for r in runs}, key=lambda name: name != "ours")
    counts = sorted({r["clients"] for r in runs})

    def median(name, n, key):
        values = [r[key] for r in runs if r["server"] == name and r["clients"] == n]
        return statistics.median(values) if values else None

    lone = median("ours", counts[0], "tok_s")
    head = ["clients"] + [f"{name} {what}" for name in names for what in ("tok/s", "p95 latency s", "p95 TTFT s")]
    head += [f"ours / {counts[0]} client{'s' if counts[0] > 1 else ''}"] + [f"ours / {name}" for name in names[1:]]
    lines = [f"{report['gguf'].rsplit('/', 1)[-1]}, {report['threads']} threads, {report['new_tokens']} new tokens "
             f"per client, greedy, streaming; uptime before: {report['uptime_before']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in counts:
        cells = [str(n)]
        for name in names:
            cells += [f"{v:.1f}" if isinstance(v, float) and key == "tok_s" else (f"{v:.2f}" if v is not None else "-")
                      for key in ("tok_s", "p95_latency_s", "p95_ttft_s") for v in [median(name, n, key)]]
        ours = median("ours", n, "tok_s")
        cells.append(f"{ours / lone:.2f}" if ours and lone else "-")
        for name in names[1:]:
            peer = median(name, n, "tok_s")
            cells.append(f"{ours / peer:.2f}" if ours and peer else "-")
        lines.append("| " + " | ".join(cells) + " |")
    chat = report.get("chat_turn5")
    if chat:
        lines += ["", "| earlier turns (tokens) | reused from the prefix cache | TTFT turn 5, cache on (s) | "
                      "cache off (s) | on / off |", "|---|---|---|---|---|",
                  f"| {chat['earlier_turn_tokens']} | {chat['cached_tokens']} | {chat['ttft_cached_s']:.3f} | "
                  f"{chat['ttft_uncached_s']:.3f} | {chat['ratio']:.3f} |"]
    kv = report.get("kv_32_vs_1")
    if kv:
        lines += ["", "| prompts held | KV blocks | KV bytes | x one prompt |", "|---|---|---|---|",
                  f"| 1 | {kv['blocks_1']} | {kv['bytes_1']:,} | 1.00 |",
                  f"| 32 | {kv['blocks_32']} | {kv['bytes_32']:,} | {kv['ratio']:.2f} |",
                  f"| 32 x the whole context ({kv['context']:,} positions), reserved up front | - | "
                  f"{kv['context_bytes_32']:,} | {kv['context_bytes_32'] / kv['bytes_1']:.0f} |"]
    return "\n".join(lines)


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


if __name__ == "__main__":
    sys.exit(main())
