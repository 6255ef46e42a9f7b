"""torch.distributed on CPU (gloo): 2 processes train like 1 with the same global batch, under DDP and FSDP2,
and a checkpoint written by 2 processes resumes in 1."""

import json
import os
import subprocess
import sys

import pytest

from llama3.train import TrainConfig, pretrain
from llama3.train.data import prepare
from train_helpers import REPO, kjv_chapters, metrics_losses, one_thread, train_small_bpe, write_text_folder

single_thread = pytest.fixture(autouse=True)(one_thread)

FLAGS = ["--preset", "tiny", "--steps", "6", "--seq-len", "32", "--warmup-steps", "2", "--eval-interval", "3",
         "--eval-batches", "2", "--log-interval", "1", "--checkpoint-interval", "3", "--no-progress", "--seed", "7",
         "--sample-prompt", "And"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data, and a 1-process run with batch 4 (the global batch of 2 processes x batch 2)."""
    root = tmp_path_factory.mktemp("dist")
    texts = write_text_folder(root / "texts", n_docs=12)
    tokenizer = train_small_bpe(root / "data", kjv_chapters(12))
    prepare(texts, root / "data", tokenizer, "tok", val_fraction=0.2, progress=False)
    settings = dict(preset="tiny", steps=6, seq_len=32, warmup_steps=2, eval_interval=3, eval_batches=2,
                    log_interval=1, checkpoint_interval=3, progress=False, seed=7, sample_prompt=None)
    pretrain(TrainConfig(out=str(root / "one"), data=str(root / "data"), batch_size=4, **settings))
    return root


def torchrun(reference, out, strategy):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llama3", "train", "--data", str(reference / "data"), "--out", str(out),
           "--batch-size", "2", "--strategy", strategy, *FLAGS]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def val_losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r]


def assert_same_losses(a, b):
    (steps_a, losses_a), (steps_b, losses_b) = zip(*metrics_losses(a)), zip(*metrics_losses(b))
    assert steps_a == steps_b == tuple(range(1, 7))
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    assert val_losses(a) == pytest.approx(val_losses(b), rel=1e-5)


def test_ddp_two_processes_train_like_one(reference):
    result = torchrun(reference, reference / "ddp", "ddp")
    assert_same_losses(reference / "ddp", reference / "one")
    assert result.stdout.count("done:") == 1  # only rank 0 reports
    assert result.stdout.count("sample:") == 1


def test_fsdp_two_processes_train_like_one_and_resume_in_one(reference):
    torchrun(reference, reference / "fsdp", "fsdp")
    assert_same_losses(reference / "fsdp", reference / "one")
    # the checkpoint of 2 sharded processes continues in a single plain process
    settings = dict(preset="tiny", seq_len=32, warmup_steps=2, eval_interval=3, eval_batches=2, log_interval=1,
                    checkpoint_interval=3, progress=False, seed=7, sample_prompt=None, batch_size=4)
    resumed = pretrain(TrainConfig(out=str(reference / "fsdp"), data=str(reference / "data"), steps=8,
                                   resume=True, **settings))
    assert resumed.step == 8 and len(resumed.losses) == 2
    import llama3

    llm = llama3.load(reference / "fsdp")
    assert llm.tokenizer is not None and llm.config.vocab_size == llm.tokenizer.vocab_size
