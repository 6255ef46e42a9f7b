"""The server's limits (llama3/server_limits.py) and hostile chat templates (template_sandbox.py):
each refusal is one OpenAI-shaped error, and the server goes on answering /health.

Live servers on 127.0.0.1 with the tiny random model and the byte tokenizer of
test_server.py; `llama3 chat` (the CLI's main, stdin a pipe stand-in) runs on a tiny model folder
whose chat template is hostile.  Whether work ran off the event loop is checked by order (a /health answer arrives
while a tokenizer is blocked, or before a slow template's request ends), never by timings.
"""

from __future__ import annotations

import json
import io
import socket
import sys
import threading
import time

import httpx
import pytest

from conftest import make_config, make_model
from llama3.cli import main
from llama3.llm import LLM
from llama3.server import create_app
from llama3.server_limits import ServerLimits
from llama3.tokenizer import TokenizerError
from llama3.tokenizer.chat import JinjaChatFormat
from llama3.tokenizer.template_sandbox import render_limits
from test_server import ByteTokenizer, LiveServer, assert_error

NESTED_LOOPS = "{% for i in range(50000) %}{% for j in range(50000) %}{% endfor %}{% endfor %}"  # 2.5e9 steps
HUGE_OUTPUT = "{{ 'x' * 10000000000 }}"
LIMITS = ServerLimits(max_body_bytes=128 * 1024, max_tokens_cap=32, default_chat_max_tokens=5, max_prompts=3,
                      max_prompt_chars=1000, template_seconds=2.0)


class BlockingTokenizer(ByteTokenizer):
    """Encoding the text "block" waits until the test releases it."""

    started, release = threading.Event(), threading.Event()
    calls = 0

    def _encode_text(self, text, allow_special):
        BlockingTokenizer.calls += 1
        if "block" in text:
            self.started.set()
            assert self.release.wait(60)
        return super()._encode_text(text, allow_special)


def tokenizer_with_template(template: str) -> ByteTokenizer:
    tokenizer = BlockingTokenizer()
    tokenizer.chat_format = JinjaChatFormat(template)
    return tokenizer


@pytest.fixture(scope="module")
def model():
    config = make_config(vocab_size=259, max_seq_len=512)
    return make_model(config), config


@pytest.fixture(scope="module")
def server(model):
    """No API key: the Host/Origin/Content-Type checks are on."""
    live = LiveServer(create_app(LLM(*model, BlockingTokenizer(), source="tiny"), "tiny", limits=LIMITS))
    yield live
    live.stop()


def health_answers(server, within: float = 10.0) -> float:
    start = time.monotonic()
    response = httpx.get(server.url + "/health", timeout=within)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    return time.monotonic() - start


def post(server, path, content, headers=None, **kwargs) -> httpx.Response:
    if not isinstance(content, (str, bytes)):
        content = json.dumps(content)
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})}, **kwargs)


