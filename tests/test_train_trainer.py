"""The training loop: it learns, it resumes exactly (also after kill -9), its pieces behave."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llama3.errors import Llama3Error
from llama3.train import TrainConfig, pretrain
from llama3.train.config import read_config_file
from llama3.train.data import Batch, prepare
from llama3.train.distributed import Dist
from llama3.train.trainer import lr_at, param_groups, train_loop
from train_helpers import one_thread, REPO, kjv_chapters, metrics_losses, tiny_settings, train_small_bpe, write_text_folder


single_thread = pytest.fixture(autouse=True)(one_thread)

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared data folder (12 KJV chapters, a 320-token BPE)."""
    root = tmp_path_factory.mktemp("prepared")
    texts = write_text_folder(root / "texts", n_docs=12)
    tokenizer = train_small_bpe(root / "data", kjv_chapters(12))
    prepare(texts, root / "data", tokenizer, "tok", val_fraction=0.2, progress=False)
    return root / "data"


class OneBatch:
    """A dataset of a single fixed window, to overfit."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return 1

    def batch(self, indices):
        rows = self.tokens.expand(len(indices), -1)
        return Batch(tokens=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous())


def test_overfitting_one_batch_drives_the_loss_near_zero(tmp_path):
    from llama3.config import get_preset
    from llama3.model import Transformer

    torch.manual_seed(0)
    config = get_preset("tiny").replace(vocab_size=64)
    model = Transformer(config).init_weights(seed=0)
    data = OneBatch(torch.randint(0, 64, (1, 33)))
    cfg = TrainConfig(out=str(tmp_path), steps=150, batch_size=2, seq_len=32, lr=1e-2, min_lr=1e-3,
                      warmup_steps=10, weight_decay=0.0, eval_interval=0, checkpoint_interval=0, progress=False)
    _, result = train_loop(model, cfg, data, None, Dist())
    assert result.losses[0] > 3.5          # ~ln(64) = 4.16 at the start
    assert result.losses[-1] < 0.05        # memorised
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # halfway through the cosine: the mean of lr and min_lr
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_weight_decay_skips_norms(tiny_model):
    decay, no_decay = param_groups(tiny_model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in tiny_model.parameters())


def test_exact_resume_in_process(prepared, tmp_path):
    full = pretrain(TrainConfig(**tiny_settings(out=str(tmp_path / "full"), data=str(prepared))))
    # a run with the same schedule (steps=8) interrupted right after its checkpoint at step 4
    stopped = tmp_path / "stopped"
    first = _run_until(prepared, stopped, stop_at=4)
    resumed = pretrain(TrainConfig(**tiny_settings(out=str(stopped), data=str(prepared), resume=True)))
    assert first + resumed.losses == full.losses  # bit-for-bit
    assert metrics_losses(stopped) == metrics_losses(tmp_path / "full")


def _run_until(prepared, out, stop_at):
    """Train with steps=8 but stop (as if interrupted) right after the checkpoint at `stop_at`."""
    import llama3.train.trainer as trainer

    real = trainer.save_training_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        if args[3]["step"] == stop_at:
            raise Stop

    trainer.save_training_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            pretrain(TrainConfig(**tiny_settings(out=str(out), data=str(prepared))))
    finally:
        trainer.save_training_checkpoint = real
    return [loss for _, loss in metrics_losses(out)]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    import llama3.train.checkpointing as ck
    from llama3.train import TrainConfig, pretrain
    real_save, calls = torch.save, [0]
    def save_or_die(obj, path, *a, **k):   # die by SIGKILL while writing the 2nd checkpoint
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)
    ck.torch.save = save_or_die
    pretrain(TrainConfig(**{settings}))
""")


