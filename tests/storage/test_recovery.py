"""Recovery: torn tails are cut, any other damage stops start-up naming file and offset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvservice.errors import CorruptRecord, StorageError
from kvservice.storage import record
from kvservice.storage.recovery import recover
from kvservice.storage.segments import list_segments, segment_revision
from tests.nodes import open_node


def fill(data_dir: Path, count: int, **settings: object) -> None:
    async def scenario() -> None:
        node = open_node(data_dir, **settings)
        node.start()
        for i in range(count):
            await node.set(f"k{i}", b"v" * 50)
        await node.close()

    asyncio.run(scenario())


def test_fresh_dir_creates_first_segment(tmp_path: Path) -> None:
    result = recover(tmp_path)
    assert result.store.revision == 0
    assert [p.name for p in list_segments(tmp_path / "wal")] == [f"{1:016x}.wal"]


def test_torn_tail_is_truncated_and_reported(tmp_path: Path) -> None:
    fill(tmp_path, 10)
    segment = list_segments(tmp_path / "wal")[-1]
    good_size = segment.stat().st_size
    with open(segment, "ab") as f:
        f.write(record.encode(b"never finished")[:9])
    result = recover(tmp_path)
    assert result.torn_tail is not None
    assert result.torn_tail.offset == good_size
    assert segment.stat().st_size == good_size
    assert result.store.revision == 10


def test_read_only_check_does_not_truncate(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    segment = list_segments(tmp_path / "wal")[-1]
    with open(segment, "ab") as f:
        f.write(b"\x07" * 5)
    size = segment.stat().st_size
    assert recover(tmp_path, repair_tail=False).torn_tail is not None
    assert segment.stat().st_size == size


def test_mid_log_corruption_names_file_and_offset(tmp_path: Path) -> None:
    fill(tmp_path, 10)
    segment = list_segments(tmp_path / "wal")[-1]
    raw = bytearray(segment.read_bytes())
    second_record = len(raw) // 10  # records are the same size here
    raw[second_record + 20] ^= 0x10
    segment.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecord) as info:
        recover(tmp_path)
    assert info.value.path == str(segment)
    assert info.value.offset == second_record
    assert segment.stat().st_size == len(raw)  # nothing was cut


def test_torn_record_in_an_earlier_segment_is_corruption(tmp_path: Path) -> None:
    fill(tmp_path, 100, wal_segment_bytes=4096)
    first = list_segments(tmp_path / "wal")[0]
    raw = first.read_bytes()
    first.write_bytes(raw[:-3])
    with pytest.raises(CorruptRecord, match="before the last segment"):
        recover(tmp_path)


def test_missing_segment_is_a_gap(tmp_path: Path) -> None:
    """A deleted middle segment is caught by revision continuity, not silently skipped."""
    fill(tmp_path, 200, wal_segment_bytes=4096)
    segments = list_segments(tmp_path / "wal")
    assert len(segments) >= 3
    segments[1].unlink()
    with pytest.raises(StorageError, match="expected revision"):
        recover(tmp_path)


def test_wal_that_starts_after_the_state_is_refused(tmp_path: Path) -> None:
    fill(tmp_path, 100, wal_segment_bytes=4096)
    list_segments(tmp_path / "wal")[0].unlink()
    with pytest.raises(StorageError, match="revisions in between are missing"):
        recover(tmp_path)


def test_stale_tmp_files_are_removed(tmp_path: Path) -> None:
    fill(tmp_path, 1)
    stale = tmp_path / "snap" / f"{5:016x}.snap.tmp"
    stale.write_bytes(b"half a snapshot")
    recover(tmp_path)
    assert not stale.exists()


def test_empty_segment_left_by_an_interrupted_rotation(tmp_path: Path) -> None:
    """An empty segment named past the end of the log (left by older versions when a
    crash came mid-rotation) is removed, nothing is lost, and later writes,
    snapshots and restarts work."""
    fill(tmp_path, 10)
    wal = tmp_path / "wal"
    stale = wal / f"{16:016x}.wal"  # records 11..15 never reached the old segment
    stale.write_bytes(b"")
    result = recover(tmp_path)
    assert result.store.revision == 10
    assert not stale.exists()
    assert [segment_revision(p) for p in list_segments(wal)] == [1]  # appended to again

    async def more() -> None:
        node = open_node(tmp_path, wal_segment_bytes=4096)
        node.start()
        for i in range(100):
            await node.set(f"k{i}", b"w" * 50)
        assert await node.snapshot() is not None
        await node.close()

    asyncio.run(more())
    again = recover(tmp_path)
    assert again.store.revision == 110
    assert again.store.get("k99") == (b"w" * 50, 110)


def test_empty_segments_before_the_last_are_removed(tmp_path: Path) -> None:
    fill(tmp_path, 10, wal_segment_bytes=4096)
    wal = tmp_path / "wal"
    empty = wal / f"{5:016x}.wal"
    empty.write_bytes(b"")
    result = recover(tmp_path)
    assert result.store.revision == 10
    assert not empty.exists()


def test_torn_tail_before_an_empty_last_segment_is_still_a_torn_tail(tmp_path: Path) -> None:
    """Empty segments do not count as 'after' the tail: the torn record is cut."""
    fill(tmp_path, 10)
    wal = tmp_path / "wal"
    first = list_segments(wal)[0]
    good = first.stat().st_size
    with open(first, "ab") as f:
        f.write(record.encode(b"x" * 60)[:30])
    (wal / f"{14:016x}.wal").write_bytes(b"")
    result = recover(tmp_path)
    assert result.torn_tail is not None
    assert first.stat().st_size == good
    assert result.store.revision == 10
    assert [p.name for p in list_segments(wal)] == [first.name]
