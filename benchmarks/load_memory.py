"""Peak memory while loading a checkpoint, per format: is it at most 1.2x the checkpoint's bytes?

    python benchmarks/load_memory.py [--work /tmp/llama3-load-memory] [--cases a,b,...] [--out results.json]

The measure (issue 8: "peak RSS while loading <= 1.2x the checkpoint's bytes"):

    growth = peak RSS during `llama3.load(path, dtype=...)` - RSS just before it
    ratio  = growth / bytes of the checkpoint on disk

Every case runs in its own fresh subprocess (the peak RSS, VmHWM, is a process-wide
high-water mark).  Before measuring, the child imports torch and llama3 and loads a
tiny checkpoint of the same format once (so every module the loader imports, and
every first-use initialisation, is paid for outside the measurement), collects
garbage, hands freed heap back to the OS (malloc_trim), reads VmRSS and resets
VmHWM (`echo 5 > /proc/self/clear_refs`, Linux).  After the load it reads VmHWM:
the peak of the load alone, tokenizer included.  Pages of memory-mapped files count
once touched; a zero-copy load touches few of them, so the table also shows the RSS
growth after every weight has been read once ("after use"), which is where a
memory-mapped model's RSS ends up anyway.

A load that changes the dtype cannot stay under the bound against the file when the
result is bigger than the file (bfloat16 -> float32 is 2x, Q4_1 -> float32 ~6x);
"/ loaded" divides by the bytes of the loaded weights instead: the honest measure there.

Cases (checkpoints made once in --work from the embedded SmolLM2-135M, dequantized):
    hf-f32 hf-f32-to-bf16          HF folder, one float32 safetensors file (538 MB)
    hf-f32-sharded                 the same in 4 shards
    hf-bf16 hf-bf16-to-f32         HF folder, bfloat16
    meta-f32 meta-f32-to-bf16      Meta folder, consolidated.00.pth
    meta-f32-2shards               two model-parallel shards, merged on load (each holds its half
                                   of the tied head too, as fairscale saved it: 652 MB)
    gguf-f32 gguf-f16 gguf-f16-to-f32   our GGUF writer
    gguf-q4_1-to-f32               the embedded Q4_1 GGUF itself (dequantized to float32)

Linux only (/proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama3, however it is installed

# case -> (checkpoint name in --work, dtype passed to llama3.load)
CASES = {
    "hf-f32": ("hf-f32", "float32"),
    "hf-f32-to-bf16": ("hf-f32", "bfloat16"),
    "hf-f32-sharded": ("hf-f32-sharded", "float32"),
    "hf-bf16": ("hf-bf16", "bfloat16"),
    "hf-bf16-to-f32": ("hf-bf16", "float32"),
    "meta-f32": ("meta-f32", "float32"),
    "meta-f32-to-bf16": ("meta-f32", "bfloat16"),
    "meta-f32-2shards": ("meta-f32-2shards", "float32"),
    "gguf-f32": ("model-f32.gguf", "float32"),
    "gguf-f16": ("model-f16.gguf", "float16"),
    "gguf-f16-to-f32": ("model-f16.gguf", "float32"),
    "gguf-q4_1-to-f32": ("default", "float32"),
}
MB = 1e6


# --------------------------------------------------------------- preparation
def split_meta(folder: Path, n: int) -> None:
    """Rewrite a one-shard Meta folder as n model-parallel shards (fairscale's split, see meta.SHARD_DIM)."""
    import torch

    from llama3.checkpoint.meta import SHARD_DIM

    state = torch.load(folder / "consolidated.00.pth", weights_only=True, mmap=True)
    shards = [{} for _ in range(n)]
    for name, w in state.items():
        dim = SHARD_DIM.get(name.split(".")[-2])
        pieces = [w] * n if dim is None else w.chunk(n, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    del state
    for k, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")


def save_all(llm, root: Path, sharded_bytes: int) -> None:
    """Every checkpoint a case reads, written from `llm` into `root` (skipping those already there)."""
    import torch

    from llama3.checkpoint.gguf import write_gguf
    from llama3.checkpoint.hf import write_hf

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "hf-f32").exists():
        llm.save(root / "hf-f32", format="hf")
    if not (root / "hf-f32-sharded").exists():
        write_hf(llm, root / "hf-f32-sharded", max_shard_bytes=sharded_bytes)
    if not (root / "meta-f32").exists():
        llm.save(root / "meta-f32", format="meta")
    if not (root / "meta-f32-2shards").exists():
        llm.save(root / "meta-f32-2shards", format="meta")
        split_meta(root / "meta-f32-2shards", 2)
    if not (root / "model-f32.gguf").exists():
        write_gguf(llm, root / "model-f32.gguf", file_type="f32")
    if not (root / "model-f16.gguf").exists():
        write_gguf(llm, root / "model-f16.gguf", file_type="f16")
    if not (root / "hf-bf16").exists():
        llm.model.to(torch.bfloat16)
        llm.save(root / "hf-bf16", format="hf")
        llm.model.to(torch.float32)


def prepare(work: Path) -> None:
    """The SmolLM2 checkpoints, and tiny ones of each format (same tokenizer) for the warm-up loads."""
    import llama3
    from llama3.config import ModelConfig
    from llama3.llm import LLM
    from llama3.model import Transformer

    if not (work / "model-f16.gguf").exists() or not (work / "hf-bf16").exists():
        save_all(llama3.load(), work, sharded_bytes=150_000_000)
    if not (work / "tiny" / "hf-bf16").exists():
        tokenizer = llama3.load_tokenizer("smollm2-135m-instruct")
        config = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tokenizer.vocab_size,
                             hidden_dim=32, max_seq_len=64, tie_embeddings=True)
        save_all(LLM(model=Transformer(config), config=config, tokenizer=tokenizer), work / "tiny", 100_000)


