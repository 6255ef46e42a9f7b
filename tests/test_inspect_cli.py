"""The `llama3 inspect` commands and the walkthrough generator, end to end (tiny model and the real one)."""

import json

import pytest
import torch

import llama3
from llama3.cli import main
from llama3.inspect.walkthrough import write_walkthrough
from llama3.llm import LLM
from test_inspect import CharTokenizer, picture_ok
from conftest import make_model


@pytest.fixture
def tiny_llm(monkeypatch):
    model = make_model()
    llm = LLM(model, model.config, tokenizer=CharTokenizer(), source="tiny")
    monkeypatch.setattr(llama3, "load", lambda source=None, **kw: llm)
    return llm


def test_trace_command_tree_and_json(tiny_llm, capsys):
    assert main(["inspect", "trace", "abc", "--layer", "1"]) == 0
    out = capsys.readouterr().out
    assert "block 1" in out and "softmax → attention weights" in out and "max |Δ| = 0" in out
    assert main(["inspect", "trace", "abc", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ids"] == CharTokenizer().encode("abc") and len(data["top_next"]) == 5


def test_attention_logit_lens_rope_commands_write_pictures(tiny_llm, tmp_path, capsys):
    assert main(["inspect", "attention", "hello", "--out", str(tmp_path / "a.png")]) == 0
    assert main(["inspect", "attention", "hello", "--head", "1", "--layer", "0", "--out", str(tmp_path / "h.png")]) == 0
    assert main(["inspect", "logit-lens", "hello", "--out", str(tmp_path / "l.png")]) == 0
    assert main(["inspect", "rope", "--preset", "llama-3.2-1b", "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "where the last token" in out and "top next-token guess" in out and "Dh=64" in out
    for name in ("a.png", "h.png", "l.png", "r.png"):
        picture_ok(tmp_path / name)


def test_inspect_errors_are_one_line(tiny_llm, tmp_path, capsys):
    assert main(["inspect", "trace", "abc", "--layer", "7"]) == 2
    assert main(["inspect", "attention", "abc", "--head", "4", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["inspect", "attention", "abc", "--out", str(tmp_path / "missing" / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "layer 7 does not exist" in err[0] and "head 4" in err[1] and "no such folder" in err[2]


def test_walkthrough_writes_both_languages_and_pictures(tiny_llm, tmp_path):
    written = write_walkthrough(tmp_path, llm=tiny_llm, decode_tokens=4)
    assert [p.name for p in written[:2]] == ["walkthrough.md", "walkthrough.zh.md"] and len(written) == 8
    en = (tmp_path / "walkthrough.md").read_text(encoding="utf-8")
    zh = (tmp_path / "walkthrough.zh.md").read_text(encoding="utf-8")
    assert "softmax(QKᵀ/√d)·V" in en and "自注意力" in zh
    for text in (en, zh):
        assert "{" not in text.replace("```", "")  # every field filled
        assert "model.py: Attention.forward" in text and "img/walkthrough-logit-lens.png" in text
    for p in written[2:]:
        picture_ok(p)


def test_real_model_trace_and_lens(default_llm, monkeypatch, capsys):
    """On SmolLM2-135M: the traced block equals the model's own, and the lens ends at the model's answer."""
    from llama3.inspect.logit_lens import logit_lens
    from llama3.inspect.trace import trace

    result = trace(default_llm, "The capital of France is", layer=3)
    assert result.checks[3]["block_output_max_abs_diff"] == 0.0
    assert result.top_next[0]["token"] == "␣Paris"
    ids = default_llm.tokenizer.encode("The capital of France is")
    lens = logit_lens(default_llm, ids)
    predicted = default_llm.model(torch.tensor([ids]))[0].argmax(-1)
    assert torch.equal(lens.top_ids[-1], predicted) and lens.top_ids.shape == (31, len(ids))


def test_chat_explain_on_the_real_model(default_llm):
    """`llama3 chat --explain` / `/explain`: the answer's steps, attention and stop token."""
    import io

    from llama3.commands.chat import answer, explain
    from llama3.generate import GenerationSettings

    record, shown = {}, io.StringIO()
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    text = answer(default_llm, [{"role": "user", "content": "What is the capital of France?"}], settings,
                  out=io.StringIO(), record=record)
    explain(default_llm, record, out=shown)
    report = shown.getvalue()
    assert "Paris" in text and record["finish_reason"] == "stop token"  # not a stop string, length or Ctrl-C
    assert "<|im_start|>·1" in report and "▸␣Paris" in report
    assert "head  8 (kv 2)" in report and "<|im_end|> (id 2)" in report


def test_walkthrough_source_links_point_at_their_definitions():
    """The committed walkthroughs link into model.py by line; a link must land on its def/class
    line (regenerate with `llama3 inspect walkthrough` after editing model.py)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for doc in ("walkthrough.md", "walkthrough.zh.md"):
        text = (root / "docs" / doc).read_text(encoding="utf-8")
        links = re.findall(r"\[`[\w.]+: ([\w.]+)`\]\(\.\./(llama3/[\w/]+\.py)#L(\d+)\)", text)
        assert links, f"{doc} has no source links"
        for name, path, line in links:
            source = (root / path).read_text(encoding="utf-8").splitlines()[int(line) - 1]
            assert re.match(rf"\s*(def|class) {name.split('.')[-1]}\b", source), f"{doc}: {name} -> {path}#L{line}"
