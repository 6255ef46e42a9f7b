"""`hf:ORG/NAME` and `llama3 download`, never touching the network.

Models are placed in a temporary Hugging Face cache laid out as huggingface_hub lays it out
(models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main}),
checked by huggingface_hub's own `scan_cache_dir`, and read through huggingface_hub's real code
with HF_HUB_OFFLINE=1 (or with HF_ENDPOINT pointing at a closed local port: a dead network).
The Hub's answers (gated, missing, 401, ...) are huggingface_hub's real exception classes raised
from its monkeypatched functions; the listing of a real repo decides which files are fetched.
"""

import hashlib
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors as hub_errors

from llama3.cli import main
from llama3.errors import Llama3Error

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-org/tiny-llama"              # a Hugging Face folder: config, tokenizer, safetensors
GGUFS = "tiny-org/tiny-llama-GGUF"        # two GGUF files of the same tiny model
REAL = "test-org/SmolLM2-135M-Instruct-GGUF"  # the embedded default model's GGUF, as a one-GGUF repo


def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path], link_blobs: bool = False) -> Path:
    """Lay `files` (name in the repo -> local file) out as huggingface_hub's cache holds repo_id at main
    -> the snapshot folder.  link_blobs: the blob is a symlink to the file (a 100 MB GGUF is not copied)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit id
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.symlink_to(source.resolve()) if link_blobs else blob.write_bytes(source.read_bytes())
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # huggingface_hub writes the bare hash, no newline
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(cache folder, {repo: snapshot folder}, the tiny model's own folder)."""
    from llama3.config import ModelConfig
    from llama3.llm import LLM, _smollm2_path
    from llama3.model import Transformer
    from llama3.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    config = ModelConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, hidden_dim=32,
                         max_seq_len=64)
    root = tmp_path_factory.mktemp("hub")
    llm = LLM(Transformer(config).init_weights(seed=0), config, tok)
    llm.save(root / "tiny", format="hf")
    llm.save(root / "tiny.gguf", format="gguf")
    cache = root / "cache"
    snapshots = {
        TINY: put_in_cache(cache, TINY, {p.name: p for p in (root / "tiny").iterdir()}),
        GGUFS: put_in_cache(cache, GGUFS, {"tiny-F32.gguf": root / "tiny.gguf",
                                           "tiny-copy-F32.gguf": root / "tiny.gguf"}),
        REAL: put_in_cache(cache, REAL, {"SmolLM2-135M-Instruct-Q4_1.gguf": Path(_smollm2_path())}, link_blobs=True),
    }
    return cache, snapshots, root / "tiny"


@pytest.fixture(autouse=True)
def forget_resolved(monkeypatch):
    """Each test asks huggingface_hub afresh (a process remembers what it resolved)."""
    import llama3.checkpoint.hub

    monkeypatch.setattr(llama3.checkpoint.hub, "_RESOLVED", {})


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """In this process: huggingface_hub reads the test cache and may not use the network.
    (It reads HF_HUB_CACHE / HF_HUB_OFFLINE into `constants` at import; subprocess tests set the variables.)"""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache[0]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    return hub_cache


