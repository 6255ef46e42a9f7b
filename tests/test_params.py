"""Parameter counts: computed from the config, equal to the published totals and to a built model's own count."""

import pytest
import torch

from llama3.cli import main
from llama3.config import PRESETS
from llama3.model import Transformer
from llama3.params import count_params

from conftest import make_config

# Published totals: Meta's model cards (8B, 70B, 405B rounded there) and the exact HF counts.
PUBLISHED = {"llama-3-8b": 8_030_261_248, "llama-3.1-8b": 8_030_261_248, "llama-3.2-1b": 1_235_814_400,
             "llama-3.2-3b": 3_212_749_824, "llama-3-70b": 70_553_706_496, "llama-3.1-405b": 405_853_388_800}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_totals(name):
    assert count_params(PRESETS[name]).total == PUBLISHED[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_breakdown_equals_a_built_model(name):
    """Count the parameters of the real module (on the meta device: shapes, no memory), per group."""
    with torch.device("meta"):
        model = Transformer(PRESETS[name])
    groups = {"embedding": 0, "attention": 0, "feed_forward": 0, "norms": 0, "output": 0}
    for pname, p in model.named_parameters():  # a tied head is listed once, under the embedding
        group = ("embedding" if pname.startswith("tok_embeddings") else "output" if pname.startswith("output")
                 else "attention" if ".attention." in pname else "feed_forward" if ".feed_forward." in pname
                 else "norms")
        groups[group] += p.numel()
    counts = count_params(PRESETS[name])
    assert groups == {k: getattr(counts, k) for k in groups}
    assert counts.total == sum(p.numel() for p in model.parameters())


def test_tied_head_adds_nothing():
    untied, tied = count_params(make_config()), count_params(make_config(tie_embeddings=True))
    assert tied.output == 0 and untied.output == untied.embedding
    assert untied.total - tied.total == 101 * 64


def test_params_command(capsys):
    assert main(["params", "llama-3-8b"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out
    assert "5,637,144,576" in out  # feed-forward
    assert "GiB float32" in out and "GiB bfloat16" in out


def test_params_of_a_checkpoint_folder(tmp_path, capsys):
    from llama3.checkpoint import save_checkpoint
    from llama3.llm import LLM

    config = make_config(tie_embeddings=True)
    save_checkpoint(LLM(model=Transformer(config), config=config), tmp_path, format="hf")
    assert main(["params", str(tmp_path)]) == 0
    assert f"{count_params(config).total:,}" in capsys.readouterr().out
