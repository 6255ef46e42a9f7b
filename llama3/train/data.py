"""Training data: text in, token shards out, batches back.

    llama3 prepare --data PATH --out DIR [--tokenizer SOURCE]

PATH is a text file (.txt, .md: one document), a JSONL file (one document per
line, in its "text" field), or a folder holding such files (read recursively,
in sorted order).  DIR receives:

    train_000.bin, train_001.bin, ...   raw token ids, little-endian uint16 when the
    val_000.bin                         vocabulary fits in 16 bits, else uint32
    manifest.json                       what was read, with which tokenizer, shard sizes
    tokenizer files                     (tokenizer.save), so DIR describes itself

Every document is stored as  <bos> tokens <eos>,  so the model learns where
documents start and end.  Every `1/val_fraction`-th document goes to the
validation split; a corpus with too few documents gives the tail of its token
stream instead.

Batches come back as non-overlapping windows of T+1 tokens (inputs are the first
T, targets the last T), visited in a seeded random order that is a pure function
of the global sample index: sample g of the run is window `order(g)`.  So a
resumed run, or a run split over N processes, sees exactly the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama3.checkpoint.files import atomic_file
from llama3.errors import Llama3Error

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB per uint16 shard


class DataError(Llama3Error):
    """Training data is missing, empty or malformed."""


# ------------------------------------------------------------------ reading text
def data_files(path: str | os.PathLike) -> list[Path]:
    """The text/JSONL files that `path` names: itself, or those under a folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass --data with a .txt/.jsonl file or a folder of them")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: the folder holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
    return files


def read_jsonl(path: Path, field: str | None = None) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object) for each non-blank line; a bad line raises DataError naming it.

    field: when given, every object must have it and its value is yielded instead.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {e.start} of the line: "
                                f"{raw[e.start:e.start + 4]!r}); convert the file to UTF-8 or remove that line") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); fix or remove that line") from None
            if field is not None:
                if not isinstance(obj, dict) or field not in obj:
                    raise DataError(f"{path}:{number}: expected a JSON object with a {field!r} field")
                obj = obj[field]
            yield number, obj


def iter_documents(path: str | os.PathLike) -> Iterator[str]:
    """Every non-empty document under `path`, in a fixed order."""
    for file in data_files(path):
        if file.suffix.lower() in JSONL_SUFFIXES:
            for number, text in read_jsonl(file, "text"):
                if not isinstance(text, str):
                    raise DataError(f"{file}:{number}: the 'text' field must be a string, got {type(text).__name__}")
                if text.strip():
                    yield text
        else:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{file}: not UTF-8 text; convert it or leave it out of --data") from None
            if text.strip():
                yield text


def fingerprint(path: str | os.PathLike) -> str:
    """Names, sizes and modification times of the input files: changes when the data does."""
    digest = hashlib.sha256()
    for file in data_files(path):
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ writing shards
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends token ids to `<split>_000.bin`, `<split>_001.bin`, ... under temporary names."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"}
        self.file = None
        self.tokens = 0
        self.documents = 0

    def write(self, ids: list[int]) -> None:
        self.documents += 1
        array = np.asarray(ids, dtype=self.dtype)
        while len(array):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            chunk, array = array[:room], array[room:]
            self.file.write(chunk.tobytes())
            self.shards[-1]["tokens"] += len(chunk)
            self.tokens += len(chunk)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self.file = open(self.folder / f".{name}.tmp", "wb")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def commit(self) -> None:
        """Rename every temporary shard to its final name."""
        self.close()
        for shard in self.shards:
            os.replace(self.folder / f".{shard['file']}.tmp", self.folder / shard["file"])


def _split_tail(train: ShardWriter, val: ShardWriter, fraction: float) -> None:
    """Move the last `fraction` of the train tokens (at most one shard's worth) into the val split."""
    last = train.folder / f".{train.shards[-1]['file']}.tmp"
    tokens = np.fromfile(last, dtype=train.dtype)
    take = min(len(tokens) - 1, max(1, int(train.tokens * fraction)))
    tokens[:-take].tofile(last)
    train.shards[-1]["tokens"] -= take
    train.tokens -= take
    val.write(tokens[-take:].tolist())


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a prepared data folder, or None when there is none (or it is unreadable)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == MANIFEST_VERSION else None


def is_prepared(folder: str | os.PathLike) -> bool:
    """True when `folder` holds a manifest whose shards all exist with the recorded sizes."""
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = Path(folder) / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                return False
    return True