@pytest.fixture
def online(offline, monkeypatch):
    """As if the network were up; every huggingface_hub function the test uses must be monkeypatched
    (the real ones would fail: the endpoint is a closed local port)."""
    import huggingface_hub.hf_api

    closed = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", closed)  # behind huggingface_hub.model_info
    return offline


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    environment.update({"PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "NO_PROXY": "*",
                        "HF_HUB_DISABLE_TELEMETRY": "1", **env})
    environment = {k: v for k, v in environment.items() if v != ""}  # HF_HUB_OFFLINE="" unsets it
    return subprocess.run([sys.executable, "-m", "llama3", *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=600)


def one_error_line(result, *parts: str) -> str:
    """Exit 2 and the error as one line at the end of stderr (after e.g. generate's 'loading ...')."""
    assert result.returncode == 2, result.stderr[-3000:]
    return error_line(result.stderr, *parts)


def error_line(stderr: str, *parts: str) -> str:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def test_the_test_cache_is_what_huggingface_hub_reads(hub_cache):
    """huggingface_hub's own cache scanner accepts the layout and finds each repo at main."""
    cache, snapshots, _ = hub_cache
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    repos = {repo.repo_id: repo for repo in info.repos}
    assert set(repos) == {TINY, GGUFS, REAL}
    for repo_id, snapshot in snapshots.items():
        (revision,) = repos[repo_id].revisions
        assert revision.refs == frozenset({"main"}) and Path(revision.snapshot_path) == snapshot
        assert {f.file_name for f in revision.files} == {p.name for p in snapshot.iterdir()}


# --------------------------------------------------------------- through the real library, offline

def test_generate_from_hf_equals_the_folder(hub_cache, capsys):
    """`--model hf:ORG/NAME` (HF_HUB_OFFLINE=1, the cache; in a subprocess, which reads the variables)
    prints what `--model FOLDER` prints (the reference: the CLI's main in this process).
    (--plain: what is tested is where the model comes from; the decoding plan costs a tiny model
    most of its load time, and test_load_hf_equals_the_folder_in_python loads with it.)"""
    cache, _, folder = hub_cache
    args = ["generate", "--plain", "--max-new-tokens", "8", "--temperature", "0", "Once upon a time"]
    from_hub = cli(*args, "--model", f"hf:{TINY}", cache=cache)
    assert from_hub.returncode == 0, from_hub.stderr
    capsys.readouterr()
    assert main([*args, "--model", str(folder)]) == 0
    direct = capsys.readouterr().out
    assert from_hub.stdout == direct and direct.strip()


def test_load_hf_equals_the_folder_in_python(offline):
    import torch

    import llama3

    cache, snapshots, folder = offline
    from_hub, direct = llama3.load(f"hf:{TINY}"), llama3.load(folder)
    assert from_hub.source == f"hf:{TINY}"
    for (name, a), (_, b) in zip(from_hub.model.state_dict().items(), direct.model.state_dict().items()):
        assert torch.equal(a, b), name
    prompt = "The capital of France is"
    assert from_hub.generate(prompt, max_new_tokens=6) == direct.generate(prompt, max_new_tokens=6)
    assert llama3.load_tokenizer(f"hf:{TINY}").encode("Hello there") == direct.tokenizer.encode("Hello there")


def test_the_embedded_gguf_from_a_one_gguf_repo(offline, default_llm):
    """A repo with one .gguf: hf:ORG/NAME picks it; the embedded model's own file, read from the cache."""
    import llama3

    from_hub = llama3.load(f"hf:{REAL}")
    prompt = "The capital of France is"
    assert from_hub.generate(prompt, max_new_tokens=8) == default_llm.generate(prompt, max_new_tokens=8)


def test_download_prints_the_local_path(hub_cache):
    cache, snapshots, _ = hub_cache
    result = cli("download", TINY, cache=cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{snapshots[TINY]}\n"
    assert f"--model hf:{TINY}" in result.stderr


def test_download_one_gguf_of_several(offline, capsys):
    cache, snapshots, _ = offline
    assert main(["download", GGUFS, "--file", "tiny-F32.gguf"]) == 0
    assert capsys.readouterr().out == f"{snapshots[GGUFS] / 'tiny-F32.gguf'}\n"
    assert main(["download", f"hf:{GGUFS}/tiny-copy-F32.gguf"]) == 0
    assert capsys.readouterr().out == f"{snapshots[GGUFS] / 'tiny-copy-F32.gguf'}\n"
    from llama3.llm import resolve_source

    assert resolve_source(f"hf:{GGUFS}/tiny-F32.gguf") == str(snapshots[GGUFS] / "tiny-F32.gguf")


def test_several_ggufs_and_none_named_lists_them(offline, capsys):
    assert main(["generate", "--model", f"hf:{GGUFS}", "Hi"]) == 2
    error_line(capsys.readouterr().err, f"error: {GGUFS} has 2 GGUF files; name one", "tiny-F32.gguf",
               "tiny-copy-F32.gguf", f"hf:{GGUFS}/tiny-F32.gguf")


def test_not_cached_under_offline_mode_names_the_command(hub_cache):
    cache = hub_cache[0]
    result = cli("generate", "--model", "hf:nobody/missing-model", "Hi", cache=cache)
    one_error_line(result, "nobody/missing-model is not in the Hugging Face cache", str(cache), "HF_HUB_OFFLINE=1",
                   "`llama3 download nobody/missing-model`")


def test_file_not_cached_under_offline_mode(offline):
    with pytest.raises(Llama3Error, match=rf"{GGUFS}/other.gguf is not in the Hugging Face cache .* run "
                                          rf"`llama3 download {GGUFS} --file other.gguf`"):
        huggingface_hub_resolve(f"hf:{GGUFS}/other.gguf")


def test_a_dead_network_falls_back_to_the_cache(hub_cache):
    """Without HF_HUB_OFFLINE, an unreachable Hub (a closed local port) still finds a cached model,
    and a model that is not cached says the Hub cannot be reached."""
    cache, snapshots, _ = hub_cache
    dead = dict(HF_HUB_OFFLINE="", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HUB_ETAG_TIMEOUT="2",
                HF_HUB_DOWNLOAD_TIMEOUT="2")
    result = cli("download", TINY, cache=cache, **dead)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{snapshots[TINY]}\n"
    one_error_line(cli("download", "nobody/missing-model", cache=cache, **dead), f"cannot reach {dead['HF_ENDPOINT']}",
                   "nobody/missing-model is not in the Hugging Face cache", "`llama3 download nobody/missing-model`")


def huggingface_hub_resolve(source: str) -> str:
    from llama3.checkpoint.hub import resolve

    return resolve(source)


# --------------------------------------------------------------- the Hub's answers, one line each

def hub_http_error(cls, status: int, url: str = "https://huggingface.co/api/models/x"):
    """huggingface_hub's exception `cls` as it raises it for an HTTP `status` (a response of its own
    HTTP library: httpx2 in huggingface_hub 2.x, httpx in 1.x, both with the same Response API)."""
    base = next(c for c in hub_errors.HfHubHTTPError.__mro__[1:] if not c.__module__.startswith("huggingface_hub"))
    http = importlib.import_module(base.__module__.split(".")[0])
    response = http.Response(status, request=http.Request("GET", url))
    return cls(f"{status} Client Error. (Request ID: test)\n\nsome details", response=response)


def listing(*names: str):
    """huggingface_hub.model_info, answering a repo that holds `names`."""
    return lambda repo_id, revision=None, **kwargs: huggingface_hub.ModelInfo(
        id=repo_id, siblings=[{"rfilename": name} for name in names])


def raising(error):
    def fail(*args, **kwargs):
        raise error
    return fail


GATED = "meta-llama/Llama-3.2-1B-Instruct"


@pytest.mark.parametrize("where, error, token, source, parts", [
    ("hf_hub_download", lambda: hub_http_error(hub_errors.GatedRepoError, 403), None, f"hf:{GATED}",
     [f"{GATED} is gated: accept the licence at https://huggingface.co/{GATED} and set HF_TOKEN"]),
    ("hf_hub_download", lambda: hub_http_error(hub_errors.GatedRepoError, 403), "hf_x", f"hf:{GATED}",
     [f"{GATED} is gated and your token's account has no access yet", f"https://huggingface.co/{GATED}"]),
    ("model_info", lambda: hub_http_error(hub_errors.RepositoryNotFoundError, 401), None, f"hf:{GATED}",
     [f"{GATED}: no such model on huggingface.co, or it is private (then set HF_TOKEN"]),
    ("model_info", lambda: hub_http_error(hub_errors.RepositoryNotFoundError, 404), "hf_x", f"hf:{GATED}",
     ["no such model on huggingface.co, or your token's account cannot see it"]),
    ("model_info", lambda: hub_http_error(hub_errors.RevisionNotFoundError, 404), None, f"hf:{GATED}@v9",
     [f"{GATED} has no revision 'v9'; pass a branch, tag or commit it has"]),
    ("hf_hub_download", lambda: hub_http_error(hub_errors.RemoteEntryNotFoundError, 404), None,
     f"hf:{GATED}@v9/x.gguf", [f"{GATED} has no file 'x.gguf' at revision 'v9'"]),
    ("hf_hub_download", lambda: hub_errors.LocalEntryNotFoundError("Cannot find the requested files"), None,
     f"hf:{GATED}@v9/x.gguf", [f"{GATED}/x.gguf at revision 'v9' is not in the Hugging Face cache",
                               f"`llama3 download {GATED} --file x.gguf --revision v9`"]),
    ("model_info", lambda: hub_http_error(hub_errors.HfHubHTTPError, 401), "hf_x", f"hf:{GATED}",
     ["huggingface.co refused your saved token (401 unauthorized): it is invalid or expired"]),
    ("model_info", lambda: hub_http_error(hub_errors.HfHubHTTPError, 429), None, f"hf:{GATED}",
     ["rate-limiting", "(429)"]),
    ("model_info", lambda: hub_http_error(hub_errors.HfHubHTTPError, 503), None, f"hf:{GATED}",
     ["huggingface.co failed (503: 503 Client Error. (Request ID: test)); try again later"]),
    ("model_info", lambda: hub_http_error(hub_errors.HfHubHTTPError, 403), None, f"hf:{GATED}",
     [f"huggingface.co refused access to {GATED} (403 forbidden): set HF_TOKEN to a token that can read it"]),
    ("hf_hub_download", lambda: OSError(28, "No space left on device"), None, f"hf:{GATED}",
     [f"downloading {GATED} into ", "failed: [Errno 28] No space left on device (free some space, or set "
      "HF_HUB_CACHE"]),
])
def test_hub_errors_are_one_line(online, monkeypatch, capsys, where, error, token, source, parts):
    """Each huggingface_hub error, raised where the library raises it, -> exit 2 and one line."""
    monkeypatch.setattr(huggingface_hub, "model_info", listing("config.json", "model.safetensors", "x.gguf"))
    monkeypatch.setattr(huggingface_hub, where, raising(error()))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    assert main(["generate", "--model", source, "Hi"]) == 2
    error_line(capsys.readouterr().err, *parts)


def test_hf_token_is_named_when_it_is_refused(online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: os.environ["HF_TOKEN"])
    monkeypatch.setattr(huggingface_hub, "model_info", raising(hub_http_error(hub_errors.HfHubHTTPError, 401)))
    with pytest.raises(Llama3Error, match=r"huggingface.co refused HF_TOKEN \(401 unauthorized\)"):
        huggingface_hub_resolve(f"hf:{GATED}")


def test_a_cached_model_survives_a_refusing_hub(online, monkeypatch):
    """As huggingface_hub's snapshot_download does: a Hub error (e.g. a private repo and no token) with
    the model in the cache -> the cached model; a model not cached -> the Hub's error."""
    monkeypatch.setattr(huggingface_hub, "model_info",
                        raising(hub_http_error(hub_errors.RepositoryNotFoundError, 401)))
    assert huggingface_hub_resolve(f"hf:{TINY}") == str(online[1][TINY])
    with pytest.raises(Llama3Error, match="nobody/private: no such model on huggingface.co, or it is private"):
        huggingface_hub_resolve("hf:nobody/private")


def test_network_error_from_the_http_library(online, monkeypatch):
    """A transport error of huggingface_hub's HTTP library, not cached -> 'cannot reach huggingface.co'."""
    from llama3.checkpoint.hub import _huggingface_hub, network_errors

    transport = [c for c in network_errors(_huggingface_hub())
                 if c.__module__.split(".")[0] not in ("builtins", "huggingface_hub")]
    assert transport, "found no transport error class of huggingface_hub's HTTP library"
    monkeypatch.setattr(huggingface_hub, "model_info", raising(transport[0]("[Errno 111] Connection refused")))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    with pytest.raises(Llama3Error, match=r"cannot reach huggingface.co \(\[Errno 111\] Connection refused\) and "
                                          r"nobody/x is not in the Hugging Face cache"):
        huggingface_hub_resolve("hf:nobody/x")


# --------------------------------------------------------------- which files are fetched

class FakeHub:
    """model_info lists `names`; the downloads record what they were asked and answer from `folder`."""

    def __init__(self, monkeypatch, names: list[str], folder: Path):
        self.calls = []
        monkeypatch.setattr(huggingface_hub, "model_info", listing(*names))
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        self.folder = folder

    def hf_hub_download(self, repo_id, filename, revision=None, local_files_only=False):
        self.calls.append(("file", filename, revision))
        return str(self.folder / filename)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, local_files_only=False):
        self.calls.append(("snapshot", sorted(allow_patterns), revision))
        return str(self.folder)


LLAMA_REPO = ["LICENSE", "README.md", "USE_POLICY.md", ".gitattributes", "config.json", "generation_config.json",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
              "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
              "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin"]


def test_a_model_folder_fetches_only_what_is_loaded(online, monkeypatch):
    """Meta's Llama 3.x repo layout: the HF folder's files, never original/ (Meta's copy) or pickles;
    config.json is fetched (and checked) first."""
    from llama3.checkpoint.hub import download

    fake = FakeHub(monkeypatch, LLAMA_REPO, online[1][TINY])
    assert download(GATED, revision="main") == str(online[1][TINY])
    assert fake.calls == [("file", "config.json", "main"),
                          ("snapshot", ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                                        "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"], "main")]


