"""The KV budget (llama3/engine/memory.py): the default is a share of what the process can
really take (RAM available, or the address space left under `ulimit -v`), and a size beyond
that is a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import make_config, make_model
from llama3.engine import Engine, EngineConfig
from llama3.engine.memory import memory_budget, memory_limit
from llama3.errors import Llama3Error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_too_large_an_explicit_budget_is_a_one_line_error():
    limit, what = memory_limit(torch.device("cpu"))
    with pytest.raises(Llama3Error) as error:
        Engine(make_model(make_config()), None, EngineConfig(kv_memory=f"{limit * 2 / 2**30:.1f}GiB"))
    message = str(error.value)
    assert "\n" not in message and "--kv-memory" in message and what in message


def test_default_budget_is_a_share_of_what_is_available_and_is_reported():
    budget, note = memory_budget(None, torch.device("cpu"))
    limit, what = memory_limit(torch.device("cpu"))
    assert 0 < budget <= limit // 4 + 1 and what in note
    engine = Engine(make_model(make_config()), None, EngineConfig())
    assert "default: 25%" in engine.describe()


def test_default_budget_fits_under_ulimit_v():
    """Under an address-space limit 1 GiB above the process's size, the default budget is a
    quarter of that GiB (not of the machine's RAM), the pool is allocated, and the engine runs;
    2 GiB explicitly is refused in one line."""
    script = f"""
import resource, sys
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
from conftest import make_config, make_model
from llama3.engine import Engine, EngineConfig
from llama3.errors import Llama3Error
from llama3.generate import GenerationSettings
model = make_model(make_config())
size = int([l for l in open('/proc/self/status') if l.startswith('VmSize:')][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
engine = Engine(model, None, EngineConfig())
print(engine.describe())
assert engine.budget <= (1 << 30) // 4, engine.budget
assert len(engine.run([[1, 2, 3]], GenerationSettings(max_new_tokens=3))[0].token_ids) == 3
try:
    Engine(model, None, EngineConfig(kv_memory="2GiB"))
except Llama3Error as e:
    print("refused:", e)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT, "LLAMA3_NATIVE": "0"})
    assert result.returncode == 0, result.stderr
    assert "address space left under ulimit -v" in result.stdout
    assert "refused: --kv-memory '2GiB'" in result.stdout
