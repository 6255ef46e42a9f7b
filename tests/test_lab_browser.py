"""The Lab's page end to end in a real headless browser: Debian's chromium driven by Playwright.

A tiny random model with a byte tokenizer is served on 127.0.0.1; the page is loaded, a prompt
sent, the streamed text compared with the API's own answer, a token clicked and its attention
and logit-lens views compared with what /lab/api/token returns, the token attributed to its
context, a patching experiment run and
one of its cells clicked, the forward walk opened and the language switched to Chinese.

Skipped only where no browser is installed (`apt-get install chromium`, `pip install playwright`;
the browser is never downloaded by Playwright)."""

import json
import os
import shutil

import httpx
import pytest

from conftest import make_config, make_model
from llama3.lab import mount_lab
from llama3.llm import LLM
from llama3.server import create_app
from test_server import ByteTokenizer, LiveServer

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
if CHROMIUM is None:
    pytest.skip("no chromium installed (apt-get install chromium)", allow_module_level=True)

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server():
    model = make_model(make_config(vocab_size=259, n_layers=2))
    llm = LLM(model, model.config, tokenizer=ByteTokenizer())
    live = LiveServer(mount_lab(create_app(llm, "tiny"), llm, source=False, name="tiny"))
    yield live
    live.server.should_exit = True
    live.thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(server, browser):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/lab")
    page.wait_for_function("window.lab && window.lab.ready")
    page.errors = errors
    yield page
    page.close()


def flat(nested):
    return [x for row in nested for x in (flat(row) if isinstance(row, list) else [row])]


def same(a, b, tol=1e-7):
    """Nested lists of numbers equal within tol (pytest.approx takes flat lists only)."""
    a, b = flat(a), flat(b)
    return len(a) == len(b) and a == pytest.approx(b, abs=tol)