def prepare(data: str | os.PathLike, out: str | os.PathLike, tokenizer, tokenizer_source: str,
            val_fraction: float = 0.05, shard_tokens: int | None = None,
            documents: Iterable[str] | None = None, source_id: str | None = None,
            progress: bool = True) -> dict:
    """Tokenize the documents under `data` into shards in `out`; return the manifest.

    Safe to re-run: when `out` already holds shards of the same input (same files,
    sizes and times), tokenizer and settings, nothing is redone; otherwise new
    shards are written under temporary names and renamed into place, and the
    manifest is written last, so an interrupted run never leaves a folder that
    looks prepared.  `documents`/`source_id` replace reading `data` (the default corpus).
    shard_tokens: tokens per shard file; None means DEFAULT_SHARD_TOKENS.
    """
    from tqdm import tqdm

    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.05)")
    if shard_tokens is None:
        shard_tokens = DEFAULT_SHARD_TOKENS
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens!r} must be a positive number of tokens per shard "
                        f"(default {DEFAULT_SHARD_TOKENS:,})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder; give a new or existing folder for the shards")
    settings = {"source": source_id or fingerprint(data), "tokenizer": tokenizer_source,
                "vocab_size": tokenizer.vocab_size, "val_fraction": val_fraction, "shard_tokens": shard_tokens}
    old = read_manifest(out)
    if old is not None and old.get("settings") == settings and is_prepared(out):
        return old
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is not "prepared" until we finish
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    every = max(2, round(1 / val_fraction))
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    docs = documents if documents is not None else iter_documents(data)
    for index, text in enumerate(tqdm(docs, desc="tokenizing", unit=" docs", disable=not progress)):
        ids = bos + tokenizer.encode(text, bos=False, allow_special=False) + eos
        writers["val" if index % every == every - 1 else "train"].write(ids)
    train, val = writers["train"], writers["val"]
    train.close()
    if train.tokens + val.tokens == 0:
        raise DataError(f"{data}: no text found (all documents are empty)")
    if val.tokens == 0:
        _split_tail(train, val, val_fraction)
    for writer in writers.values():
        writer.commit()
    keep = {s["file"] for w in writers.values() for s in w.shards}
    for old_shard in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        if old_shard.name not in keep:
            old_shard.unlink()
    tokenizer.save(out)
    manifest = {
        "version": MANIFEST_VERSION, "dtype": dtype.str, "settings": settings,
        "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "splits": {name: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards}
                   for name, w in writers.items()},
    }
    with atomic_file(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# ------------------------------------------------------------------ reading shards
class TokenShards:
    """All tokens of one split, read through memory maps as if from one long array."""

    def __init__(self, folder: str | os.PathLike, split: str = "train"):
        folder = Path(folder)
        if not is_prepared(folder):
            raise DataError(f"{folder}: not a prepared data folder (no valid {MANIFEST}); run: llama3 prepare")
        self.manifest = read_manifest(folder)
        dtype = np.dtype(self.manifest["dtype"])
        self.arrays = [np.memmap(folder / s["file"], dtype=dtype, mode="r")
                       for s in self.manifest["splits"][split]["shards"] if s["tokens"]]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])  # global index of each shard's first token

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens start..start+length-1 as int64, across shard boundaries."""
        pieces, end = [], start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            local = start - self.starts[shard]
            piece = self.arrays[shard][local:local + end - start]
            pieces.append(piece)
            start += len(piece)
            shard += 1
        return np.concatenate(pieces).astype(np.int64)


@dataclass
class Batch:
    """One micro-batch.  tokens, targets [B, T] (targets -100 = no loss);
    positions [B, T] and mask [B, 1, T, T] only for packed examples."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.targets), move(self.positions), move(self.mask))

    @property
    def n_targets(self) -> int:
        return int((self.targets != -100).sum())


class TokenWindows:
    """Non-overlapping windows of T+1 tokens: window i covers tokens i*T .. i*T+T."""

    def __init__(self, shards: TokenShards, seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        self.count = (len(shards) - 1) // seq_len
        if self.count < 1:
            raise DataError(f"the data has {len(shards)} tokens, fewer than one window of seq_len+1="
                            f"{seq_len + 1}; add text or lower --seq-len")

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: list[int]) -> Batch:
        rows = np.stack([self.shards.read(i * self.seq_len, self.seq_len + 1) for i in indices])  # [B, T+1]
        rows = torch.from_numpy(rows)
        return Batch(tokens=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous())


class SampleOrder:
    """Global sample index g -> dataset index: epoch g // n visits a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def __getitem__(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[i])
