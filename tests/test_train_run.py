"""A training run as a unit and as a user meets it: train_step alone (accumulation = a bigger batch), the
output folder guarded (--overwrite, --resume), a resume that would change the run refused, a damaged
newest checkpoint falling back, leftovers cleaned, a full disk in one line, SFT data checks."""

import copy
import json

import pytest
import torch

from llama3.cli import main
from llama3.errors import Llama3Error
from llama3.train import TrainConfig, pretrain
from llama3.train.data import Batch, prepare
from llama3.train.distributed import Dist
from train_helpers import kjv_chapters, metrics_losses, one_thread, tiny_settings, train_small_bpe, write_text_folder

single_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    texts = write_text_folder(root / "texts", n_docs=8)
    tokenizer = train_small_bpe(root / "data", kjv_chapters(8))
    prepare(texts, root / "data", tokenizer, "tok", val_fraction=0.2, progress=False)
    return root / "data"


def settings(prepared, out, **overrides) -> TrainConfig:
    base = dict(out=str(out), data=str(prepared), steps=4, checkpoint_interval=2, eval_interval=0, eval_batches=1)
    return TrainConfig(**tiny_settings(**{**base, **overrides}))


def test_accumulating_k_micro_batches_steps_like_one_batch_k_times_larger():
    from llama3.config import get_preset
    from llama3.model import Transformer
    from llama3.train.trainer import train_step

    config = get_preset("tiny").replace(vocab_size=64)
    windows = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(0))  # [8, T+1]
    batch = lambda rows: Batch(tokens=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous())  # noqa: E731
    models, stats = [], []
    for micro in ([batch(windows)], [batch(windows[i:i + 2]) for i in range(0, 8, 2)]):
        model = Transformer(config).init_weights(seed=0).train()
        optimizer = torch.optim.SGD(model.parameters())  # p - lr * grad: equal weights mean equal gradients
        stats.append(train_step(model, optimizer, micro, lr=1.0, grad_clip=0.5))
        models.append(model)
    one, four = stats
    assert one.loss == pytest.approx(four.loss, rel=1e-6) and one.grad_norm == pytest.approx(four.grad_norm, rel=1e-5)
    assert one.tokens == four.tokens == 8 * 16 and one.lr == 1.0
    moved = 0.0
    for (name, p), q, p0 in zip(models[0].named_parameters(), models[1].parameters(),
                                Transformer(config).init_weights(seed=0).parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((p - p0).detach().abs().max()))
    assert moved > 1e-3  # the step did change the weights