def test_config_only_fetches_config_json(online, monkeypatch, capsys):
    fake = FakeHub(monkeypatch, LLAMA_REPO, online[1][TINY])
    assert main(["params", f"hf:{GATED}"]) == 0
    assert "D=16 layers=1" in capsys.readouterr().out
    assert [call[:2] for call in fake.calls] == [("file", "config.json"), ("snapshot", ["config.json"])]


def test_tokenizer_only_fetches_the_tokenizer_files(online, monkeypatch, capsys):
    fake = FakeHub(monkeypatch, LLAMA_REPO, online[1][TINY])
    assert main(["tokenize", "--model", f"hf:{GATED}", "--ids", "Hello"]) == 0
    assert capsys.readouterr().out.strip().startswith("[")
    assert fake.calls == [("snapshot", ["generation_config.json", "special_tokens_map.json", "tokenizer.json",
                                        "tokenizer_config.json"], None)]


def test_a_model_we_cannot_run_is_refused_before_its_weights(online, monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64}')
    fake = FakeHub(monkeypatch, ["config.json", "model.safetensors", "tokenizer.json"], tmp_path)
    with pytest.raises(Llama3Error, match="'qwen2' model; only 'llama' is supported"):
        huggingface_hub_resolve("hf:Qwen/Qwen2-0.5B")
    assert fake.calls == [("file", "config.json", None)]