def test_exact_resume_after_kill_minus_9(prepared, tmp_path):
    reference = tmp_path / "reference"
    pretrain(TrainConfig(**tiny_settings(out=str(reference), data=str(prepared), steps=12)))
    killed = tmp_path / "killed"
    settings = tiny_settings(out=str(killed), data=str(prepared), steps=12)
    script = KILL_SCRIPT.replace("{settings}", repr(settings))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    latest = json.loads((killed / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4  # the checkpoint at step 8 died half-written; step 4 is intact
    assert any(p.name.startswith(".step_0000008") for p in (killed / "checkpoints").iterdir())
    assert max(step for step, _ in metrics_losses(killed)) == 8
    resumed = pretrain(TrainConfig(**{**settings, "resume": True}))
    assert resumed.step == 12 and len(resumed.losses) == 8
    assert metrics_losses(killed) == metrics_losses(reference)  # steps 1..12, exactly equal
    import llama3

    a, b = llama3.load(killed), llama3.load(reference)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name


def test_config_files_and_unknown_keys(tmp_path):
    (tmp_path / "run.toml").write_text('steps = 3\nlr = 0.01\npreset = "tiny"\n')
    (tmp_path / "run.json").write_text(json.dumps({"steps": 3, "batch_size": 2}))
    assert TrainConfig.from_file(tmp_path / "run.toml", out="x").schedule.lr == 0.01
    assert TrainConfig.from_file(tmp_path / "run.json").data.batch_size == 2
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(Llama3Error, match="unknown training settings.*stepz"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(Llama3Error, match="config file not found"):
        read_config_file(tmp_path / "none.toml")
    with pytest.raises(Llama3Error, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(Llama3Error, match="strategy"):
        TrainConfig(strategy="zero3")
    assert math.isclose(TrainConfig().schedule.lr, 3e-3)


def _parse(command, argv):
    import argparse
    import importlib

    module = importlib.import_module(f"llama3.commands.{command}")
    parser = argparse.ArgumentParser()
    module.configure(parser)
    return module, parser.parse_args(argv)


def test_a_low_lr_alone_lowers_the_default_min_lr():
    from llama3.train.config import config_from_args

    assert TrainConfig().schedule.min_lr == 3e-4 and math.isclose(TrainConfig(lr=1e-4).schedule.min_lr, 1e-5)
    train, args = _parse("train", ["--out", "o", "--lr", "1e-4"])
    cfg = config_from_args(args, train.FIELDS, out="o")
    assert cfg.schedule.lr == 1e-4 and math.isclose(cfg.schedule.min_lr, 1e-5)
    sft, args = _parse("sft", ["--out", "o", "--lora-rank", "8", "--lr", "5e-5"])
    cfg = config_from_args(args, sft.FIELDS, defaults=dict(sft.SFT_DEFAULTS, lr=1e-3, min_lr=1e-4), out="o")
    assert cfg.schedule.lr == 5e-5 and math.isclose(cfg.schedule.min_lr, 5e-6)
    _, args = _parse("sft", ["--out", "o", "--lora-rank", "8"])  # the default floor when lr allows it
    assert config_from_args(args, sft.FIELDS, defaults=dict(sft.SFT_DEFAULTS, lr=1e-3, min_lr=1e-4)).schedule.min_lr == 1e-4
    _, args = _parse("train", ["--out", "o", "--lr", "1e-4", "--min-lr", "2e-4"])  # an explicit one is checked
    with pytest.raises(Llama3Error, match="min_lr <= lr"):
        config_from_args(args, train.FIELDS)


def test_config_file_values_of_the_wrong_type(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"lr": "3e-3", "steps": "5", "warmup_steps": 2.0}))
    cfg = TrainConfig.from_file(tmp_path / "run.json")
    assert (cfg.schedule.lr, cfg.schedule.steps, cfg.schedule.warmup_steps) == (3e-3, 5, 2)
    assert type(cfg.schedule.warmup_steps) is int
    for bad, key in [({"lr": "fast"}, "lr"), ({"eval_interval": "often"}, "eval_interval"),
                     ({"compile": "yes"}, "compile"), ({"out": 3}, "out"), ({"steps": 2.5}, "steps"),
                     ({"min_lr": [1]}, "min_lr")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(Llama3Error, match=f"^{key}="):
            TrainConfig.from_file(tmp_path / "bad.json")


def test_resuming_a_finished_run_reports_its_losses(tmp_path, capsys):
    from llama3.config import get_preset
    from llama3.model import Transformer
    from llama3.train.trainer import describe

    config = get_preset("tiny").replace(vocab_size=64)
    data = OneBatch(torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(0)))
    cfg = TrainConfig(out=str(tmp_path), steps=3, batch_size=2, seq_len=32, warmup_steps=1, eval_interval=0,
                      checkpoint_interval=0, log_interval=1, progress=False)
    _, first = train_loop(Transformer(config).init_weights(seed=0), cfg, data, data, Dist())
    capsys.readouterr()
    again = TrainConfig(**{**cfg.to_dict(), "resume": True})
    _, result = train_loop(Transformer(config).init_weights(seed=1), again, data, data, Dist())
    assert "already at step 3" in capsys.readouterr().err
    assert result.step == 3 and result.losses == []
    assert result.loss == first.losses[-1]
    assert math.isclose(result.val_loss, first.val_loss, rel_tol=1e-5)
    assert "nan" not in describe(result) and describe(result).startswith("already at step 3")
