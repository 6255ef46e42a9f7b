"""Matplotlib without global state: make a Figure, save it atomically.  Agg renders it (no display needed)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from llama3.checkpoint.files import atomic_file
from llama3.errors import Llama3Error


def new_figure(width: float, height: float):
    """A Figure not registered with pyplot, so nothing leaks between plots."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` to path (.png, .svg or .pdf) atomically (checkpoint.files.atomic_file)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise Llama3Error(f"{path}: picture files must end in .png, .svg or .pdf")
    if not path.parent.exists():
        raise Llama3Error(f"{path.parent}: no such folder; create it first")
    with atomic_file(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a token's glyph missing from the font is not worth a warning
        fig.savefig(tmp, format=path.suffix[1:].lower())
    return path
