"""The Lab's JSON endpoints (llama3/lab) on a tiny random model with a byte tokenizer.

Views are checked against independent computations: a plain forward pass, llama3.inspect's
capture / logit_lens (other hook code), the Python experiments, transformers (fidelity), and
the source of llama3/model.py itself; bad input gets the server's OpenAI-shaped 4xx errors."""

import inspect as pyinspect
import json

import pytest
import torch
from fastapi.testclient import TestClient

import llama3.model as model_module
from conftest import make_config, make_model
from llama3.inspect import ablate, patch
from llama3.inspect.capture import capture
from llama3.inspect.logit_lens import logit_lens
from llama3.lab import mount_lab, views
from llama3.llm import LLM
from llama3.server import create_app
from test_server import ByteTokenizer

KEY = "lab-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def llm():
    model = make_model(make_config(vocab_size=259, n_layers=2))
    return LLM(model, model.config, tokenizer=ByteTokenizer())


@pytest.fixture(scope="module")
def client(llm):
    app = mount_lab(create_app(llm, "tiny", api_key=KEY), llm, source=False, name="tiny")
    with TestClient(app) as c:
        yield c


def post(client, path, body, **kw):
    return client.post(path, json=body, headers=AUTH, **kw)


def events(response):
    lines = [l.removeprefix("data: ") for l in response.text.split("\n\n") if l.strip()]
    assert lines[-1] == "[DONE]"
    return [json.loads(l) for l in lines[:-1]]


def test_page_and_assets_need_no_key_but_the_api_does(client):
    page = client.get("/lab")
    assert page.status_code == 200 and "/lab/static/lab.js" in page.text and "plotly-cartesian.min.js" in page.text
    assert client.get("/lab/static/plotly-cartesian.min.js").status_code == 200
    for path in ("/lab/api/info",):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post("/lab/api/token", json={"ids": [1, 2]}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    info = client.get("/lab/api/info", headers=AUTH).json()
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["n_rep"]) == (2, 4, 2, 2)


