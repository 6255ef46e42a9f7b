"""`llama3 bench` and `llama3 perplexity` end to end on a tiny checkpoint (no timing asserted)."""

import json

import pytest
import torch

from conftest import make_config, make_model
from llama3.cli import main
from llama3.llm import LLM


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())


@pytest.fixture
def tiny_folder(tmp_path):
    config = make_config()
    folder = tmp_path / "tiny"
    LLM(make_model(config), config).save(folder, format="hf")
    return folder


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"], ["--plain", "--dtype", "bfloat16"], ["--dtype", "bfloat16"]])
def test_bench_prints_its_numbers(tiny_folder, capsys, extra):
    assert main(["bench", "--model", str(tiny_folder), "--prefill-tokens", "16", "--new-tokens", "4",
                 "--threads", "1", "--json", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefill_tokens"] == 16 and report["decode_tokens"] == 4
    for key in ("load_seconds", "prefill_tokens_per_second", "ttft_seconds", "decode_tokens_per_second",
                "engine_decode_tokens_per_second"):  # the engine: what generate, chat and serve run
        assert report[key] > 0
    assert report["peak_rss_bytes"] > 10 * 2**20
    assert report["weight_bytes_per_token"] > 0 and report["memory_read_bytes_per_second"] > 0
    assert report["decode_bound_tokens_per_second"] == pytest.approx(
        report["memory_read_bytes_per_second"] / report["weight_bytes_per_token"])


def test_bench_prints_the_decode_bound(tiny_folder, capsys):
    assert main(["bench", "--model", str(tiny_folder), "--prefill-tokens", "8", "--new-tokens", "3",
                 "--threads", "1"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("decode bound"))
    assert "MB of weights a token" in line and "GB/s read here" in line and "% of it" in line
    from llama3.fast.measure import last_level_cache_bytes

    if last_level_cache_bytes() is not None:  # a tiny model fits in any cache: the bound is no bound there
        assert "last-level cache" in line


def test_bench_compile_failure_is_one_line_error(tiny_folder, capsys, monkeypatch):
    """torch.compile fails on the first call for some models (e.g. int4's kernel): one line, exit 2."""
    import llama3.fast.compile
    import llama3.fast.measure

    def broken_compile(model):
        def fails(*args, **kwargs):
            raise RuntimeError("LoweringException: cannot lower this op\nmore lines")
        return fails

    monkeypatch.setattr(llama3.fast.compile, "compile_model", broken_compile)
    monkeypatch.setattr(llama3.fast.measure, "measure", lambda model, *a: model())
    assert main(["bench", "--model", str(tiny_folder), "--compile", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: torch.compile could not compile") and "run without --compile" in err
    assert len(err.strip().splitlines()) == 1


def test_bench_bad_input_is_one_line_error(tiny_folder, capsys):
    assert main(["bench", "--model", str(tiny_folder), "--threads", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --threads")


def test_perplexity_command(tiny_folder, tmp_path, capsys, monkeypatch):
    import llama3
    from llama3.perplexity import model_logits_fn, perplexity_of_ids

    text_file = tmp_path / "text.txt"
    text_file.write_text("abc ABC 0123 =<>? " * 4)
    loaded = llama3.load(tiny_folder)
    monkeypatch.setattr(llama3, "load", lambda source, **kwargs: LLM(loaded.model, loaded.config,
                                                                                    ByteTokenizer()))
    assert main(["perplexity", str(text_file), "--model", str(tiny_folder), "--context", "16", "--stride", "8"]) == 0
    want = perplexity_of_ids(model_logits_fn(loaded.model), list(text_file.read_bytes()), 16, 8)
    out = capsys.readouterr().out
    assert out.startswith(f"perplexity {want.perplexity:.4f}") and "windows of 16, stride 8" in out


def test_perplexity_command_errors(tiny_folder, tmp_path, capsys):
    assert main(["perplexity", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    assert main(["perplexity", str(binary), "--model", str(tiny_folder)]) == 2
    assert "UTF-8" in capsys.readouterr().err


def test_perplexity_rejects_bad_windows_before_loading(tmp_path, monkeypatch, capsys):
    """A bad --context/--stride/--max-tokens is reported before any model is read."""
    import llama3.fast
    from llama3.cli import main

    text = tmp_path / "t.txt"
    text.write_text("some text to score")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(llama3.fast, "load_fast", no_load)
    for flag, value in (("--context", "1"), ("--stride", "0"), ("--max-tokens", "-5")):
        assert main(["perplexity", str(text), flag, value]) == 2
        assert f"{flag} must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("extra, plan", [([], "fused q/k/v and gate/up; C++ kernels (llama3/fast/kernels.cpp"),
                                         (["--plain"], "none: model.py's own functions and PyTorch's kernels")])
def test_bench_prints_the_decoding_plan(tiny_folder, capsys, extra, plan):
    from llama3.fast import kernels

    if not extra and kernels.library() is None:
        plan = "PyTorch kernels (no C++ kernels: " + kernels.build_error()
    assert main(["bench", "--model", str(tiny_folder), "--prefill-tokens", "8", "--new-tokens", "2",
                 "--threads", "1", *extra]) == 0
    out = capsys.readouterr().out
    assert f"plan: {plan}" in out or ("plan: cpu, float32; float weights; " in out and plan in out)