def test_gguf_and_meta_repos(online, monkeypatch):
    from llama3.checkpoint.hub import download

    folder = online[1][TINY]
    fake = FakeHub(monkeypatch, ["README.md", "model-Q4_0.gguf"], folder)
    assert download("org/one-gguf") == str(folder / "model-Q4_0.gguf")
    assert fake.calls == [("file", "model-Q4_0.gguf", None)]
    fake = FakeHub(monkeypatch, ["README.md", "a-Q4_0.gguf", "a-Q8_0.gguf"], folder)
    with pytest.raises(Llama3Error, match=r"org/ggufs has no file 'a-Q5.gguf'; its GGUF files: a-Q4_0.gguf, a-Q8_0"):
        download("org/ggufs", file="a-Q5.gguf")
    assert fake.calls == []
    fake = FakeHub(monkeypatch, ["README.md", "original/params.json", "original/consolidated.00.pth",
                                 "original/tokenizer.model", "original/extra.txt"], folder)
    assert download("org/meta-only") == str(folder / "original")
    assert fake.calls == [("snapshot", ["original/consolidated.00.pth", "original/params.json",
                                        "original/tokenizer.model"], None)]
    FakeHub(monkeypatch, ["config.json", "pytorch_model.bin"], folder)
    with pytest.raises(Llama3Error, match="has config.json but no .safetensors weights"):
        download("org/pickles")
    FakeHub(monkeypatch, ["README.md", "data.csv"], folder)
    with pytest.raises(Llama3Error, match=r"org/dataset holds no model llama3 reads .*its files: README.md, data.csv"):
        download("org/dataset")


