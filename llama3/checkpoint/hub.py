"""Models from the Hugging Face Hub: `hf:ORG/NAME` -> a local path, through `huggingface_hub`.

    hf:ORG/NAME                 the model folder (config.json, tokenizer files, *.safetensors),
                                or the repo's one .gguf file, or Meta's params.json + consolidated.*.pth
    hf:ORG/NAME/FILE.gguf       one GGUF file of a repo that holds several
    hf:ORG/NAME@REVISION        a branch, tag or commit instead of main (also with /FILE.gguf after it)

    resolve("hf:ORG/NAME")                       -> local path (what `llama3.load` and every --model call)
    download("ORG/NAME", file=None, revision=None) -> local path (what `llama3 download` calls)

Only what the loader reads is fetched, not every file of the repo: for a folder, the top-level
config.json, generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
chat_template.jinja, tokenizer.model and *.safetensors (+ index), never the repo's `original/`
Meta copy, .bin pickles or other formats; for a GGUF repo, one file.  The repo's file list (one
`model_info` request) decides which kind of model it is; a folder's config.json is fetched and
checked first, so a model this package cannot run (a Qwen, a Mistral) is refused before
gigabytes arrive.

Everything else is huggingface_hub's: its cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
~/.cache/huggingface/hub, shared with transformers and every other tool that uses it), its
progress bars, its token (`HF_TOKEN`, or the one `hf auth login` saved), `HF_ENDPOINT`, and
`HF_HUB_OFFLINE=1`, under which only the cache is read.  Without that variable a dead network
also falls back to the cache.  Its errors become one line each (`explain`): gated repos (Meta's
licence), missing or private repos, unknown revisions and files, refused tokens, rate limits,
a model that is not cached, an unreachable Hub.

Why huggingface_hub is a core dependency rather than an extra: `tokenizers`, already a core
dependency, requires it, so listing it installs nothing new (and `hf:` is a model source like a
path, which every command accepts); we import it only when an `hf:` source is given.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llama3.errors import Llama3Error

# The files of a Hugging Face folder that llama3.checkpoint.hf and llama3.tokenizer read (top level only).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")  # (its stop ids)
FOLDER_FILES = ("config.json", *TOKENIZER_FILES)
META_FILES = ("params.json", "tokenizer.model")  # + consolidated.NN.pth, in the repo root or original/

# What this process has resolved: (cache, offline, repo, file, revision, only) -> local path.  A
# command may resolve one source twice (load_fast, then load); the Hub is asked once.
_RESOLVED: dict[tuple, str] = {}

# A repo id: ORG/NAME, letters, digits, '-', '_', '.' (the Hub's own rule, checked again by huggingface_hub).
_REPO = r"[A-Za-z0-9][\w.\-]*/[\w.\-]+"


@dataclass(frozen=True)
class HubModel:
    """What an `hf:` source names: a repo, optionally one file in it and a revision."""

    repo_id: str
    file: str | None = None
    revision: str | None = None

    def command(self) -> str:
        """The `llama3 download` command that fetches this model."""
        return " ".join(["llama3 download", self.repo_id, *(["--file", self.file] if self.file else []),
                         *(["--revision", self.revision] if self.revision else [])])


def parse_source(source: str) -> HubModel:
    """'hf:ORG/NAME[@REVISION][/FILE]' (the 'hf:' prefix optional) -> HubModel."""
    text = source.removeprefix("hf:")
    match = re.fullmatch(rf"({_REPO})(?:@([^/]+))?(?:/(.+))?", text)
    if match is None:
        raise Llama3Error(f"{source!r}: name a Hugging Face model as hf:ORG/NAME (e.g. hf:meta-llama/"
                          "Llama-3.2-1B-Instruct), or hf:ORG/NAME/FILE.gguf for one file of a GGUF repo")
    repo_id, revision, file = match.groups()
    return HubModel(repo_id, file, revision)


def resolve(source: str, *, only: str | None = None) -> str:
    """An `hf:` source -> the local path of the model folder or GGUF file (downloaded if needed)."""
    model = parse_source(source)
    return download(model.repo_id, file=model.file, revision=model.revision, only=only)


def download(repo_id: str, *, file: str | None = None, revision: str | None = None,
             only: str | None = None) -> str:
    """Fetch a model into the Hugging Face cache (or find it there) -> its local path.

    file: one file of the repo (a .gguf); None picks what the repo holds (see the module docstring).
    revision: branch, tag or commit (default main).
    only: "config" or "tokenizer" fetches, of a Hugging Face folder, config.json alone (what
    `read_config` reads: `llama3 params hf:...` needs no weights) or the tokenizer files alone;
    None, the model.  GGUF files and Meta folders come whole.
    Errors are one-line `Llama3Error`s.
    """
    hub = _huggingface_hub()
    model = HubModel(repo_id, file, revision)
    key = (hub.constants.HF_HUB_CACHE, hub.constants.HF_HUB_OFFLINE, repo_id, file, revision)
    for known in ((*key, only), (*key, None)):  # a whole model serves a config-only request too
        if os.path.exists(_RESOLVED.get(known, "")):
            return _RESOLVED[known]
    _RESOLVED[(*key, only)] = path = _download(hub, model, only)
    return path


def _download(hub, model: HubModel, only: str | None) -> str:
    """`download`'s work: list the repo, choose its files, fetch them; Hub errors -> one line."""
    repo_id, revision = model.repo_id, model.revision
    try:
        files, from_cache = _list_files(hub, model)
        kind, names, subfolder = choose_files(model, files, from_cache)
        if kind == "file":
            return hub.hf_hub_download(repo_id, names[0], revision=revision, local_files_only=from_cache)
        if only is not None and "config.json" in names:  # a Hugging Face folder
            names = ["config.json"] if only == "config" else [n for n in names if n in TOKENIZER_FILES]
        if "config.json" in names and not from_cache:  # refuse a model we cannot run before its weights come
            from llama3.checkpoint.hf import read_hf_config

            read_hf_config(Path(hub.hf_hub_download(repo_id, "config.json", revision=revision)).parent)
        folder = hub.snapshot_download(repo_id, revision=revision, allow_patterns=names,
                                       local_files_only=from_cache)
        return os.path.join(folder, subfolder) if subfolder else folder
    except Llama3Error:
        raise
    except Exception as error:
        message = explain(error, model, hub)
        if message is None:
            raise
        raise Llama3Error(message) from None