def api(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_chat_stream_token_views_patching_and_language(server, page):
    assert "tiny: 2 blocks, 4 heads / 2 kv" in page.text_content("#model-info")

    # ---- send a prompt (completion mode, greedy) and see the streamed text
    page.select_option("#mode", "completion")
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('#conversation .tok').length === {MAX_TOKENS} "
                           "&& !document.getElementById('send').disabled")
    lines = [l.removeprefix("data: ") for l in
             api(server, "/lab/api/generate", {"prompt": "Hello", "max_tokens": MAX_TOKENS, "temperature": 0,
                                              "top_p": 1, "top_k": 0}).text.split("\n\n") if l.strip()]
    streamed = [json.loads(l) for l in lines[:-1]]
    tokens = [e for e in streamed if e["type"] == "token"]
    shown = page.eval_on_selector_all("#conversation .tok", "spans => spans.map(s => s.textContent)")
    assert shown == [t["text"] or t["token"] for t in tokens]

    # ---- click the third token: candidates, attention and logit lens as the API computes them
    page.click("#conversation .tok >> nth=2")
    page.wait_for_selector("#token-panel:not([hidden])")
    page.wait_for_function("document.getElementById('lens-plot').data !== undefined")
    ids = streamed[0]["ids"] + [t["id"] for t in tokens[:2]]
    views = api(server, "/lab/api/token", {"ids": ids}).json()
    assert page.text_content("#token-chosen") == tokens[2]["token"]
    first_row = page.eval_on_selector("#candidates tbody tr", "tr => [...tr.cells].map(c => c.textContent)")
    assert first_row[:2] == [tokens[2]["candidates"][0]["token"], str(tokens[2]["candidates"][0]["id"])]
    assert float(first_row[2]) == pytest.approx(tokens[2]["candidates"][0]["prob"], abs=1e-4)
    # the attention heatmap of the last layer: query heads in their kv groups, a gap row between groups
    z = page.evaluate("document.getElementById('attn-plot').data[0].z")
    rows = [r for r in z if any(v is not None for v in r)]
    assert len(z) == 4 + 1 and same(rows, views["attention"][-1])
    y = page.evaluate("document.getElementById('attn-plot').data[0].y")
    assert y[0] == "head 0 (kv 0)" and y[3] == "head 2 (kv 1)"
    sink = page.evaluate("document.getElementById('sink-plot').data[0].z")
    assert same(sink, [[row[0] for row in layer] for layer in views["attention"]])
    lens = page.eval_on_selector_all("#lens-table tr", "rows => rows.map(r => r.cells[1].textContent)")
    assert [l.split("  ")[0].rsplit(" ", 1)[0] for l in lens] == [r["top"][0]["token"] for r in views["lens"]]
    bars = page.evaluate("document.getElementById('lens-plot').data[0].x")
    assert bars == pytest.approx([r["top"][0]["prob"] for r in views["lens"]], abs=1e-7)
    resid = page.evaluate("document.getElementById('resid-plot').data[1].y")
    assert resid == pytest.approx(views["residual"]["attention_adds"], abs=1e-7)
    page.select_option("#attn-layer", "0")
    z0 = page.evaluate("document.getElementById('attn-plot').data[0].z")
    assert same([r for r in z0 if any(v is not None for v in r)], views["attention"][0])

    # ---- attribute the clicked token to the tokens before it (integrated gradients, in the experiments tab)
    page.click("#token-attribute")
    page.wait_for_function("window.lab.attribution !== undefined")
    expected = api(server, "/lab/api/attribute", {"ids": ids, "target": f"#{tokens[2]['id']}", "steps": 32}).json()
    assert page.evaluate("document.getElementById('attr-plot').data[0].y") == pytest.approx(expected["scores"], abs=1e-6)
    assert page.is_visible("#tab-experiments") and "completeness error" in page.text_content("#attr-summary")

    # ---- a patching experiment, then a click on one of its cells opens that layer's head
    page.fill("#patch-clean", "abcd")
    page.fill("#patch-corrupted", "abxd")
    page.select_option("#patch-site", "heads")
    page.click("#patch-run")
    page.wait_for_function("window.lab.patch && document.getElementById('patch-plot').data !== undefined")
    expected = api(server, "/lab/api/patch", {"clean": "abcd", "corrupted": "abxd", "site": "heads"}).json()
    assert same(page.evaluate("document.getElementById('patch-plot').data[0].z"), expected["restored"])
    assert "clean" in page.text_content("#patch-summary")
    box = page.locator("#patch-plot .nsewdrag").first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.1)   # top right: block 1, head 3
    page.wait_for_function("window.lab.head !== undefined")
    head = page.evaluate("window.lab.head")
    full = api(server, "/lab/api/head", {"prompt": "abcd", "layer": head["layer"]}).json()
    assert same(head["z"], full["weights"][head["column"]])
    assert page.evaluate("document.getElementById('head-plot').data !== undefined")
    assert "not attribution" in page.text_content("#attr-note")

    # ---- the forward walk, then the language switch
    page.click("button[data-tab=walk]")
    page.fill("#walk-prompt", "Hey")
    page.click("#walk-run")
    page.wait_for_selector("#walk-detail:not([hidden])")
    page.click("#walk-steps li:has-text('softmax')")
    assert "self.softmax" in page.text_content("#walk-code")
    english = page.text_content("#walk-text-title")
    page.click("#lang")
    assert page.text_content("button[data-tab=chat]") == "对话"
    assert page.text_content("#walk-text-title") not in ("", english)
    assert "注意力" in page.text_content("#walk-text-title")
    page.click("#lang")
    assert page.text_content("button[data-tab=chat]") == "Chat"
    assert page.errors == []


def test_with_an_api_key_the_page_asks_for_it_once(browser):
    model = make_model(make_config(vocab_size=259, n_layers=1))
    llm = LLM(model, model.config, tokenizer=ByteTokenizer())
    live = LiveServer(mount_lab(create_app(llm, "keyed", api_key="s3cret"), llm, source=False, name="keyed"))
    try:
        asked = []
        page = browser.new_page()
        page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept("s3cret")))
        page.goto(live.url + "/lab")
        page.wait_for_function("window.lab.ready && window.lab.info !== null")
        assert page.text_content("#model-info").startswith("keyed: 1 blocks") and len(asked) == 1
        page.select_option("#mode", "completion")
        page.fill("#max-tokens", "2")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('#conversation .tok').length === 2")
        assert len(asked) == 1 and page.text_content("#error") == ""    # the key is kept for the tab
        page.close()
    finally:
        live.server.should_exit = True
        live.thread.join(10)
