"""Helpers shared by the tests/test_train_*.py files: small real text, a tiny BPE, tiny settings."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kjv_chapters(n: int) -> list[str]:
    """The first n chapters of the default corpus (real English, offline)."""
    from llama3.train.corpus import default_corpus_documents

    return list(itertools.islice(default_corpus_documents(), n))


def write_text_folder(folder: Path, n_docs: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(kjv_chapters(n_docs)):
        (folder / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
    return folder


def train_small_bpe(folder: Path, docs: list[str], vocab_size: int = 320):
    from llama3.tokenizer import load_tokenizer
    from llama3.train.bpe import train_bpe

    train_bpe(docs, vocab_size, folder, progress=False)
    return load_tokenizer(folder)


def tiny_settings(**overrides) -> dict:
    """A TrainConfig dict for a few fast steps of the 'tiny' preset (dim 64, 2 layers)."""
    settings = dict(preset="tiny", steps=8, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                    eval_interval=4, eval_batches=2, log_interval=1, checkpoint_interval=4, vocab_size=320,
                    sample_prompt=None, progress=False, seed=7)
    settings.update(overrides)
    return settings


def metrics_losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m llama3 ARGS` in a subprocess (one CPU thread, so two can share the machine)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "llama3", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout)


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`llama3 ARGS` through the CLI's main in this process (no Python to start, no torch to import),
    its stdout and stderr captured: for what is not about the process itself."""
    import contextlib
    import io

    from llama3.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return subprocess.CompletedProcess(["llama3", *args], status, out.getvalue(), err.getvalue())


def one_thread():
    """Generator for an autouse fixture: torch on one thread during a test, then as before.
    The tests' models are tiny; on a shared 2-core machine two OpenMP threads mostly wait for each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