def _huggingface_hub():
    """The huggingface_hub package with the submodules used here (it imports them lazily)."""
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.errors  # noqa: F401

    return huggingface_hub


def _list_files(hub, model: HubModel) -> tuple[list[str], bool]:
    """The repo's file paths (from the Hub, else from the cached snapshot) and whether they are the cache's.

    As huggingface_hub's own snapshot_download does, a Hub that cannot be reached, or that refuses
    the request (no token for a private repo, the Hub down), falls back to the cache; a model that
    is not cached then gets the Hub's error.  An unknown revision is an error at once."""
    hub_error = None
    if not hub.constants.HF_HUB_OFFLINE:
        try:
            info = hub.model_info(model.repo_id, revision=model.revision)  # one request; list_repo_files retries
            return [sibling.rfilename for sibling in info.siblings or []], False
        except hub.errors.RevisionNotFoundError:
            raise
        except (hub.errors.HfHubHTTPError, *network_errors(hub)) as error:
            hub_error = error
    try:
        folder = hub.snapshot_download(model.repo_id, revision=model.revision, local_files_only=True)
    except hub.errors.LocalEntryNotFoundError as error:
        folder = getattr(error, "snapshot_path", None)  # IncompleteSnapshotError: we never fetch every file
        if folder is None:
            if isinstance(hub_error, hub.errors.HfHubHTTPError):
                raise hub_error from None
            raise Llama3Error(not_cached(model, hub_error)) from None
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()), True


