"""Tensor parallelism on CPU/gloo, 2 processes: the same logits and seeded tokens as one process, half the weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_tp2_equals_one_process(tmp_path, fmt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLAMA3_TP_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests/tp_helpers/tp_parity.py"), fmt, str(tmp_path / "model")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line[:2] in ("0 ", "1 ")]
    assert len(rows) == 2
    for _, got_fmt, diff, same_tokens, local, whole in rows:
        assert got_fmt == fmt and float(diff) < 1e-5 and same_tokens == "True"
        assert int(local) < 0.55 * int(whole)
