"""llama3 doctor: settings warnings, and layer-by-layer comparison with transformers."""

import json

import pytest
import torch

from llama3.cli import main
from llama3.checkpoint.hf import config_to_hf
from llama3.config import PRESETS, RopeScaling
from llama3.inspect.doctor import check_settings, compare_with_transformers, diagnose, load_transformers_reference


def test_llama32_shape_with_factor_8_is_flagged():
    wrong = PRESETS["llama-3.2-1b"].replace(rope_scaling=RopeScaling(factor=8.0))
    warnings = check_settings(wrong, tokenizer=None)
    assert any("factor 32" in w and "says 8" in w for w in warnings)
    right = check_settings(PRESETS["llama-3.2-1b"], tokenizer=None)
    assert not any("factor" in w for w in right)


def test_other_known_mismatches_are_flagged():
    assert any("factor is 8" in w for w in check_settings(PRESETS["llama-3.1-8b"].replace(
        rope_scaling=RopeScaling(factor=32.0)), None))
    assert any("rope_theta is 10000" in w for w in check_settings(PRESETS["llama-3-8b"].replace(rope_theta=10000.0), None))
    assert any("not scaled" in w for w in check_settings(PRESETS["llama-3-8b"].replace(max_seq_len=131072), None))
    assert any("separate output" in w for w in check_settings(PRESETS["llama-3.2-3b"].replace(tie_embeddings=False), None))

    class Tok:  # a tokenizer smaller than Llama 3's embedding, whose end-of-turn token does not stop
        vocab_size, special_tokens, stop_ids, chat_format, chat_template = 128000, {"<|eot_id|>": 128009}, [], None, None

    warnings = check_settings(PRESETS["llama-3-8b"], Tok(), name="Meta-Llama-3-8B-Instruct", fmt="hf")
    assert any("128000 ids" in w for w in warnings)
    assert any("<|eot_id|> is not a stop token" in w for w in warnings)
    assert any("no chat template" in w for w in warnings)


def test_doctor_cli_flags_a_wrong_scaling_factor_from_config_alone(tmp_path, capsys):
    config = PRESETS["llama-3.2-3b"].replace(rope_scaling=RopeScaling(factor=8.0))
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(config)))
    assert main(["doctor", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "Hugging Face folder" in out and "llama-3.2-3b" in out and "factor 32" in out


def test_doctor_on_the_default_model(default_llm):
    d = diagnose(None)
    assert d.format == "gguf" and d.config == default_llm.config
    assert d.warnings == []
    assert "<|im_end|> (2)" in d.settings["stop tokens"]
    assert d.settings["chat template"].startswith("from the checkpoint")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random Llama written by transformers itself (safetensors, HF rotary layout)."""
    import transformers  # the reference: a dev dependency, never skipped
    folder = tmp_path_factory.mktemp("tiny_hf")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                      max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # norms random too, so a wrong norm would show
            p.normal_(0, 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(folder)
    return folder


def test_reference_comparison_agrees_then_finds_an_injected_divergence(hf_folder):
    import llama3

    ids = [1, 5, 9, 22, 40, 7, 3]
    reference = load_transformers_reference(hf_folder)
    llm = llama3.load(hf_folder)
    clean = compare_with_transformers(llm, reference, ids)
    assert clean.first_divergence is None
    assert [s["stage"] for s in clean.stages] == ["embedding", "block 0", "block 1", "block 2", "final norm", "logits"]
    assert all(s["cosine"] > 0.99999 and s["relative"] < 1e-4 for s in clean.stages)

    with torch.no_grad():  # break our copy of block 1's feed-forward only
        llm.model.layers[1].feed_forward.w2.weight.mul_(1.05)
    broken = compare_with_transformers(llm, reference, ids)
    assert broken.first_divergence == "block 1"
    stages = {s["stage"]: s for s in broken.stages}
    assert stages["block 0"]["relative"] < 1e-4 and stages["block 1"]["relative"] > 1e-3
    assert "first divergence" in broken.render() and "diverge first at block 1" in broken.render()


def test_doctor_cli_reference_transformers(hf_folder, capsys):
    assert main(["doctor", str(hf_folder), "--reference", "transformers", "--json"]) == 1  # flagged: no tokenizer
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hf" and report["comparison"]["first_divergence"] is None
    assert any("no tokenizer" in w for w in report["warnings"])


@pytest.mark.parametrize("text, match", [("{oops", "not valid JSON"),
                                          ('{"eos_token_id": "128009"}', "eos_token_id must be a token id")])
def test_doctor_reports_a_bad_generation_config(tmp_path, capsys, text, match):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(PRESETS["llama-3.2-1b"])))
    (tmp_path / "generation_config.json").write_text(text)
    assert main(["doctor", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "generation_config.json" in err and match in err


def test_doctor_reference_on_a_meta_folder_fails_before_loading(tmp_path, capsys, monkeypatch):
    import sys
    import types

    import llama3
    from conftest import make_config, make_model
    from llama3.llm import LLM

    config = make_config()
    LLM(make_model(config), config).save(tmp_path / "meta", format="meta")
    # a stand-in transformers (never used: the format check comes first), and a load that must not run
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoModelForCausalLM=None))
    monkeypatch.setattr(llama3, "load", lambda *a, **k: pytest.fail("loaded the model before the check"))
    assert main(["doctor", str(tmp_path / "meta"), "--reference", "transformers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: transformers cannot read Meta folders")
    assert "llama3 convert SOURCE --to hf OUT" in err
