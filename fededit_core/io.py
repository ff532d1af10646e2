"""Writes that appear whole or not at all: a file or a folder is built under a temporary name beside
its target (one per process, since edit workers may race for one cache entry) and renamed into place.
Files and folders are fsynced before and after the rename, so a power cut leaves the old or the new
content, never a renamed folder of empty files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders themselves (deepest first)."""
    folders = [folder]
    for entry in sorted(folder.rglob("*")):
        if entry.is_file():
            fsync_path(entry)
        elif entry.is_dir():
            folders.append(entry)
    for sub in reversed(folders):
        fsync_path(sub)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """``path`` holds ``data`` (text as UTF-8) whole, or keeps what it held before."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def last_good(path: str | Path) -> Path:
    """Where :func:`atomic_folder` with ``keep_previous`` keeps the folder it replaced."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


@contextmanager
def atomic_folder(
    path: str | Path, keep: Callable[[Path], bool] | None = None, keep_previous: bool = False
) -> Iterator[Path]:
    """Yields an empty staging folder; on success it replaces the folder ``path`` whole.

    The old folder is first renamed to ``<path>.old``, so a crash between the two renames leaves it
    for :func:`recover_folder`; with ``keep_previous`` it then becomes :func:`last_good` instead of
    being deleted. When ``keep(path)`` holds at the end (a cache entry that another process
    completed meanwhile), that folder stays and the staging copy is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        if keep is not None and keep(path):
            return
        fsync_tree(staging)
        old = _previous(path)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        fsync_path(path.parent)
        if keep_previous and old.exists():
            shutil.rmtree(last_good(path), ignore_errors=True)
            os.replace(old, last_good(path))
            fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def recover_folder(path: str | Path, marker: str) -> Path:
    """``path`` back from ``<path>.old`` when a crash came between :func:`atomic_folder`'s renames
    (``marker``: a file every complete folder holds)."""
    path = Path(path)
    old = _previous(path)
    if not (path / marker).is_file() and (old / marker).is_file():
        shutil.rmtree(path, ignore_errors=True)
        os.replace(old, path)
    return path
