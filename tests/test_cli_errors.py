"""Checkpoint errors reach the user as one line `error: ...` and exit status 2, without a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama3.checkpoint import save_checkpoint
from llama3.cli import main
from llama3.llm import LLM

from conftest import make_config, make_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hf_folder(tmp_path):
    config = make_config()
    save_checkpoint(LLM(model=make_model(config), config=config), tmp_path / "hf", format="hf")
    return tmp_path / "hf"


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "llama3", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_corrupt_file_exits_2_without_traceback(hf_folder, tmp_path):
    weights = hf_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli("convert", str(hf_folder), "--to", "meta", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: " in result.stderr and "model.safetensors" in result.stderr and "truncated" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["params", "no-such-model"], "no such file or folder"),
    (["params", "{tmp}"], "neither a Hugging Face folder"),
    (["convert", "{hf}", "--to", "hf", "{tmp}/x", "--dtype", "int3"], "unknown dtype 'int3'"),
])
def test_bad_input_exit_codes(args, message, hf_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path / "empty", hf=hf_folder) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_convert_round_trip(hf_folder, tmp_path, capsys):
    from llama3.checkpoint import load_checkpoint

    assert main(["convert", str(hf_folder), "--to", "meta", str(tmp_path / "meta")]) == 0
    assert main(["convert", str(tmp_path / "meta"), "--to", "hf", str(tmp_path / "hf2"), "--dtype", "bf16"]) == 0
    assert load_checkpoint(tmp_path / "hf2", dtype="auto").dtype == torch.bfloat16
    assert (tmp_path / "hf2" / "config.json").read_text().count('"bfloat16"') == 1


def test_bad_devices_are_a_clear_error(hf_folder, monkeypatch):
    import llama3
    from llama3.checkpoint import load_checkpoint
    from llama3.errors import Llama3Error
    from llama3.llm import parse_device
    from llama3.train.distributed import pick_device

    assert parse_device(None) is None
    assert parse_device("cpu") == torch.device("cpu")
    for bad in ("foo", "cuda:x", "meta"):
        with pytest.raises(Llama3Error, match="device"):
            parse_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Llama3Error, match="CUDA is not available"):
        parse_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(Llama3Error, match="MPS is not available"):
        parse_device("mps")
    with pytest.raises(Llama3Error, match="unknown device 'foo'"):
        llama3.load(str(hf_folder), device="foo")
    with pytest.raises(Llama3Error, match="CUDA is not available"):
        load_checkpoint(hf_folder, device="cuda")
    with pytest.raises(Llama3Error, match="CUDA is not available"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


def test_serve_rejects_a_bad_device_before_loading(capsys):
    assert main(["serve", "--model", "no-such-model", "--device", "foo", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown device 'foo'") and err.count("\n") == 1
