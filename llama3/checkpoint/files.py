"""Small file helpers: atomic writes, JSON reading and releasing memory-mapped pages, shared by
the checkpoint formats, the tokenizers and the figures (this module imports nothing else from
llama3 but errors).

Atomic means a reader never sees a half-written checkpoint: everything is
written under a temporary name in the same folder (so the final rename stays on
one filesystem) and only then renamed into place with `os.replace`.  If the
writer crashes, the old checkpoint (if any) is left intact and the temporary
is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import mmap
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from llama3.errors import CheckpointError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_permissions(path: Path) -> None:
    """Give a temporary (created private, 0600/0700) the permissions an ordinary new file would get."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _usual_permissions(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, stale: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success move its files into `path`.

    A new `path` is created by renaming the whole temporary folder (one atomic
    step).  An existing `path` keeps its other files (a training run's logs, say):
    each new file replaces its namesake with `os.replace`, and files matching the
    glob patterns in `stale` (e.g. old weight shards) that the new checkpoint did
    not write are removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for item in [tmp, *tmp.iterdir()]:
            _usual_permissions(item)
        if not path.exists():
            os.replace(tmp, path)
            return
        written = {p.name for p in tmp.iterdir()}
        for pattern in stale:
            for old in path.glob(pattern):
                if old.name not in written and old.is_file():
                    old.unlink()
        for name in sorted(written):
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike, error: type[Exception] = CheckpointError) -> dict:
    """A JSON object from `path`, or `error` (a Llama3Error subclass) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); restore or re-download the file") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be a config file; restore or re-download the file") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: dict, ensure_ascii: bool = True) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=ensure_ascii) + "\n")


def release_pages(path: str | os.PathLike, address: int, nbytes: int) -> None:
    """Drop from this process's RSS the memory-mapped pages of `path` under [address, address + nbytes).

    For a tensor read from a memory-mapped checkpoint that has just been copied
    (converted to another dtype, permuted, merged with other shards) and will not be
    used again: its pages count in RSS once touched, so without this a load holds
    the file's pages and the copies at once.  madvise(MADV_DONTNEED) unmaps them; the
    bytes stay in the file (and the page cache), and a later read faults them back in
    unchanged, since loading never writes to a mapping.  Only whole pages inside the
    range are dropped, and only when the range lies in a mapping of `path` itself,
    never in ordinary (anonymous) memory, where MADV_DONTNEED would discard data.
    Linux only; elsewhere (and when the range is not a mapping of `path`) it does nothing.
    """
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return
    page = mmap.PAGESIZE
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    if end <= start:
        return
    target = os.path.realpath(path)
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:  # "lo-hi perms offset dev inode path"
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6 and fields[5] == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= start and end <= hi:
                    _madvise()(start, end - start, mmap.MADV_DONTNEED)
                    return


def release_if_copied(path: str | os.PathLike, source, result) -> None:
    """`release_pages` for tensor `source` (read from `path`) once `result` was made from it,
    unless `result` still shares its memory (then the mapped pages are the result's own)."""
    if result.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
        release_pages(path, source.data_ptr(), source.nbytes)


@functools.cache
def _madvise():
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise
