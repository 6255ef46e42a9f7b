"""Tensor parallelism on CPU/gloo with 2 processes: the same logits and tokens as one process, half the
weights per rank, and one-line errors (never a hang) when N is wrong or a rank dies.

The reference is one process loading the same file with the checkpoint readers (`llama3.load`), whose
whole-tensor path shares nothing with the sliced reads; the Meta shards are cut by the test itself."""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llama3.cli import main

REPO = Path(__file__).resolve().parent.parent
HELPERS = REPO / "tests" / "tp_helpers"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LLAMA3_TP_TIMEOUT": "20", "PYTHONPATH": str(REPO)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    sys.path.insert(0, str(HELPERS))
    from checkpoints import write_all

    return write_all(tmp_path_factory.mktemp("tp"))


def results(stdout: str) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    return {(row["case"], row["rank"]): row for row in rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(script: str, *args: str, stdin: str = "") -> list[subprocess.Popen]:
    """`script args` as ranks 0 and 1 of a gloo group, started by hand (torchrun's agent would cost a third
    Python and would stop a survivor itself) -> the finished processes, with .out and .err."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HELPERS / script), *args], cwd=REPO,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    try:
        for r, p in enumerate(procs):
            p.out, p.err = p.communicate(stdin if r == 0 else "", timeout=240)
    finally:
        for p in procs:
            p.kill()
    return procs


def test_two_ranks_equal_one_process(checkpoints):
    cases = {c: p for c, p in checkpoints.items() if c != "cli"}
    procs = two_ranks("tp_parity.py", json.dumps(cases))
    assert [p.returncode for p in procs] == [0, 0], procs[0].err[-3000:] + procs[1].err[-3000:]
    got = results(procs[0].out + procs[1].out)
    cases = [c for c in checkpoints if c not in ("medium", "cli")]
    assert {c for c, _ in got} == {*cases, "medium", "engine"}
    for case in cases:
        for rank in (0, 1):
            row = got[case, rank]
            assert row["diff"] < 1e-4 and row["same_tokens"], row
            assert row["local"] < 0.55 * row["whole"], row            # about half: the norms are on both
        assert got[case, 0]["local"] == got[case, 0]["planned"]        # `llama3 params --tp 2`'s count
    for rank in (0, 1):
        medium = got["medium", rank]
        assert medium["local"] == medium["planned"] and medium["local"] < 0.51 * medium["whole"]
        assert medium["rss"] < 0.75 * medium["whole"], medium          # resident: about half, with a margin
    assert got["engine", 0]["same_tokens"] and got["engine", 0]["steps"] > 1


def test_cli_generate_tp2_equals_one_process(checkpoints, capsys):
    """`torchrun --nproc-per-node 2 -m llama3 generate --tp 2 -` (the prompt on stdin, which only rank 0
    reads) prints what `llama3 generate` prints (greedy), once: rank 1 writes nothing."""
    args = ["generate", "--model", checkpoints["cli"], "--max-new-tokens", "6"]
    assert main([*args, "--plain", "the lazy"]) == 0
    one = capsys.readouterr().out
    two = subprocess.run([*TORCHRUN, "-m", "llama3", *args, "--tp", "2", "-"], input="the lazy", capture_output=True,
                         text=True, cwd=REPO, env=ENV, timeout=180)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one and one.strip()
    assert two.stderr.count("new tokens; prefill") == 1


@pytest.mark.parametrize("scenario, survivor", [("follower", 0), ("leader", 1)])
def test_a_rank_that_dies_stops_the_other_with_one_line(checkpoints, scenario, survivor, monkeypatch, capsys):
    """Rank 1 dies during `generate --tp 2`, or rank 0 during `chat --tp 2` (after its first answer, which
    equals one process's) while rank 1 follows its engine: the survivor ends (within the collectives'
    timeout at worst), saying so in one line."""
    procs = two_ranks("tp_die.py", scenario, checkpoints["cli"], stdin="the lazy\n")
    if scenario == "leader":
        monkeypatch.setattr(sys, "stdin", io.StringIO("the lazy\n"))
        assert main(["chat", "--model", checkpoints["cli"], "--max-new-tokens", "8", "--temperature", "0",
                     "--plain"]) == 0
        assert procs[0].out == capsys.readouterr().out and procs[0].out.strip()
    assert procs[1 - survivor].returncode == 3                      # the one made to die
    err = procs[survivor].err
    assert procs[survivor].returncode == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"rank {survivor}: a tensor-parallel collective failed" in errors[0], errors
    assert "Traceback" not in err


def test_tp_without_torchrun_or_with_another_world_size(checkpoints, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--model", checkpoints["cli"], "--tp", "2", "hi"]) == 2
    assert "--tp 2 needs 2 processes: run it as `torchrun --nproc-per-node 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["bench", "--model", checkpoints["cli"], "--tp", "2"]) == 2
    assert "--tp 2 but torchrun started 3 processes" in capsys.readouterr().err
    assert main(["chat", "--model", checkpoints["cli"], "--tp", "2", "--quantize", "int8"]) == 2
    assert "--quantize is not available with --tp" in capsys.readouterr().err


def test_bad_n_says_which_n_are_possible(checkpoints, monkeypatch, capsys):
    """N must divide the key/value heads: checked from the config, before any process group is joined."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main(["perplexity", __file__, "--model", checkpoints["cli"], "--tp", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --tp 3: the model has 2 key/value heads, which must split evenly over the ranks; "
                       "possible --tp values: 1, 2")
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_params_plans_each_rank(capsys):
    assert main(["params", "llama-3.1-70b", "--tp", "8", "--context", "8192", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    # 70B over 8 ranks: every matrix / 8 (80 layers x (attention 151M + feed-forward 705M) / 8, vocabulary / 8)
    assert "8,820,367,360 parameters" in out and "16.4 GiB bfloat16" in out
    # KV: 2 (k, v) x 80 layers x 1 kv head x 128 x 2 bytes x 4 x 8192 tokens = 1.25 GiB
    assert "1.2 GiB at bfloat16 for 4 x 8,192 tokens (1 key/value heads of 8)" in out
    assert main(["params", "llama-3.1-70b", "--tp", "3"]) == 2
    assert "possible --tp values: 1, 2, 4, 8" in capsys.readouterr().err


def test_serve_tp2_listens_on_rank0_and_answers_like_one_process(checkpoints):
    """`torchrun ... serve --tp 2`: two concurrent requests (batched engine steps that rank 1 mirrors) get
    one process's greedy text; echo, a forward only rank 0 would run, is a 400; SIGTERM stops every rank."""
    import signal
    import threading
    import time
    import urllib.error
    import urllib.request

    import llama3

    port = free_port()
    server = subprocess.Popen([*TORCHRUN, "-m", "llama3", "serve", "--model", checkpoints["cli"], "--tp", "2",
                               "--port", str(port), "--kv-memory", "4MB"], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                time.sleep(0.5)
        prompts = ["the lazy", "def f(x):"]
        answers = [None, None]

        def ask(i):
            answers[i] = post({"prompt": prompts[i], "max_tokens": 8, "temperature": 0})
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status, echo = post({"prompt": "the lazy", "max_tokens": 1, "echo": True, "logprobs": 1})
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=60)
        finally:
            server.kill()
    one = llama3.load(checkpoints["cli"], plain=True)
    assert [a[1]["choices"][0]["text"] for a in answers] == [one.generate(p, max_new_tokens=8) for p in prompts]
    assert status == 400 and "not available with --tp" in echo["error"]["message"]
    assert err.count("serving ") == 1                                  # rank 0 alone says it, and listens