def choose_files(model: HubModel, files: list[str], from_cache: bool) -> tuple[str, list[str], str]:
    """Which of a repo's files to fetch -> ("file", [name], "") or ("folder", names, subfolder)."""
    repo = model.repo_id
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if model.file is not None:
        if model.file not in files:
            if from_cache:
                raise Llama3Error(not_cached(model, None))
            listed = (f"; its GGUF files: {', '.join(ggufs)}" if ggufs else
                      f"; see its files at https://huggingface.co/{repo}/tree/{model.revision or 'main'}")
            raise Llama3Error(f"{repo} has no file {model.file!r}{_at(model)}{listed}")
        return "file", [model.file], ""
    top = [f for f in files if "/" not in f]
    if "config.json" in top and any(f.endswith(".safetensors") for f in top):
        names = [f for f in top if f in FOLDER_FILES or f.endswith((".safetensors", ".safetensors.index.json"))]
        return "folder", names, ""
    if len(ggufs) == 1:
        return "file", ggufs, ""
    if ggufs:
        raise Llama3Error(f"{repo} has {len(ggufs)} GGUF files; name one, e.g. hf:{repo}/{ggufs[0]} "
                          f"(or llama3 download {repo} --file FILE): {', '.join(ggufs)}")
    for sub in ("", "original/"):  # Meta's format, in the repo root or (beside no HF weights) in original/
        names = [f for f in files if f.startswith(sub) and "/" not in f[len(sub):]]
        weights = [f for f in names if fnmatch.fnmatch(f[len(sub):], "consolidated.*.pth")]
        if sub + "params.json" in names and weights:
            return "folder", weights + [sub + name for name in META_FILES if sub + name in names], sub.rstrip("/")
    if from_cache:  # e.g. an interrupted download left config.json alone
        raise Llama3Error(not_cached(model, None, partly=True))
    if "config.json" in top:
        raise Llama3Error(f"{repo} has config.json but no .safetensors weights (only PyTorch pickles?); "
                          "llama3 reads safetensors, GGUF or Meta's consolidated.*.pth: pick a repo that has them")
    shown = ", ".join(files[:8]) + (f", ... ({len(files) - 8} more)" if len(files) > 8 else "")
    raise Llama3Error(f"{repo} holds no model llama3 reads (config.json + *.safetensors, a .gguf file, or "
                      f"params.json + consolidated.*.pth); its files: {shown or 'none'}")


def _at(model: HubModel) -> str:
    return f" at revision {model.revision!r}" if model.revision else ""


def not_cached(model: HubModel, unreachable: Exception | None, partly: bool = False) -> str:
    """The one line for a model that is not (or only partly) in the cache when the Hub cannot be asked."""
    huggingface_hub = _huggingface_hub()
    what = f"{model.repo_id}{'/' + model.file if model.file else ''}{_at(model)}"
    where = f"the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE})"
    state = f"is only partly in {where}" if partly else f"is not in {where}"
    if unreachable is not None:
        return (f"cannot reach {_endpoint()} ({_first_line(unreachable)}) and {what} {state}; check the "
                f"network (or HF_ENDPOINT), or run `{model.command()}` where there is one")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return (f"{what} {state}, and HF_HUB_OFFLINE=1 forbids downloading it; run `{model.command()}` "
                "with network access first (HF_HUB_OFFLINE unset)")
    return f"{what} {state}; run `{model.command()}` with network access first"


