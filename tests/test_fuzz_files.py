"""The file fuzzer: hundreds of damaged GGUF, safetensors, config.json, tokenizer.json and Meta
checkpoints (fixed seed), each loaded in a worker process with a time and memory limit.

Every case must end in one clean line (a Llama3Error naming the file) or a model that
computes finite logits -- never a traceback, a hang, a crash or NaN output.  The default
corpus is 240 cases in two worker processes at once (~10-20 s on a busy 2-core machine);
`LLAMA3_FUZZ_CASES=5000` (and `LLAMA3_FUZZ_SEED`) for a longer local run: docs/fuzzing.md.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz_corpus import build_corpus, mutants

CASES = int(os.environ.get("LLAMA3_FUZZ_CASES", "240"))
SEED = int(os.environ.get("LLAMA3_FUZZ_SEED", "0"))
BATCH = 125                     # cases per worker process (each process pays the torch import once)
WORKERS = 2                     # worker processes at once, each on its own share of the cases
WORKER = Path(__file__).with_name("fuzz_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def run_cases(cases: list[dict], tmp: Path) -> list[dict]:
    """Results in case order: WORKERS contiguous shares of the cases, run at the same time (the
    workers are mostly one thread: one at a time left the other core idle)."""
    from concurrent.futures import ThreadPoolExecutor

    size = -(-len(cases) // WORKERS)
    shares = [cases[i:i + size] for i in range(0, len(cases), size)]
    with ThreadPoolExecutor(len(shares)) as pool:
        done = pool.map(lambda i: run_share(shares[i], tmp / f"cases{i}.json"), range(len(shares)))
        return [result for share in done for result in share]


def run_share(cases: list[dict], listing: Path) -> list[dict]:
    """Results in case order; a worker that dies is restarted after the case that killed it."""
    tmp = listing.parent
    results: list[dict] = []
    while len(results) < len(cases):
        batch = cases[len(results):len(results) + BATCH]
        listing.write_text(json.dumps(batch))
        code = os.environ.get("PYTHONPATH") or str(ROOT)  # the code under test
        env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{WORKER.parent}", "OMP_NUM_THREADS": "1",
               "TQDM_DISABLE": "1", "LLAMA3_NATIVE": "0"}
        try:
            done = subprocess.run([sys.executable, str(WORKER), str(listing)], capture_output=True, text=True,
                                  timeout=60 + 25 * len(batch), env=env, cwd=tmp)
            stdout, died = done.stdout, done.returncode != 0 and f"worker exit status {done.returncode}"
        except subprocess.TimeoutExpired as e:
            stdout, died = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        got = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
        results += got
        if len(got) < len(batch):  # the case after the last result crashed or hung the worker
            stderr = done.stderr[-1500:] if died != "timeout" else ""
            results.append({"result": "crash", "message": f"{died or 'no result'}: {stderr}"})
    return results


def check(case: dict, result: dict) -> str | None:
    """Why a result is a failure (None: fine)."""
    if result["result"] == "ok":
        return None
    if result["result"] == "error":
        message = result["message"]
        if "\n" in message or not message.strip():
            return f"error message is not one line: {message!r}"
        if case["path"] not in message:
            return f"error message does not name the file: {message}"
        return None
    return f"{result['result']}: {_short(result.get('message', ''))}"


def _short(trace: str) -> str:
    """A traceback as its last frame in llama3/ and its exception line."""
    lines = [line.strip() for line in trace.strip().splitlines()]
    ours = [line for line in lines if "llama3/" in line and line.startswith("File")]
    return " | ".join((ours[-1:] if ours else []) + lines[-1:])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def write_case(root: Path, corpus: dict, fmt: str, files: dict[str, bytes]) -> Path:
    source = corpus[fmt]
    if source.is_file():
        target = root / source.name
        target.write_bytes(files[""])
        return target
    target = root / source.name
    shutil.copytree(source, target)
    for name, data in files.items():
        (target / name).write_bytes(data)
    return target


def test_damaged_files_fail_cleanly(corpus, tmp_path):
    cases = []
    for i, (name, fmt, files) in enumerate(mutants(corpus, CASES, SEED)):
        folder = tmp_path / f"case{i:05d}"
        folder.mkdir()
        cases.append({"name": name, "format": fmt, "path": str(write_case(folder, corpus, fmt, files))})
    originals = [{"name": f"original {fmt}", "format": fmt, "path": str(corpus[fmt])} for fmt in ("gguf", "hf", "meta")]
    results = run_cases(originals + cases, tmp_path)
    assert [r["result"] for r in results[:3]] == ["ok"] * 3, results[:3]  # the corpus itself loads
    failures = [f"{case['name']}\n    {why}" for case, result in zip(cases, results[3:])
                if (why := check(case, result))]
    outcomes = {kind: sum(r["result"] == kind for r in results[3:]) for kind in ("ok", "error")}
    assert not failures, (f"{len(failures)} of {len(cases)} damaged files (seed {SEED}) were not handled "
                          f"cleanly ({outcomes}):\n" + "\n".join(failures[:40]))
    assert outcomes["error"] > len(cases) // 3  # the corpus really is damaging: most cases must be refused
