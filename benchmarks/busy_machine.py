"""Decode and prefill speed on a busy machine: with and without one core taken by another process.

    python benchmarks/busy_machine.py [--model SOURCE] [--quantize int4] [--threads 2] [--runs 2]
                                      [--configs a,b,...] [--checkout DIR] [--out results.json]
                                      [--new-tokens 64] [--prefill-tokens 128]

The background load is `yes > /dev/null` (one busy core), started before a measurement and
stopped after it.  Each measurement is `llama3 bench --json` in its own process (decode: 64 greedy
tokens, prefill: 128 tokens), best of --runs, the configurations round-robin so a slow stretch of a
shared machine does not land on one of them alone.  Configurations:

    idle-1  idle-N            one thread / --threads threads, no load
    busy-1  busy-N            the same with one core taken
    busy-N-fixed              --threads threads, LLAMA3_ADAPT=0: the pool never falls back to the
                              caller alone (what adapting gains)
    busy-N-passive            OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep at once; affects
                              PyTorch's own kernels, i.e. prefill, and any OpenMP build)
    llamacpp-idle-1/N, llamacpp-busy-1/N
                              llama.cpp's `llama-bench -t 1/N` on the same GGUF, where
                              /work/peers/build/bin/llama-bench (or $LLAMA_BENCH) exists

--checkout DIR measures another checkout's `llama3 bench` (e.g. a worktree of an older commit)
with the same loads, for a same-run comparison.  The goal (issue 20): busy-N decode >= 0.8x
idle-1 decode, idle-N within 5% of what it was.  Prints a markdown table with `uptime` before
and after: other processes on the machine change every number, so read ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = Path(os.environ.get("LLAMA_BENCH", "/work/peers/build/bin/llama-bench"))


def start_load() -> subprocess.Popen:
    """One busy core: `yes` writing to /dev/null."""
    return subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_load(load: subprocess.Popen | None) -> None:
    if load is not None:
        load.kill()
        load.wait()


def ours(checkout: Path, model: str | None, quantize: str | None, threads: int, env: dict,
         new_tokens: int = 64, prefill_tokens: int = 128) -> dict:
    cmd = [sys.executable, "-m", "llama3", "bench", "--json", "--threads", str(threads),
           "--new-tokens", str(new_tokens), "--prefill-tokens", str(prefill_tokens)]
    cmd += ["--model", model] if model else []
    cmd += ["--quantize", quantize] if quantize else []
    out = subprocess.run(cmd, cwd=checkout, env=dict(os.environ, PYTHONPATH=str(checkout), **env),
                         capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-300:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {"decode": report["decode_tokens_per_second"], "prefill": report["prefill_tokens_per_second"]}


def gguf_of(model: str | None) -> str:
    if model and model.endswith(".gguf"):
        return model
    from llama3.llm import resolve_source

    path = resolve_source(model)
    if not str(path).endswith(".gguf"):
        raise RuntimeError("llama-bench needs a .gguf model (--model)")
    return str(path)


def llamacpp(gguf: str, threads: int) -> dict:
    """llama-bench's own numbers: tg64 (decode) and pp128 (prefill) tokens/s."""
    out = subprocess.run([str(PEER), "-m", gguf, "-t", str(threads), "-p", "128", "-n", "64", "-r", "2", "-o", "json"],
                         capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {out.stderr.strip()[-300:]}")
    rows = json.loads(out.stdout)
    speed = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}
    return speed


def configurations(threads: int, peer: bool) -> list[str]:
    names = ["idle-1", f"idle-{threads}", "busy-1", f"busy-{threads}", f"busy-{threads}-fixed",
             f"busy-{threads}-passive"]
    if peer:
        names += ["llamacpp-idle-1", f"llamacpp-idle-{threads}", "llamacpp-busy-1", f"llamacpp-busy-{threads}"]
    return names


def measure(name: str, args) -> dict:
    busy = "busy" in name
    n = int(re.search(r"-(\d+)", name).group(1))
    env = {}
    if name.endswith("-fixed"):
        env["LLAMA3_ADAPT"] = "0"
    if name.endswith("-passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    load = start_load() if busy else None
    try:
        if name.startswith("llamacpp"):
            return llamacpp(gguf_of(args.model), n)
        return ours(Path(args.checkout or ROOT), args.model, args.quantize, n, env, args.new_tokens,
                    args.prefill_tokens)
    finally:
        stop_load(load)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per measurement (default 64)")
    parser.add_argument("--prefill-tokens", type=int, default=128, help="prompt length for prefill (default 128)")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    parser.add_argument("--checkout", default=None, help="measure this checkout's llama3 instead of this one")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if shutil.which("yes") is None:
        print("error: no `yes` command for the background load", file=sys.stderr)
        return 2
    peer = PEER.exists()
    names = args.configs.split(",") if args.configs else configurations(args.threads, peer)
    before = uptime()
    best: dict[str, dict] = {}
    for run in range(args.runs):
        for name in names:
            try:
                got = measure(name, args)
            except Exception as e:  # a failed configuration is reported, the others still run
                print(f"{name}: {e}", file=sys.stderr)
                continue
            print(f"run {run + 1} {name:22s} decode {got['decode']:7.1f}  prefill {got['prefill']:7.1f}", flush=True)
            old = best.get(name)
            best[name] = {k: max(v, old[k]) if old else v for k, v in got.items()}
    after = uptime()
    base = best.get("idle-1", {}).get("decode")
    print(f"\n`python benchmarks/busy_machine.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
          f"{'' if peer else ' (no llama-bench here: llama.cpp skipped)'}")
    print(f"uptime before: {before}\nuptime after:  {after}\n")
    print("| configuration | decode tok/s | x idle-1 decode | prefill tok/s |\n|---|---|---|---|")
    for name in names:
        if name in best:
            ratio = f"{best[name]['decode'] / base:.2f}" if base and not name.startswith("llamacpp") else "-"
            print(f"| {name} | {best[name]['decode']:.1f} | {ratio} | {best[name]['prefill']:.1f} |")
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps({"before": before, "after": after, "best": best}, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
