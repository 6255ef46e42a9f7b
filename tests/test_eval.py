"""lm-evaluation-harness against our server (its `local-completions` backend, tokenizing through our
/tokenize) gives the same per-item log-likelihoods and accuracy as lm-eval's own `hf` backend on
transformers' model of the same GGUF file, and the same greedy generations as transformers;
`local-chat-completions` runs unchanged; `llama3 eval` fails cleanly on bad input."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llama3.evaluation import evaluate, task_config

EVALS = Path(__file__).resolve().parent.parent / "evals"
MC, GENERATION = str(EVALS / "llama3_facts.yaml"), str(EVALS / "llama3_capitals.yaml")
NAME = "smollm2-135m-instruct"


def per_item(results: dict, task: str) -> list:
    return [sample for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def transformers_greedy(model, tokenizer, prompt: str, new_tokens: int, until: list[str]) -> str:
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    return min((text.split(stop)[0] for stop in until), key=len)


def test_lm_eval_through_our_server_equals_transformers(default_llm, transformers_gguf):
    import copy

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, shared_tokenizer = transformers_gguf
    tokenizer = copy.deepcopy(shared_tokenizer)  # HFLM may set its pad token: the session's stays as loaded

    ours = evaluate(default_llm, NAME, [MC, GENERATION], log_samples=True)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
                                     tasks=[task_config(MC)], log_samples=True, bootstrap_iters=0,
                                     task_manager=TaskManager(include_defaults=False))
    scored = 0
    for a, b in zip(per_item(ours, "llama3_facts"), per_item(theirs, "llama3_facts"), strict=True):
        for (ll_ours, greedy_ours), (ll_theirs, greedy_theirs) in zip(a["filtered_resps"], b["filtered_resps"],
                                                                       strict=True):
            assert math.isclose(ll_ours, ll_theirs, abs_tol=2e-3), (ll_ours, ll_theirs)
            assert greedy_ours == greedy_theirs
            scored += 1
    assert scored == 32  # 8 questions x 4 answers
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["llama3_facts"][metric] == theirs["results"]["llama3_facts"][metric], metric
    assert ours["results"]["llama3_facts"]["acc,none"] > 0.25  # better than chance: the scores mean something

    for sample in per_item(ours, "llama3_capitals")[:2]:  # transformers' generate is slow here: two items
        prompt = sample["arguments"][0][0]  # (context, generation kwargs) of its one request
        want = transformers_greedy(model, tokenizer, prompt, 8, ["\n", ".", ","])
        assert sample["filtered_resps"][0] == want, prompt

    chat = evaluate(default_llm, NAME, [GENERATION], chat=True, log_samples=True)
    answers = [s["filtered_resps"][0] for s in per_item(chat, "llama3_capitals")]
    messages = [[{"role": "user", "content": f"The capital of {s['doc']['country']} is"}]
                for s in per_item(chat, "llama3_capitals")]
    want = [default_llm.chat(m, max_new_tokens=8, temperature=0, stop=["\n", ".", ","]) for m in messages]
    assert len(answers) == 6 and answers == want


def test_eval_command_refuses_bad_task_files(tmp_path, capsys):
    """(The CLI's main in this process: the refusals come before any model or process matters.)"""
    from llama3.cli import main

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "nothing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nothing.yaml'}: no such task file"
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n")
    assert main(["eval", str(broken)]) == 2
    stderr = capsys.readouterr().err
    assert "not a readable task YAML" in stderr and "Traceback" not in stderr
