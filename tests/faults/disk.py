"""Damage files the way crashes and bad disks do, and a tiny tmpfs to fill up."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvservice.storage import record


@dataclass(frozen=True)
class Record:
    """Where one record sits in a file: [offset, end)."""

    offset: int
    end: int


def records(path: Path) -> list[Record]:
    """Every record of a clean WAL segment or snapshot, in file order."""
    found = []
    for offset, payload in record.scan(path.read_bytes(), str(path)):
        found.append(Record(offset, offset + record.HEADER_SIZE + len(payload)))
    return found


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of the byte at `offset` (in place, durable)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        assert len(old) == 1, f"{path} has no byte at offset {offset}"
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def truncate(path: Path, size: int) -> None:
    """Cut `path` to `size` bytes."""
    os.truncate(path, size)


def append(path: Path, data: bytes) -> None:
    """Append raw bytes to `path`."""
    with open(path, "ab") as f:
        f.write(data)


def try_mount_tmpfs(mount_point: Path, size_bytes: int) -> str | None:
    """Mount a tmpfs of `size_bytes` at `mount_point`; return None, or why it failed."""
    mount_point.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except OSError as exc:
        return str(exc)
    return None if result.returncode == 0 else (result.stderr.strip() or "mount failed")


def resize_tmpfs(mount_point: Path, size_bytes: int) -> None:
    """Grow (or shrink) a mounted tmpfs in place, keeping its files."""
    subprocess.run(
        ["mount", "-o", f"remount,size={size_bytes}", str(mount_point)],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip


@contextlib.contextmanager
def tmpfs(mount_point: Path, size_bytes: int) -> Iterator[str | None]:
    """Yield None with a tmpfs mounted at `mount_point`, or the reason it could not be."""
    failure = try_mount_tmpfs(mount_point, size_bytes)
    try:
        yield failure
    finally:
        if failure is None:
            subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=10)