def checkpoint_path(work: Path, name: str) -> Path:
    if name == "default":
        from llama3.llm import resolve_source

        return Path(resolve_source(None))
    return work / name


def disk_bytes(path: Path) -> int:
    """Bytes of the weight files (the tokenizer and JSON files are not counted)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".pth"))


# --------------------------------------------------------------- measuring (child)
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, ... of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(path: str, warmup: str, dtype: str) -> dict:
    """Load `warmup` (imports, first-use set-up), then measure one load of `path`."""
    import ctypes
    import gc

    import torch

    import llama3

    llama3.load(warmup, dtype=dtype)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = proc_status()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    llm = llama3.load(path, dtype=dtype)
    seconds = time.perf_counter() - start
    after = proc_status()
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in llm.model.parameters()}
    with torch.no_grad():
        for p in llm.model.parameters():  # read every weight once: mapped pages become resident
            p.float().sum() if p.dtype != torch.float32 else p.sum()
    used = proc_status()
    return {"seconds": seconds, "rss_before": before["VmRSS"], "peak": after["VmHWM"] - before["VmRSS"],
            "retained": after["VmRSS"] - before["VmRSS"], "after_use": used["VmRSS"] - before["VmRSS"],
            "loaded_bytes": sum(storages.values()), "dtype": str(llm.dtype).removeprefix("torch.")}


# --------------------------------------------------------------- driver
def run_case(work: Path, case: str) -> dict:
    name, dtype = CASES[case]
    path = checkpoint_path(work, name)
    warmup = work / "tiny" / ("model-f32.gguf" if name == "default" else name)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, __file__, "--child", str(path), str(warmup), dtype],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(case=case, disk_bytes=disk_bytes(path))
    return result


def table(results: list[dict]) -> str:
    lines = ["| case | on disk MB | loaded MB | load s | peak growth MB | / disk | / loaded | after use MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['disk_bytes'] / MB:.0f} | {r['loaded_bytes'] / MB:.0f} ({r['dtype']}) "
                     f"| {r['seconds']:.2f} | {r['peak'] / MB:.0f} | {r['peak'] / r['disk_bytes']:.2f}x "
                     f"| {r['peak'] / r['loaded_bytes']:.2f}x | {r['after_use'] / MB:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(*argv[1:4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llama3-load-memory"),
                        help="folder for the exported checkpoints (~3.4 GB; made once, reused)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    prepare(args.work)
    results = []
    for case in cases:
        results.append(run_case(args.work, case))
        r = results[-1]
        print(f"{case}: peak growth {r['peak'] / MB:.0f} MB = {r['peak'] / r['disk_bytes']:.2f}x of "
              f"{r['disk_bytes'] / MB:.0f} MB on disk, {r['seconds']:.2f} s", file=sys.stderr)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