def test_train_refuses_to_replace_an_earlier_run(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    first = pretrain(settings(prepared, out, steps=2))
    with pytest.raises(Llama3Error, match=r"holds an earlier run \(checkpoint at step 2\); pass --resume"):
        pretrain(settings(prepared, out, steps=2, seed=8))
    again = pretrain(settings(prepared, out, steps=2, seed=8, overwrite=True))
    assert "--overwrite: removed the earlier run" in capsys.readouterr().err
    assert [s for s, _ in metrics_losses(out)] == [1, 2] and again.losses != first.losses
    # through the CLI: one line, and --sample-prompt None samples nothing
    assert main(["train", "--data", str(prepared), "--out", str(out), "--steps", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert TrainConfig(sample_prompt="None").sample_prompt is None and TrainConfig().sample_prompt == ""


def test_resume_refuses_settings_that_change_the_run(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(settings(prepared, out))
    with pytest.raises(Llama3Error) as refused:
        pretrain(settings(prepared, out, steps=6, resume=True, batch_size=8, lr=1e-3, seed=3))
    message = str(refused.value)
    assert "--resume would change" in message and "--allow-changes" in message
    assert "lr: 0.003 -> 0.001" in message and "seed: 7 -> 3" in message and "global batch" in message
    assert "steps" not in message.split("(")[1]  # training further is what resuming is for
    resumed = pretrain(settings(prepared, out, steps=6, resume=True, lr=1e-3, allow_changes=True))
    assert resumed.step == 6 and len(resumed.losses) == 2
    assert "--allow-changes: resuming with lr: 0.003 -> 0.001" in capsys.readouterr().err


def test_a_damaged_newest_checkpoint_falls_back_and_leftovers_are_cleaned(prepared, tmp_path, capsys):
    full = pretrain(settings(prepared, tmp_path / "full", steps=6))
    out = tmp_path / "run"
    pretrain(settings(prepared, out))                               # checkpoints at steps 2 and 4
    state = out / "checkpoints" / "step_0000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])                     # the newest one, cut short
    leftovers = [out / ".metrics.jsonl.x1.tmp", out / "checkpoints" / ".step_0000006.x2.tmp",
                 out / "data" / ".train_000.bin.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "step_" in path.name else path.write_bytes(b"partial")
    capsys.readouterr()
    resumed = pretrain(settings(prepared, out, steps=6, resume=True))
    err = capsys.readouterr().err
    assert "removed 3 temporary file(s)" in err and not any(p.exists() for p in leftovers)
    assert "warning: " in err and "step_0000004" in err and "resuming from the previous checkpoint, step_0000002" in err
    assert resumed.step == 6 and resumed.losses == full.losses[2:]  # steps 3..6, exactly as uninterrupted


def test_a_full_disk_during_a_checkpoint_is_one_line(prepared, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    import llama3.train.checkpointing as checkpointing
    from llama3.params import human_bytes

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1024))
    out = tmp_path / "run"
    assert main(["train", "--data", str(prepared), "--out", str(out), "--preset", "tiny", "--steps", "1",
                 "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'checkpoints'}: no space left on the disk") and err.count("\n") == 1
    assert "it needs about " in err and f"{human_bytes(1024)} free" in err and "--resume" in err
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_cpu_runs_log_no_mfu_and_a_known_peak_does(tmp_path):
    from llama3.config import get_preset
    from llama3.model import Transformer
    from llama3.train.trainer import train_loop

    data = type("One", (), {"__len__": lambda self: 1, "batch": lambda self, idx: Batch(
        tokens=torch.zeros(len(idx), 16, dtype=torch.long), targets=torch.ones(len(idx), 16, dtype=torch.long))})()
    for peak, out in ((None, tmp_path / "cpu"), (1e12, tmp_path / "peak")):
        cfg = TrainConfig(out=str(out), steps=1, batch_size=1, seq_len=16, warmup_steps=0, eval_interval=0,
                          checkpoint_interval=0, progress=False, peak_flops=peak)
        train_loop(Transformer(get_preset("tiny").replace(vocab_size=8)).init_weights(seed=0), cfg, data, None, Dist())
        (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert ("mfu" in record) == (peak is not None) and record["tflops"] >= 0


def test_sft_refuses_non_utf8_data_and_warns_when_the_data_is_under_a_batch(tmp_path, capsys):
    from llama3.config import get_preset
    from llama3.llm import LLM
    from llama3.model import Transformer

    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                    + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"))
    assert main(["sft", "--data", str(bad), "--out", str(tmp_path / "x"), "--model", "/no/such"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not UTF-8 text" in err and err.count("\n") == 1
    tokenizer = train_small_bpe(tmp_path / "tok", kjv_chapters(2), vocab_size=300)
    model = Transformer(get_preset("tiny").replace(vocab_size=tokenizer.vocab_size, dim=32, hidden_dim=64))
    LLM(model.init_weights(seed=0), model.config, tokenizer).save(tmp_path / "base")
    good = tmp_path / "chats.jsonl"
    good.write_text(bad.read_bytes().splitlines()[0].decode() + "\n")
    assert main(["sft", "--model", str(tmp_path / "base"), "--data", str(good), "--out", str(tmp_path / "tuned"),
                 "--seq-len", "64", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "fewer than one batch of 4" in err and "one epoch is 1 step(s)" in err


def test_train_config_is_grouped_and_keeps_its_flat_names(tmp_path):
    from llama3.train.config import DataSettings, OptimizerSettings, config_from_args

    cfg = TrainConfig(out="o", batch_size=8, weight_decay=0.0, lr=1e-3, lora_rank=4, strategy="ddp", data="books/")
    assert cfg.data == DataSettings(source="books/", batch_size=8)
    assert cfg.optimizer == OptimizerSettings(weight_decay=0.0) and cfg.schedule.lr == 1e-3
    assert (cfg.lora.rank, cfg.parallel.strategy, cfg.out) == (4, "ddp", "o")
    flat = cfg.to_dict()
    assert flat["lora_rank"] == 4 and flat["data"] == "books/" and TrainConfig.from_dict(flat) == cfg
    assert TrainConfig(optimizer=OptimizerSettings(weight_decay=0.0), out="o").optimizer.weight_decay == 0.0
    (tmp_path / "run.toml").write_text('steps = 3\n[data]\nbatch_size = 2\n[lora]\nrank = 8\n[optimizer]\nbeta2 = 0.99\n')
    from_file = TrainConfig.from_file(tmp_path / "run.toml")
    assert (from_file.schedule.steps, from_file.data.batch_size, from_file.lora.rank, from_file.optimizer.beta2) == \
        (3, 2, 8, 0.99)
    with pytest.raises(Llama3Error, match="unknown training settings"):
        TrainConfig(stepz=3)
    # the flags are the same flat names as before, shown in one --help section per group
    import argparse

    from llama3.commands import train

    parser = argparse.ArgumentParser()
    train.configure(parser)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    assert {"--data", "--batch-size", "--lr", "--weight-decay", "--strategy", "--resume", "--seq-len"} <= flags
    assert {"data settings", "optimizer settings", "schedule settings", "parallel settings"} <= \
        {g.title for g in parser._action_groups}
    args = parser.parse_args(["--out", "o", "--batch-size", "3", "--config", str(tmp_path / "run.toml")])
    assert config_from_args(args, train.FIELDS, out="o").data.batch_size == 3  # flags win over the file
