"""End to end through the command line: train on the built-in corpus, generate from the folder; clear errors."""

import json

import pytest

from train_helpers import run_cli, run_main


def test_train_default_corpus_then_generate(tmp_path):
    out = tmp_path / "model"
    result = run_cli("train", "--out", str(out), "--preset", "tiny", "--steps", "3", "--batch-size", "2",
                     "--seq-len", "32", "--vocab-size", "512", "--eval-interval", "0", "--eval-batches", "1",
                     "--log-interval", "1", "--sample-prompt", "And God")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sample: And God" in result.stdout
    # no blank lines (tokenizers' BPE trainer printed three where stdout is not a terminal); the sample's own
    # text may hold any newlines, so look before it
    assert "" not in result.stdout.split("sample:")[0].split("\n")[:-1]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["settings"]["source"] == "kjv" and manifest["splits"]["train"]["documents"] > 1000
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 3]
    assert (out / "loss.png").is_file() and (out / "checkpoints" / "latest.json").is_file()
    generated = run_main("generate", "--model", str(out), "--max-new-tokens", "8", "--seed", "1", "In the beginning")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip()
    tokenized = run_main("train-tokenizer", "--data", str(out / "data" / "manifest.json"), "--vocab-size", "300",
                        "--out", str(tmp_path / "tok"))
    assert tokenized.returncode == 0, tokenized.stderr[-2000:]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such file or folder"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("\n \n")), "no text found"),
    (lambda p: p.write_text('{"text": "ok"}\n{"text": 1}\n'), ":2: the 'text' field must be a string"),
])
def test_train_data_errors(tmp_path, setup, message):
    data = tmp_path / ("data.jsonl" if "text" in message else "data")
    setup(data)
    result = run_main("train", "--data", str(data), "--out", str(tmp_path / "out"), "--preset", "tiny",
                     "--steps", "1", "--no-progress")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
