"""Small things a newcomer met in params, prepare and doctor."""

import io

from llama3.cli import main
from train_helpers import kjv_chapters, train_small_bpe


def test_params_names_the_presets_it_accepts(capsys):
    from llama3.config import PRESETS

    assert main(["params", "llama-9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: llama-9: no such file or folder") and err.count("\n") == 1
    assert all(name in err for name in PRESETS) and "smollm2-135m-instruct" in err


def test_prepare_refuses_a_file_as_out_and_prints_a_readable_dtype(tmp_path, capsys):
    text = tmp_path / "book.txt"
    text.write_text("\n".join(kjv_chapters(3)))
    (tmp_path / "taken").write_text("x")
    assert main(["prepare", "--data", str(text), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1
    train_small_bpe(tmp_path / "tok", kjv_chapters(3), vocab_size=300)
    assert main(["prepare", "--data", str(text), "--out", str(tmp_path / "shards"), "--tokenizer",
                 str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    assert "stored as uint16 (2 bytes a token)" in err and "<u2" not in err


def test_doctor_silences_progress_bars_while_the_reference_loads():
    import tqdm.auto
    from transformers.utils import logging as hf_logging

    from llama3.commands.doctor import quiet_progress_bars

    def bar_output() -> str:
        buffer = io.StringIO()
        for _ in tqdm.auto.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...", file=buffer):
            pass
        return buffer.getvalue()

    assert "GGUF" in bar_output()
    with quiet_progress_bars():
        assert bar_output() == "" and not hf_logging.is_progress_bar_enabled()
    assert "GGUF" in bar_output() and hf_logging.is_progress_bar_enabled()