def test_generate_streams_tokens_with_the_candidates_of_a_plain_forward(client, llm):
    r = post(client, "/lab/api/generate", {"prompt": "Hi there", "max_tokens": 5})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r)
    prompt, tokens, end = got[0], got[1:-1], got[-1]
    assert prompt["ids"] == list(b"Hi there") and end["type"] == "end" and len(tokens) == 5
    ids = prompt["ids"] + [t["id"] for t in tokens]
    with torch.no_grad():
        probs = llm.model(torch.tensor([ids]))[0].softmax(-1)            # teacher-forced, one pass
    for k, t in enumerate(tokens):
        p = probs[len(prompt["ids"]) - 1 + k]
        assert t["id"] == int(p.argmax())                                 # greedy
        assert t["prob"] == pytest.approx(float(p[t["id"]]), abs=1e-5)
        assert [c["id"] for c in t["candidates"]] == p.topk(10).indices.tolist()
        assert t["candidates"][0]["sampled_prob"] == 1.0                 # greedy puts all mass there
    assert "".join(t["text"] for t in tokens) == llm.tokenizer.decode([t["id"] for t in tokens])

    sampled = events(post(client, "/lab/api/generate", {"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 3, "temperature": 0.8, "top_k": 5, "seed": 1}))
    first = sampled[1]["candidates"]
    assert sum(c["sampled_prob"] for c in first) == pytest.approx(1.0, abs=1e-5)   # top-5 of 10 shown
    assert all(c["sampled_prob"] == 0 for c in first[5:])
    assert sampled[0]["ids"] == llm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])


def test_token_views_equal_capture_and_the_logit_lens(client, llm):
    ids = list(b"Hello, w")
    got = post(client, "/lab/api/token", {"ids": ids}).json()
    cap = capture(llm.model, torch.tensor([ids]), attention_layers="all")
    for layer in range(2):
        expected = cap.attention_weights[layer][0, :, -1]                 # [H, S]
        assert torch.tensor(got["attention"][layer]) == pytest.approx(expected, abs=1e-6)
    lens = logit_lens(llm, ids)
    assert [row["top"][0]["id"] for row in got["lens"]] == lens.top_ids[:, -1].tolist()
    assert [row["top"][0]["prob"] for row in got["lens"]] == pytest.approx(lens.top_probs[:, -1].tolist(), abs=1e-6)
    res = got["residual"]
    assert res["attention_adds"] == pytest.approx([float(a[0, -1].norm()) for a in cap.attention_out], rel=1e-5)
    assert res["ffn_adds"] == pytest.approx([float(f[0, -1].norm()) for f in cap.ffn_out], rel=1e-5)
    assert res["stream"][-1] == pytest.approx(float(cap.block_outputs[-1][0, -1].norm()), rel=1e-5)
    head = post(client, "/lab/api/head", {"ids": ids, "layer": 1}).json()
    assert torch.tensor(head["weights"]) == pytest.approx(cap.attention_weights[1][0], abs=1e-6)


def test_walk_quotes_model_py_and_the_walkthrough_in_both_languages(client):
    got = post(client, "/lab/api/walk", {"prompt": "Hey you", "layer": 1}).json()
    names = [s["name"] for s in got["steps"]]
    for name in ("embedding", "softmax", "RoPE", "SwiGLU", "logits"):
        assert any(name in n for n in names), name
    source = pyinspect.getsource(model_module).splitlines()
    softmax = next(s for s in got["steps"] if s["name"].startswith("softmax"))
    assert softmax["shape"] == "[B=1, H=4, T=7, S=7]" and len(softmax["heatmap"]) == 7
    code = softmax["code"]
    assert source[code["focus"] - 1].strip().startswith("weights = self.softmax")
    assert code["lines"] == source[code["start"] - 1:code["start"] - 1 + len(code["lines"])]
    assert "attention" in softmax["text"]["en"]["title"].lower() and "注意力" in softmax["text"]["zh"]["title"]
    assert softmax["text"]["en"]["text"] and softmax["text"]["zh"]["text"]


def test_experiments_equal_the_python_api(client, llm):
    got = post(client, "/lab/api/patch", {"clean": "abcd", "corrupted": "abxd", "site": "heads"}).json()
    expected = patch(llm, "abcd", "abxd", site="heads")
    assert torch.tensor(got["restored"]) == pytest.approx(expected.restored, abs=1e-6)
    got = post(client, "/lab/api/ablate", {"prompt": "abcd", "heads": [[1, 0]], "blocks": [0]}).json()
    assert got == ablate(llm, "abcd", heads=[(1, 0)], blocks=[0]).to_dict()
    got = post(client, "/lab/api/attribute", {"prompt": "abcd", "steps": 16}).json()
    assert len(got["scores"]) == 4 and got["completeness_error"] is not None and "not attribution" in got["note"]


@pytest.mark.parametrize("path, body, status, code", [
    ("/lab/api/token", b"{not json", 400, "json_invalid"),
    ("/lab/api/token", b"[1, 2]", 400, "json_invalid"),
    ("/lab/api/token", {"ids": [1], "extra": 1}, 400, "invalid_value"),
    ("/lab/api/token", {"ids": []}, 400, "invalid_value"),
    ("/lab/api/token", {"ids": [999]}, 400, "invalid_value"),
    ("/lab/api/token", {"ids": [1] * 200}, 400, "invalid_value"),          # longer than the context (128)
    ("/lab/api/generate", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "invalid_value"),
    ("/lab/api/generate", {"prompt": "x", "temperature": -1}, 400, "invalid_value"),
    ("/lab/api/generate", {"messages": [{"role": "robot", "content": "y"}]}, 400, "invalid_value"),
    ("/lab/api/patch", {"clean": "abcd", "corrupted": "abc"}, 400, "invalid_value"),
    ("/lab/api/patch", {"clean": "abcd", "corrupted": "abxd", "site": "mlp"}, 400, "invalid_value"),
    ("/lab/api/patch", {"clean": "a" * 100, "corrupted": "b" * 100}, 400, "invalid_value"),
    ("/lab/api/attribute", {"prompt": "abcd", "steps": 10_000}, 400, "invalid_value"),
    ("/lab/api/ablate", {"prompt": "abcd", "heads": [[0, 9]]}, 400, "invalid_value"),
    ("/lab/api/walk", {"layer": 0}, 400, "invalid_value"),
    ("/lab/api/walk", {"prompt": "abc", "layer": 5}, 400, "invalid_value"),
    ("/lab/api/fidelity", {}, 400, "invalid_value"),                       # no checkpoint behind this model
    ("/lab/api/token", b"x" * (2 << 20), 413, "request_too_large"),
    ("/lab/api/nothing", {}, 404, "not_found"),
])
def test_bad_input_gets_openai_shaped_errors(client, path, body, status, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, headers=AUTH, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and "Traceback" not in error["message"]


def test_a_view_too_large_for_memory_is_refused_before_it_runs(client, monkeypatch):
    monkeypatch.setattr(views, "free_bytes", lambda device: 1024)
    r = post(client, "/lab/api/token", {"ids": [1, 2, 3]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "view_too_large"
    assert "shorter prompt" in r.json()["error"]["message"]
    monkeypatch.undo()
    monkeypatch.setattr(views, "MAX_CELLS", 100)                     # 2 layers x 4 heads x 20 tokens = 160
    r = post(client, "/lab/api/token", {"ids": [1] * 20})
    assert r.status_code == 413 and "160 numbers" in r.json()["error"]["message"]
    assert post(client, "/lab/api/token", {"ids": [1] * 10}).status_code == 200


def test_fidelity_against_transformers(tmp_path, llm):
    pytest.importorskip("transformers")
    LLM(llm.model, llm.config, tokenizer=None).save(tmp_path / "tiny-hf", format="hf")
    app = mount_lab(create_app(llm, "tiny"), llm, source=str(tmp_path / "tiny-hf"))
    with TestClient(app) as c:
        got = c.post("/lab/api/fidelity", json={"prompt": "Hello"}).json()
    assert got["reference"] == "transformers" and got["first_divergence"] is None
    assert got["max_abs_logits_diff"] < 1e-4 and [s["stage"] for s in got["stages"]][-1] == "logits"


def test_lab_command_bad_port_and_busy_port_are_one_line_errors(capsys):
    import socket

    from llama3.cli import main

    assert main(["lab", "--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as busy:
        assert main(["lab", "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err
    assert main(["serve", "--lab", "--port", "70000"]) == 2        # serve knows --lab
    assert "not a TCP port" in capsys.readouterr().err


def test_on_the_served_fast_model_the_views_hook_the_same_modules(llm):
    """`llama3 serve --lab`: the page on the fused (sped-up) model gives the readable model's numbers;
    the walk, which needs the separate q/k/v matrices, says what to do instead."""
    import copy

    from llama3.fast import speed_up

    fast_model = speed_up(copy.deepcopy(llm.model), fuse=True, native=False)
    fast = LLM(fast_model, fast_model.config, tokenizer=llm.tokenizer)
    with TestClient(mount_lab(create_app(fast, "fast"), fast, source=False)) as c:
        ids = list(b"Hello")
        got = c.post("/lab/api/token", json={"ids": ids}).json()
        plain = views.token_views(llm, ids)
        assert torch.tensor(got["attention"]) == pytest.approx(torch.tensor(plain["attention"]), abs=1e-5)
        assert got["residual"]["ffn_adds"] == pytest.approx(plain["residual"]["ffn_adds"], rel=1e-4)
        patched = c.post("/lab/api/patch", json={"clean": "abcd", "corrupted": "abxd"}).json()
        assert torch.tensor(patched["restored"]) == pytest.approx(patch(llm, "abcd", "abxd").restored, abs=1e-4)
        walked = c.post("/lab/api/walk", json={"prompt": "abc"})
        assert walked.status_code == 400 and "--plain" in walked.json()["error"]["message"]
