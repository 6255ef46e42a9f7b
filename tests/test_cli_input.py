"""Text from arguments and standard input, as a user feeds it: strict UTF-8 with a clear error (or
--errors replace), a closed or endless stdin, an empty prompt refused before the model loads, the
context-overflow message in the CLI's words, progress on a long prefill, /explain's exact endings."""

import io
import subprocess
import sys

import pytest

from llama3.cli import main
from train_helpers import REPO


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A 1-layer random model with SmolLM2's tokenizer and a 32-token context, as a model folder."""
    from llama3.config import ModelConfig
    from llama3.llm import LLM
    from llama3.model import Transformer
    from llama3.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    config = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, hidden_dim=32,
                         max_seq_len=32)
    folder = tmp_path_factory.mktemp("tiny") / "m"
    LLM(Transformer(config).init_weights(seed=0), config, tok).save(folder, format="hf")
    return folder


def cli(*args: bytes | str, stdin=None, shell_suffix: str = "") -> subprocess.CompletedProcess:
    if shell_suffix:  # e.g. "<&-": standard input closed
        command = " ".join(["exec", sys.executable, "-m", "llama3", *map(str, args), shell_suffix])
        return subprocess.run(["sh", "-c", command], capture_output=True, cwd=REPO, timeout=300)
    return subprocess.run([sys.executable, "-m", "llama3", *args], capture_output=True, cwd=REPO, timeout=300,
                          stdin=stdin)


def one_error_line(result, *parts: str) -> str:
    err = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert result.returncode == 2, err[-3000:]
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err
    return err


def test_closed_stdin_is_one_line():
    """The real thing once (`<&-`: Python sets sys.stdin to None), then each command in-process."""
    one_error_line(cli("generate", "--model", "/no/such/model", "-", shell_suffix="<&-"), "standard input is closed")


@pytest.mark.parametrize("argv", [["generate", "-"], ["tokenize", "-"], ["chat"]])
def test_closed_stdin_in_each_command(argv, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", None)
    assert main([*argv, "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: standard input is closed") and err.count("\n") == 1


def stdin_bytes(monkeypatch, data: bytes):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_bad_utf8_on_stdin_and_in_arguments_names_the_source(monkeypatch, capsys):
    import os

    stdin_bytes(monkeypatch, "caf\xe9 au lait".encode("latin-1"))
    assert main(["generate", "--model", "/no/such/model", "-"]) == 2  # refused before the (missing) model
    err = capsys.readouterr().err
    assert err.startswith("error: standard input is not valid UTF-8 (byte 3") and "--errors replace" in err
    argument = os.fsdecode("caf\xe9".encode("latin-1"))  # how Python hands a non-UTF-8 argv entry over
    assert main(["tokenize", argument]) == 2
    assert capsys.readouterr().err.startswith("error: TEXT is not valid UTF-8 (byte 3")
    assert main(["tokenize", argument, "--errors", "replace", "--ids"]) == 0
    from llama3.tokenizer import load_tokenizer

    assert capsys.readouterr().out.strip() == str(load_tokenizer("smollm2-135m-instruct").encode("caf\ufffd"))


class Zeros(io.RawIOBase):
    """/dev/zero that gives up after `limit` bytes, so code without a bound fails here instead of
    eating the machine's memory."""

    def __init__(self, limit: int = 256 << 20):
        self.left = limit

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.left <= 0:
            raise AssertionError("read past 256 MiB: standard input was read without a bound")
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_endless_stdin_is_bounded(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(Zeros())))
    assert main(["generate", "--model", "/no/such/model", "-"]) == 2
    assert "more than 64 MiB" in capsys.readouterr().err


def test_an_empty_prompt_is_refused_before_the_model_loads(capsys):
    assert main(["generate", "--model", "/no/such/model", ""]) == 2
    err = capsys.readouterr().err
    assert err == "error: the prompt is empty; give the text to continue (or '-' to read it from stdin)\n"


def test_context_overflow_names_the_flag_and_a_long_prefill_shows_progress(tiny_chat_model, capsys, monkeypatch):
    import llama3.commands.generate as generate

    long_prompt = "one two three four five six seven eight nine ten " * 8
    assert main(["generate", "--model", str(tiny_chat_model), "--plain", long_prompt]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "pass --truncate" in err and "truncate=True" not in err
    monkeypatch.setattr(generate, "PREFILL_NOTICE_S", 0.0)  # every prefill counts as long here
    assert main(["generate", "--model", str(tiny_chat_model), "--plain", "--truncate", "--max-new-tokens", "2",
                 long_prompt]) == 0
    err = capsys.readouterr().err
    assert "prefill: reading the prompt's" in err and "prefill: " in err.split("reading the prompt's")[1]


def test_chat_explain_says_exactly_what_ended_the_answer(tiny_chat_model):
    import llama3
    from llama3.commands.chat import ending
    from llama3.inspect.explain import explain_answer

    llm = llama3.load(tiny_chat_model)
    tok = llm.tokenizer
    ids = tok.encode("hello world", bos=False)
    assert ending(tok, ids, "stop", ["world"], interrupted=False) == "stop string"
    assert ending(tok, ids, "stop", [], interrupted=False) == "stop token"
    assert ending(tok, ids, "length", ["world"], interrupted=False) == "length"
    assert ending(tok, ids, "length", [], interrupted=True) == "interrupted"
    prompt = tok.encode("Hi")
    said = {reason: explain_answer(llm, prompt, ids, reason).ended_by
            for reason in ("interrupted", "stop string", "stop token", "length")}
    assert said["interrupted"].startswith("you interrupted it (Ctrl-C)")
    assert said["stop string"].startswith("a stop string")
    assert said["stop token"].startswith("a stop token") and "stop string" not in said["stop token"]
    assert said["length"].startswith("the length limit")


def test_chat_records_length_then_explain(tiny_chat_model, monkeypatch, capfd):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/explain\n" + "many words " * 20 + "\n"))
    assert main(["chat", "--model", str(tiny_chat_model), "--plain", "--temperature", "0",
                 "--max-new-tokens", "3"]) == 0
    out, err = capfd.readouterr()
    assert "ended by: the length limit" in out
    overflow = err.splitlines()[-1]  # the 32-token context overflows: chat has no --truncate to suggest
    assert overflow.startswith("error: the prompt has") and "truncate" not in overflow and "/reset" in overflow


def test_stop_and_system_arguments_are_checked_too(monkeypatch, capsys):
    import os

    bad = os.fsdecode(b"\xff")
    assert main(["generate", "--model", "/no/such/model", "--stop", bad, "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: --stop is not valid UTF-8 (byte 0")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", "/no/such/model", "--system", bad]) == 2  # before the model is looked for
    assert capsys.readouterr().err.startswith("error: --system is not valid UTF-8 (byte 0")
