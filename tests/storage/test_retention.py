"""Retention: holders keep the WAL they still need, within the byte cap."""

from __future__ import annotations

from pathlib import Path

from kvservice.storage.retention import Retention
from kvservice.storage.segments import list_segments, segment_name


def _segments(wal: Path, firsts: list[int], size: int = 1000) -> None:
    wal.mkdir()
    for first in firsts:
        (wal / segment_name(first)).write_bytes(b"x" * size)


def _firsts(wal: Path) -> list[int]:
    return [int(p.name[:16], 16) for p in list_segments(wal)]


def test_a_holder_keeps_what_it_still_needs(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    _segments(wal, [1, 11, 21, 31, 41])
    retention = Retention(wal, max_bytes=10_000)
    position = 15
    retention.hold("replica-a", lambda: position)
    retention.purge(40)  # the snapshot covers 1..40
    assert _firsts(wal) == [11, 21, 31, 41]  # 16.. is in segment 11
    position = 35
    retention.purge(40)
    assert _firsts(wal) == [31, 41]
    retention.release("replica-a")
    retention.purge(40)
    assert _firsts(wal) == [41]


def test_never_past_the_snapshot_and_never_the_last_segment(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    _segments(wal, [1, 11, 21])
    retention = Retention(wal, max_bytes=0)
    assert retention.purge(5) == []  # recovery still needs 6..10 of segment 1
    retention.purge(10_000)
    assert _firsts(wal) == [21]


def test_a_dead_holder_cannot_fill_the_disk(tmp_path: Path) -> None:
    """Past wal_retention_max_bytes the oldest held segments go (newest kept, no holes)."""
    wal = tmp_path / "wal"
    _segments(wal, [1, 11, 21, 31, 41, 51], size=1000)
    retention = Retention(wal, max_bytes=2500)
    retention.hold("dead-watcher", lambda: 0)
    retention.purge(50)
    assert _firsts(wal) == [31, 41, 51]  # two held segments fit in 2500 bytes
    assert retention.needed() == 0