@pytest.mark.parametrize("source, expected", [
    ("hf:org/name", ("org/name", None, None)),
    ("org/name", ("org/name", None, None)),
    ("hf:org/name/file.gguf", ("org/name", "file.gguf", None)),
    ("hf:org/name@v1.0", ("org/name", None, "v1.0")),
    ("hf:org/name@abc123/sub/file.gguf", ("org/name", "sub/file.gguf", "abc123")),
])
def test_parse_source(source, expected):
    from llama3.checkpoint.hub import parse_source

    model = parse_source(source)
    assert (model.repo_id, model.file, model.revision) == expected


@pytest.mark.parametrize("source", ["hf:", "hf:justaname", "hf:/name", "hf:org/"])
def test_a_bad_hf_name_is_one_line(source, capsys):
    assert main(["generate", "--model", source, "Hi"]) == 2
    error_line(capsys.readouterr().err, "name a Hugging Face model as hf:ORG/NAME")


def test_a_name_the_hub_refuses_is_one_line(offline):
    """huggingface_hub's own name check (HFValidationError), before any request."""
    with pytest.raises(Llama3Error, match=r"'org/bad\.\.name' is not a Hugging Face repository name"):
        huggingface_hub_resolve("hf:org/bad..name")


def test_download_refuses_two_different_files(capsys):
    assert main(["download", f"{GGUFS}/a.gguf", "--file", "b.gguf"]) == 2
    assert "names file 'a.gguf' and --file says 'b.gguf'" in capsys.readouterr().err