def explain(error: Exception, model: HubModel, hub) -> str | None:
    """huggingface_hub's exception -> the one line a user reads (None: not a Hub error, a bug to show)."""
    e = hub.errors
    repo, page = model.repo_id, f"https://huggingface.co/{model.repo_id}"
    has_token = bool(hub.get_token())
    if isinstance(error, e.GatedRepoError):
        if has_token:
            return (f"{repo} is gated and your token's account has no access yet: accept the licence at "
                    f"{page} while logged in (approval can take a while), then retry")
        return (f"{repo} is gated: accept the licence at {page} and set HF_TOKEN to an access token of that "
                "account (https://huggingface.co/settings/tokens)")
    if isinstance(error, e.RevisionNotFoundError):
        return (f"{repo} has no revision {model.revision!r}; pass a branch, tag or commit it has "
                f"(see {page}/commits/main)")
    if isinstance(error, e.RepositoryNotFoundError):
        hint = ("or your token's account cannot see it" if has_token
                else "or it is private (then set HF_TOKEN to an access token that can read it)")
        return f"{repo}: no such model on huggingface.co, {hint}; check the name at {page}"
    if isinstance(error, e.LocalEntryNotFoundError):  # offline, or the Hub unreachable, and not cached
        cause = error.__cause__ or error.__context__
        unreachable = cause if isinstance(cause, network_errors(hub)) else None
        if unreachable is None and not hub.constants.HF_HUB_OFFLINE and "connection" in str(error).lower():
            unreachable = error
        partly = isinstance(error, getattr(e, "IncompleteSnapshotError", ()))
        return not_cached(model, unreachable, partly=partly)
    if isinstance(error, e.EntryNotFoundError):
        what = f"no file {model.file!r}" if model.file else f"a file this model needs ({_first_line(error)})"
        return f"{repo} has {what}{_at(model)}; see its files at {page}/tree/{model.revision or 'main'}"
    if isinstance(error, e.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401 and has_token:
            source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "your saved token"
            return (f"huggingface.co refused {source} (401 unauthorized): it is invalid or expired; make a new "
                    "one at https://huggingface.co/settings/tokens")
        if status == 401:
            return (f"huggingface.co wants a login for {repo} (401 unauthorized): set HF_TOKEN to an access "
                    "token (https://huggingface.co/settings/tokens)")
        if status == 403:
            fix = "your token lacks read permission for it; make one" if has_token else "set HF_TOKEN to a token"
            return (f"huggingface.co refused access to {repo} (403 forbidden): {fix} that can read it "
                    "(https://huggingface.co/settings/tokens)")
        if status == 429:
            return ("huggingface.co is rate-limiting these requests (429); wait a minute and retry "
                    "(a HF_TOKEN raises the limit)")
        if status is not None and status >= 500:
            return f"huggingface.co failed ({status}: {_first_line(error)}); try again later"
        return f"huggingface.co answered {status} for {repo}: {_first_line(error)}"
    if isinstance(error, getattr(e, "HFValidationError", ())):
        return f"{repo!r} is not a Hugging Face repository name: {_first_line(error)}"
    if isinstance(error, network_errors(hub)):
        return (f"cannot reach {_endpoint()} ({_first_line(error)}); check the network (or HF_ENDPOINT), or "
                "set HF_HUB_OFFLINE=1 to use only models already in the cache")
    if isinstance(error, OSError):  # e.g. the disk is full, the cache folder is not writable
        return (f"downloading {repo} into {hub.constants.HF_HUB_CACHE} failed: {_first_line(error)} "
                "(free some space, or set HF_HUB_CACHE to a folder on another disk)")
    return None


def network_errors(hub) -> tuple[type[BaseException], ...]:
    """The exceptions a dead network raises through huggingface_hub: Python's own, its offline-mode
    error, and its HTTP library's transport errors (httpx2 in 2.x, httpx in 1.x, requests before),
    found from the base class of its HfHubHTTPError so that no version is assumed."""
    import importlib

    http_base = next(c for c in hub.errors.HfHubHTTPError.__mro__[1:]
                     if c.__module__.split(".")[0] != "huggingface_hub")
    http = importlib.import_module(http_base.__module__.split(".")[0])
    candidates = (getattr(http, name, None) for name in ("TransportError", "ConnectionError", "Timeout"))
    extra = [error for error in candidates  # (httpx.Timeout is a setting, not an error)
             if isinstance(error, type) and issubclass(error, BaseException)]
    return (ConnectionError, TimeoutError, hub.errors.OfflineModeIsEnabled, *extra)


def _endpoint() -> str:
    """huggingface.co, or the HF_ENDPOINT set instead (a mirror)."""
    endpoint = _huggingface_hub().constants.ENDPOINT.rstrip("/")
    return "huggingface.co" if endpoint == "https://huggingface.co" else endpoint


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."
