"""Write-then-rename: a file or a folder appears complete or not at all (a crash leaves the old one or a ``.tmp``).

The one helper for atomic writes in slimtune (importable from every layer, like ``slimtune.errors``):

- ``atomic_path(path)``: a context manager yielding a temporary sibling path to write (by any writer, e.g.
  safetensors' ``save_file``); it replaces ``path`` with ``os.replace`` when the block succeeds.
- ``write_text_atomic(path, text)``: the same for a text file.
- ``atomic_dir(final)``: a context manager yielding a fresh temporary sibling folder to fill; it replaces ``final``
  when the block succeeds. ``fsync=True`` (checkpoints) flushes every file and the folders around the rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then the folder itself."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``<path>.tmp<pid>``; after the block, it replaces ``path`` (the temporary file is removed on an error).
    The pid keeps concurrent writers of one file (two runs sharing a cache) out of each other's way."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, tmp: Path | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder (``tmp``, default ``<final>.tmp``) to fill; after the block it replaces
    ``final`` (what was there is removed). An exception removes the temporary folder; a crash leaves it (the next
    writer starts it afresh), never a partial ``final``. ``fsync``: flush files and folders around the rename."""
    final = Path(final)
    tmp = Path(tmp) if tmp is not None else final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, final)
    if fsync:
        fsync_dir(final.parent)