# --------------------------------------------------------------- a fake Hub on a local port

class FakeHubServer:
    """The few Hub routes huggingface_hub's model_info, hf_hub_download and snapshot_download use,
    on 127.0.0.1, serving repos from bytes in memory (GET /api/models/R[/revision/V], GET
    /api/models/R/tree/V, HEAD/GET /R/resolve/V/PATH); a gated repo answers its files with 403 and
    X-Error-Code: GatedRepo, an unknown repo 401 RepoNotFound, as huggingface.co does. `fetched`
    records every file body sent.  Speaks only what this test needs; the client code is the real one."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: tuple[str, ...] = ()):
        import http.server
        import threading

        self.repos, self.gated, self.fetched = repos, gated, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                status, headers, data = server.route(self.command, self.path)
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(f"commit of {repo}".encode()).hexdigest()

    def route(self, method: str, raw_path: str):
        import json
        import re
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(raw_path).path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo, revision = m.group(1), m.group(2) or "main"
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            repo, revision = m.groups()
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo, revision = m.group(1), m.group(2)
        else:
            return 404, {}, b"no such route"
        if repo not in self.repos:
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"{}"
        files, commit = self.repos[repo], self.commit(repo)
        if revision not in ("main", commit):
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"{}"
        if path.startswith("/api/") and "/tree/" not in path:
            info = {"id": repo, "modelId": repo, "sha": commit, "private": False,
                    "gated": "manual" if repo in self.gated else False,
                    "siblings": [{"rfilename": name} for name in files]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        if path.startswith("/api/"):
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        name = m.group(3)
        if repo in self.gated:
            return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"}, b"{}"
        if name not in files:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, b"{}"
        if method == "GET":
            self.fetched.append((repo, name))
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(files[name]).hexdigest()}"'}, files[name]


def test_a_real_download_from_a_fake_hub(hub_cache, tmp_path):
    """huggingface_hub's real download code against a local stand-in for huggingface.co: only the
    files llama3 loads arrive (not original/, .bin, onnx/, README), laid out in a fresh cache that
    loads as the folder itself; a gated repo's real 403 becomes the licence line."""
    import torch

    import llama3

    folder = hub_cache[2]
    repo = {path.name: path.read_bytes() for path in folder.iterdir()}
    wanted = set(repo)
    repo.update({"README.md": b"# tiny", ".gitattributes": b"*.safetensors filter=lfs", "pytorch_model.bin": b"x",
                 "original/params.json": b"{}", "original/consolidated.00.pth": b"x", "onnx/model.onnx": b"x"})
    hub = FakeHubServer({TINY: repo, GATED: dict(repo)}, gated=(GATED,))
    try:
        cache = tmp_path / "fresh-cache"
        online = dict(HF_HUB_OFFLINE="", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1")
        result = cli("download", TINY, cache=cache, **online)
        assert result.returncode == 0, result.stderr
        snapshot = cache / f"models--{TINY.replace('/', '--')}" / "snapshots" / hub.commit(TINY)
        assert result.stdout == f"{snapshot}\n"
        assert {name for _, name in hub.fetched} == wanted  # config.json first (checked), then the rest
        assert hub.fetched[0] == (TINY, "config.json")
        assert sorted(p.name for p in snapshot.iterdir()) == sorted(wanted)
        assert (cache / f"models--{TINY.replace('/', '--')}" / "refs" / "main").read_text() == hub.commit(TINY)
        downloaded, direct = llama3.load(snapshot), llama3.load(folder)
        for (name, a), (_, b) in zip(downloaded.model.state_dict().items(), direct.model.state_dict().items()):
            assert torch.equal(a, b), name

        one_error_line(cli("download", GATED, cache=cache, **online),
                       f"{GATED} is gated: accept the licence at https://huggingface.co/{GATED} and set HF_TOKEN")
    finally:
        hub.close()
