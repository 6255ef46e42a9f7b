"""`llama3 generate` and `llama3 chat` end to end on the default model; the expected text comes from
the library in-process.  What is about the process (streaming to a pipe, its stderr report, Ctrl-C)
runs `python -m llama3` in a subprocess, as a user runs it; the other commands call the CLI's `main`
in this process (stdin and stdout replaced), which spares a Python, a torch import and the imports
per test (~5 s each) and runs the same code from argv on."""

import io
import os
import subprocess
import sys

import pytest

from llama3.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama3_cli(*args, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", "llama3", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=900)


def llama3_main(capsys, monkeypatch, *args, stdin: str = ""):
    """`main(args)` with `stdin` as standard input (bytes underneath, like a pipe) -> (status, out, err)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    capsys.readouterr()
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_generate_streams_only_the_continuation(default_llm):
    prompt = "The capital of France is"
    result = llama3_cli("generate", "--max-new-tokens", "12", prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_llm.generate(prompt, max_new_tokens=12)
    assert "loaded smollm2-135m-instruct" in result.stderr and "tokens/s" in result.stderr


@pytest.mark.parametrize("flags", [["--plain"], ["--quantize", "int4"]])
def test_generate_plain_and_int4(default_llm, flags, capsys, monkeypatch):
    """--plain runs the readable model (the library's tokens); --quantize int4 runs the embedded
    Q4_1 blocks as 4-bit weights and prints what llama3.fast.load_fast(quantize="int4") gives."""
    from llama3.fast import load_fast

    prompt = "The three primary colors are"
    reference = default_llm if flags == ["--plain"] else load_fast(quantize="int4")
    status, out, err = llama3_main(capsys, monkeypatch, "generate", "--max-new-tokens", "10", *flags, prompt)
    assert status == 0, err
    assert out == reference.generate(prompt, max_new_tokens=10)


def test_generate_reads_stdin_and_cuts_at_stop(default_llm, capsys, monkeypatch):
    prompt = "Here is a list of fruits:\n1."
    expected = default_llm.generate(prompt, max_new_tokens=24, stop=["\n"], seed=5, temperature=0.8)
    status, out, err = llama3_main(capsys, monkeypatch, "generate", "--max-new-tokens", "24", "--stop", "\\n",
                                   "--seed", "5", "--temperature", "0.8", "-", stdin=prompt)
    assert status == 0, err
    assert out == expected and "\n" not in out


def test_chat_through_piped_stdin(default_llm, capsys, monkeypatch):
    questions = ["What is 2+2?", "And times three?", "Name a colour."]
    status, out, err = llama3_main(capsys, monkeypatch, "chat", "--temperature", "0", "--max-new-tokens", "16",
                                   "--system", "Be brief.",
                                   stdin=f"{questions[0]}\n{questions[1]}\n/reset\n{questions[2]}\n/exit\nnever read\n")
    assert status == 0, err

    def ask(messages):
        return default_llm.chat(messages, temperature=0, max_new_tokens=16)

    system = {"role": "system", "content": "Be brief."}
    history = [system, {"role": "user", "content": questions[0]}]
    first = ask(history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": questions[1]}]
    second = ask(history)                                                    # remembers the first turn
    third = ask([system, {"role": "user", "content": questions[2]}])         # after /reset
    assert out == f"{first}\n{second}\n{third}\n"
    assert "> " not in out  # no prompt decorations when stdin is not a terminal


@pytest.mark.parametrize("args, message", [
    (["generate", "--temperature", "-1", "hi"], "temperature"),
    (["generate", "--top-p", "0", "hi"], "top_p"),
    (["chat", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--model", "/no/such/model", "hi"], "no such file"),
])
def test_bad_values_give_one_line_errors(args, message, capsys, monkeypatch):
    status, _, err = llama3_main(capsys, monkeypatch, *args)
    assert status == 2
    last_line = err.splitlines()[-1]
    assert last_line.startswith("error:") and message in last_line and "Traceback" not in err


def test_chat_ctrl_c_stops_the_answer_but_not_the_chat():
    import signal

    chat = subprocess.Popen([sys.executable, "-m", "llama3", "chat", "--max-new-tokens", "500", "--temperature", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        chat.stdin.write("Write a very long story about a dragon.\n")
        chat.stdin.flush()
        first = chat.stdout.read(1)               # the answer has started streaming
        chat.send_signal(signal.SIGINT)           # Ctrl-C
        out, err = chat.communicate("/exit\n", timeout=600)
    finally:
        chat.kill()
    assert chat.returncode == 0, err
    assert first and (first + out).endswith(" [stopped]\n")