def raw_http(server, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes on a socket (a body the client never finishes), read the status and JSON."""
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                data.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


# ------------------------------------------------------------------ body size
def test_body_over_the_limit_is_413_before_it_is_read(server):
    port = server.url.rsplit(":", 1)[1]
    # 20 MB announced, 10 bytes sent: the answer comes without waiting for (or holding) the rest
    status, body = raw_http(server, f"POST /v1/completions HTTP/1.1\nHost: 127.0.0.1:{port}\n"
                                    f"Content-Type: application/json\nContent-Length: {20 * 2**20}\n", b'{"prompt":')
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # no length announced (chunked): counted while it arrives, refused once past the limit
    chunk = b"x" * 16384
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10))
    status, body = raw_http(server, f"POST /v1/completions HTTP/1.1\nHost: 127.0.0.1:{port}\n"
                                    "Content-Type: application/json\nTransfer-Encoding: chunked\n", chunks)
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
    assert_error(post(server, "/v1/completions", {"prompt": "x" * 140000}), 413, code="request_too_large")
    assert health_answers(server) < 10


# ------------------------------------------------------------ max_tokens, prompts
def test_max_tokens_cap_and_chat_default(server):
    assert_error(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 33}), 400, "max_tokens")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "max_completion_tokens": 100000}), 400, "max_tokens")
    ok = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 32, "temperature": 0}).json()
    assert ok["usage"]["completion_tokens"] == 32  # the byte model has no stop token: it runs to max_tokens
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["usage"]["completion_tokens"] == 5 and chat["choices"][0]["finish_reason"] == "length"


def test_prompt_count_and_length_are_checked_before_tokenizing(server):
    before = BlockingTokenizer.calls
    assert_error(post(server, "/v1/completions", {"prompt": ["a", "b", "c", "d"]}), 400, "prompt")
    assert_error(post(server, "/v1/completions", {"prompt": "y" * 1001}), 400, "prompt", "context_length_exceeded")
    messages = [{"role": "user", "content": "z" * 600}, {"role": "user", "content": "z" * 600}]
    assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400, "messages",
                 "context_length_exceeded")
    assert BlockingTokenizer.calls == before  # none of them was tokenized
    assert len(post(server, "/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 1}).json()["choices"]) == 3


def test_tokenizing_runs_off_the_event_loop(server):
    BlockingTokenizer.started.clear(), BlockingTokenizer.release.clear()
    result = {}
    request = threading.Thread(target=lambda: result.update(r=post(server, "/v1/completions",
                                                                   {"prompt": "block", "max_tokens": 2})))
    request.start()
    try:
        assert BlockingTokenizer.started.wait(30)
        assert health_answers(server) < 10  # answered while the tokenizer is still blocked
        assert request.is_alive()
    finally:
        BlockingTokenizer.release.set()
        request.join(60)
    assert result["r"].status_code == 200


# -------------------------------------------------------------- hostile JSON (issue 17)
@pytest.mark.parametrize("body", [
    '{"prompt": "hi",', "{'prompt': 'hi'}", "", "[" * 100000, '{"prompt": "\\ud800"}',
    '{"\\udfff": 1, "prompt": "hi"}', '{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}",
    '{"prompt": "hi", "temperature": 1e999}', '{"prompt": "hi", "temperature": NaN}',
    '{"prompt": "hi", "metadata": ' + '{"a": ' * 70 + "1" + "}" * 70 + "}",
    b'{"prompt": "\xff\xfe"}',
])
def test_hostile_json_is_400(server, body):
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_error(post(server, path, body), 400, code="json_invalid")
    assert health_answers(server) < 10


def test_valid_unicode_escapes_still_work(server):
    got = post(server, "/v1/completions", '{"prompt": "\\ud83d\\ude00 caf\\u00e9", "max_tokens": 1}')
    assert got.status_code == 200 and got.json()["usage"]["prompt_tokens"] == len("😀 café".encode())


# ---------------------------------------------------------- Host, Origin, Content-Type
def test_foreign_host_origin_and_content_type_are_refused_without_a_key(server):
    port = server.url.rsplit(":", 1)[1]
    body = {"prompt": "hi", "max_tokens": 1}
    assert_error(post(server, "/v1/completions", body, {"Host": f"evil.example:{port}"}), 403,
                 code="host_not_allowed")
    assert_error(httpx.get(server.url + "/health", headers={"Host": "attacker.test"}), 403)
    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        assert post(server, "/v1/completions", body, {"Host": host}).status_code == 200
    assert_error(post(server, "/v1/completions", body, {"Origin": "https://evil.example"}), 403,
                 code="origin_not_allowed")
    assert_error(post(server, "/v1/completions", body, {"Origin": f"http://evil.example:{port}"}), 403)
    same_origin = post(server, "/v1/completions", body, {"Origin": f"http://localhost:{port}"})  # its /docs page
    assert same_origin.status_code == 200
    text_plain = httpx.post(server.url + "/v1/completions", content=json.dumps(body),
                            headers={"Content-Type": "text/plain"})
    assert_error(text_plain, 415, code="unsupported_media_type")
    assert_error(httpx.post(server.url + "/v1/completions", data={"prompt": "hi"}), 415)


def test_cors_origin_allows_that_page(model):
    page = "http://localhost:3000"
    limits = ServerLimits(cors_origins=(page,))
    live = LiveServer(create_app(LLM(*model, ByteTokenizer(), source="tiny"), "tiny", limits=limits))
    try:
        preflight = httpx.options(live.url + "/v1/chat/completions", headers={
            "Origin": page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == page
        assert "POST" in preflight.headers["access-control-allow-methods"]
        answer = post(live, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, {"Origin": page})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == page
        assert_error(post(live, "/v1/completions", {"prompt": "hi"}, {"Origin": "http://localhost:4000"}), 403)
    finally:
        live.stop()


def test_with_a_key_the_key_is_the_guard(model):
    live = LiveServer(create_app(LLM(*model, ByteTokenizer(), source="tiny"), "tiny", api_key="k"))
    try:
        headers = {"Authorization": "Bearer k", "Content-Type": "text/plain", "Host": "any.example"}
        answer = httpx.post(live.url + "/v1/completions", content='{"prompt": "hi", "max_tokens": 1}',
                            headers=headers)
        assert answer.status_code == 200
        assert_error(post(live, "/v1/completions", {"prompt": "x"}, {"Host": "any.example"}), 401)
    finally:
        live.stop()


# -------------------------------------------------------------- hostile chat templates
def test_hostile_templates_are_one_line_errors():
    messages = [{"role": "user", "content": "hi"}]
    for template, match in [(NESTED_LOOPS, "ran for more than 0.3 s"), (HUGE_OUTPUT, "over its limit"),
                            ("{{ 'x'|center(10**10) }}", "over its limit"),
                            ("{{ lipsum(n=100000) }}", "over its limit"),
                            ("{{ range(1000)|list|tojson(indent=100000) }}", "over its limit"),
                            ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError")]:
        with render_limits(seconds=0.3), pytest.raises(TokenizerError, match=match):
            JinjaChatFormat(template).render(messages)


def test_limited_sandbox_renders_what_transformers_renders():
    """Every operation the limits look at, at normal sizes: the same text as transformers' own
    compiled template (its sandbox, its tojson)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from llama3.tokenizer.chat import compile_template
    from llama3.tokenizer.template_sandbox import render

    template = ("{{ ', '.join(messages|map(attribute='content')) }}|{{ messages|map(attribute='role')|join('/') }}|"
                "{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ '%05d|%-6s|' % (42, 'x') }}{{ '{:>8}|{}'.format('r', 1) }}|"
                "{{ 'a-b-c'.replace('-', '+') }}{{ 'a\tb'.expandtabs(4) }}{{ 'x'.center(7, '*') }}{{ 'y'.zfill(3) }}|"
                "{{ ('l1\nl2')|indent(3, first=True) }}|{{ messages|tojson(indent=2) }}|{{ 'z'|center(5) }}|"
                "{{ '%s=%d'|format('k', 7) }}|{{ 'abc'|replace('b', 'BB') }}|{{ [1, 2] + [3] }}{{ 'p' ~ 1 ~ 'q' }}|"
                "{% set ns = namespace(s='') %}{% for m in messages %}{% set ns.s = ns.s + m.role[0] %}{% endfor %}"
                "{{ ns.s }}|{{ range(3)|list }}{{ messages|length }}|{{ 'T'|wordwrap(5) }}{{ 'w x'|title }}")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi {{ there }}"}]
    want = _compile_jinja_template(template).render(messages=messages)
    assert render(compile_template(template), {"messages": messages}) == want
    assert "be brief, hi {{ there }}|system/user|ababab1024" in want


def test_template_deadline_never_fires_after_the_render():
    """Deadlines around a render's own length: each render ends with its text or the limit error,
    and no exception is left pending for whatever the thread runs next."""
    chat_format = JinjaChatFormat("{% for i in range(300) %}{% for j in range(1000) %}{% endfor %}{% endfor %}ok")
    outcomes = set()
    for i in range(60):
        with render_limits(seconds=0.001 * (i % 30)):
            try:
                outcomes.add(chat_format.render([{"role": "user", "content": "x"}]))
            except TokenizerError as e:
                outcomes.add("ran for more than" in str(e))
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # a stray exception would be raised in this loop
        sum(range(1000))
    assert outcomes <= {"ok", True} and True in outcomes


@pytest.mark.parametrize("template", [NESTED_LOOPS, HUGE_OUTPUT])
def test_hostile_template_in_the_server(model, template):
    live = LiveServer(create_app(LLM(*model, tokenizer_with_template(template), source="tiny"), "tiny",
                                 limits=LIMITS))
    try:
        done = {}

        def ask():
            done["response"] = post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
            done["at"] = time.monotonic()
        request = threading.Thread(target=ask)
        request.start()
        time.sleep(0.2)
        health_answers(live)
        health_at = time.monotonic()
        request.join(60)
        assert_error(done["response"], 400)
        assert "chat template" in done["response"].json()["error"]["message"]
        if template == NESTED_LOOPS:  # a 2 s render: /health answered while it ran
            assert health_at < done["at"]
        health_answers(live)
        for _ in range(4):  # the pool's threads (2) still parse and tokenize: nothing was left pending
            assert post(live, "/v1/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200
    finally:
        live.stop()


def test_hostile_template_in_a_model_file_is_one_cli_line(tmp_path, capsys, monkeypatch):
    from tokenizer_refs import smollm2_gguf

    from llama3.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf())
    config = make_config(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    LLM(make_model(config), config, tokenizer, source="tiny").save(tmp_path / "m")
    settings = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": HUGE_OUTPUT}))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))  # `llama3 chat` on a pipe
    capsys.readouterr()
    status = main(["chat", "--model", str(tmp_path / "m")])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr and len(errors) == 1 and "chat template" in errors[0], stderr
    assert status == 0  # the conversation goes on after the error; stdin ended it
    assert main(["tokenize", "--tokenizer", str(tmp_path / "m"), "--chat", "hello"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: the chat template") and len(stderr.strip().splitlines()) == 1, stderr


def test_serve_flags_become_limits():
    from llama3.cli import build_parser
    from llama3.commands.serve import server_limits

    args = build_parser("serve").parse_args(["serve", "--host", "box.lan", "--max-body-bytes", "1000",
                                             "--max-tokens-cap", "64", "--max-prompts", "2", "--max-prompt-chars",
                                             "500", "--cors-origin", "http://localhost:3000", "--allow-host", "box"])
    limits = server_limits(args)
    assert (limits.max_body_bytes, limits.max_tokens_cap, limits.max_prompts, limits.prompt_chars(8192)) == \
        (1000, 64, 2, 500)
    assert limits.allowed_hosts == ("box.lan", "box") and limits.cors_origins == ("http://localhost:3000",)
    assert server_limits(build_parser("serve").parse_args(["serve"])).prompt_chars(8192) == 32 * 8192
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", "--max-tokens-cap", "0"])
