"""What a served stream's per-token hand-overs cost: one streaming client of `llama3 serve
--stream-interval MS` for each MS given, the server's CPU per new token split by thread, and
the client's own.

    python benchmarks/stream_interval.py [--intervals 20,0,20,0] [--requests 6] [--new 128] [--threads 2]

Each MS starts its own server (int4 embedded model, 1 GB of KV, no prefix cache,
OMP_NUM_THREADS=--threads), warms it with one request, then sends --requests greedy streamed
requests of a 16-token prompt one after another (stop ids banned, so each makes --new tokens).
Printed per server: decode tokens/s of each request (first to last text chunk), the CPU ms
per new token of each of the server's threads (/proc/PID/task: the engine's thread, the
kernels' pool worker, the event loop) and of this process (the client).  On 2 cores the
decoding takes both, so the event loop's and the client's CPU per token is time the decoding
threads lose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_concurrency import ROOT, free_port, wait_healthy  # noqa: E402


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of process pid, by 'name/tid'."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def one_server(interval: str, args, prompt: list[int], stop_ids) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen([sys.executable, "-m", "llama3", "serve", "--port", str(port), "--quantize", "int4",
                               "--kv-memory", "1GB", "--no-prefix-cache", "--stream-interval", interval],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, server)
        body = {"prompt": prompt, "max_tokens": args.new, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in stop_ids}}

        def request() -> float:
            first = last = None
            tokens = 0
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
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
            return (tokens - 1) / (last - first)

        request()
        before, own = thread_cpu(server.pid), os.times()
        speeds = [request() for _ in range(args.requests)]
        after, own_after = thread_cpu(server.pid), os.times()
        tokens = args.requests * args.new
        print(f"--stream-interval {interval}: tok/s {[round(s, 1) for s in speeds]}", flush=True)
        for name in sorted(after, key=lambda k: before.get(k, 0) - after[k]):
            spent = after[name] - before.get(name, 0)
            if spent > 0:
                print(f"    thread {name:24s} {1000 * spent / tokens:6.2f} CPU ms per token")
        client = (own_after.user + own_after.system) - (own.user + own.system)
        print(f"    client (this process)          {1000 * client / tokens:6.2f} CPU ms per token", flush=True)
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="20,0,20,0", help="--stream-interval values, comma-separated")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from llama3 import load
    from llama3.fast.measure import prompt_of

    llm = load(None)
    prompt, tokenizer = prompt_of(16, llm.config.vocab_size, seed=1), llm.tokenizer
    print(f"uptime before: {os.getloadavg()}")
    for interval in args.intervals.split(","):
        one_server(interval.strip(), args, prompt, tokenizer.stop_ids)
    print(f"uptime after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
