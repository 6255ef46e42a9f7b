"""`llama3 inspect patch | attribute | ablate` end to end on a tiny model: pictures, JSON, bad input."""

import json

from llama3.cli import main
from test_inspect import picture_ok
from test_inspect_cli import tiny_llm  # noqa: F401  (the fixture: llama3.load returns a tiny model)


def test_patch_attribute_ablate_write_pictures_and_json(tiny_llm, tmp_path, capsys):
    assert main(["inspect", "patch", "abcd", "abxd", "--site", "attn", "--out", str(tmp_path / "p.png"),
                 "--json", str(tmp_path / "p.json")]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["site"] == "attn" and len(data["restored"]) == tiny_llm.config.n_layers
    assert len(data["restored"][0]) == 5 and "/" in data["columns"][3] and "/" not in data["columns"][2]
    assert main(["inspect", "attribute", "abcd", "--method", "gradient-x-input", "--target", "#7",
                 "--out", str(tmp_path / "a.png"), "--json", "-"]) == 0
    out = capsys.readouterr().out
    attribution = json.loads(out[out.index("{"):])
    assert attribution["target"]["id"] == 7 and len(attribution["scores"]) == 5
    assert "attention is not attribution" in out
    assert main(["inspect", "ablate", "abcd", "--head", "1.0", "--block", "0", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["switched_off"] == ["head 1.0", "block 0"]
    for name in ("p.png", "a.png"):
        picture_ok(tmp_path / name)


def test_experiment_commands_bad_input(tiny_llm, tmp_path, capsys):
    assert main(["inspect", "patch", "abcd", "abc"]) == 2
    assert "same length" in capsys.readouterr().err
    assert main(["inspect", "ablate", "abcd", "--head", "x"]) == 2
    assert "LAYER.HEAD" in capsys.readouterr().err
    assert main(["inspect", "ablate", "abcd", "--block", "7"]) == 2
    assert "layer 7 does not exist" in capsys.readouterr().err
    assert main(["inspect", "patch", "abcd", "abxd", "--json", str(tmp_path / "no" / "p.json")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
