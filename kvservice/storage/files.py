"""Small durable-file helpers shared by the WAL, snapshots and repair."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_atomically(path: Path, chunks: Iterable[bytes] = ()) -> Path:
    """Create `path` holding `chunks`, durably: tmp -> fsync -> rename -> fsync dir.

    The one way kvservice creates a file (segments, snapshots, state): a crash
    leaves either no file or the whole file, never a part of it under its name
    (a stale `.tmp` is removed at the next start).
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete leftovers of writes that crashed before their rename."""
    removed = sorted(directory.glob(f"*{TMP_SUFFIX}"))
    for path in removed:
        path.unlink()
    if removed:
        fsync_dir(directory)
    return removed


def truncate_durably(path: Path, size: int) -> None:
    """Cut `path` to `size` bytes and fsync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


class DataDirLocked(Exception):
    """Another process already serves this data directory."""


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock on `<data-dir>/LOCK` for the life of the process."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / "LOCK", "wb")  # noqa: SIM115 - held open until exit
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DataDirLocked(f"{data_dir} is in use by another kvservice process") from None
    return lock
