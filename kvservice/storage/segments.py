"""Names of WAL segments and snapshots, and finding them on disk.

Both kinds of file are named by a revision in 16 lowercase hex digits:
a segment (`wal/%016x.wal`) by the revision of its first record, a snapshot
(`snap/%016x.snap`) by the revision it holds everything up to. Files with
other names are ignored, so an operator's `.broken` copy never takes part.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from kvservice.storage.files import create_atomically

SEGMENT_SUFFIX = ".wal"
SNAPSHOT_SUFFIX = ".snap"


def data_dirs(data_dir: Path) -> tuple[Path, Path]:
    """(wal dir, snap dir) under a data directory."""
    return data_dir / "wal", data_dir / "snap"


def segment_name(first_revision: int) -> str:
    return f"{first_revision:016x}{SEGMENT_SUFFIX}"


def snapshot_name(revision: int) -> str:
    return f"{revision:016x}{SNAPSHOT_SUFFIX}"


def file_revision(path: Path) -> int:
    """The revision a segment or snapshot is named by (ValueError for foreign names)."""
    stem, dot, _ = path.name.partition(".")
    if len(stem) != 16 or not dot:
        raise ValueError(f"{path.name} is not named by a revision")
    return int(stem, 16)


def segment_revision(path: Path) -> int:
    """First revision named by a segment file (ValueError for foreign names)."""
    return file_revision(path)


def _named(directory: Path, suffix: str) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"*{suffix}"):
        if path.suffix != suffix:
            continue
        with contextlib.suppress(ValueError):
            found.append((file_revision(path), path))
    return sorted(found)


def list_segments(wal_dir: Path) -> list[Path]:
    """Segments in revision order; files with other names are ignored."""
    return [path for _, path in _named(wal_dir, SEGMENT_SUFFIX)]


def list_snapshots(snap_dir: Path) -> list[tuple[int, Path]]:
    """(revision, path) of every snapshot, newest first."""
    return _named(snap_dir, SNAPSHOT_SUFFIX)[::-1]


def segment_for(segments: list[Path], revision: int) -> int | None:
    """Index of the segment that would hold `revision`: the last one named at or
    before it. None when every segment starts after it."""
    index = None
    for i, path in enumerate(segments):
        if segment_revision(path) > revision:
            break
        index = i
    return index


def create_segment(wal_dir: Path, first_revision: int) -> Path:
    """Create an empty segment durably."""
    return create_atomically(wal_dir / segment_name(first_revision))
