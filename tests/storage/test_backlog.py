"""The backlog reader: entries after any revision, from the WAL on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvservice.errors import Compacted
from kvservice.storage import record
from kvservice.storage.backlog import BacklogReader
from kvservice.storage.retention import Retention
from kvservice.storage.segments import list_segments, segment_revision
from kvservice.v1.log_pb2 import LogEntry
from tests.nodes import open_node


def _write(data_dir: Path, count: int, *, snapshot_at: int | None = None) -> None:
    async def scenario() -> None:
        node = open_node(data_dir, wal_segment_bytes=4096, repl_backlog_bytes=4096)
        node.start()
        for i in range(count):
            if i % 7 == 6:
                await node.delete(f"k{i - 3}")
            else:
                await node.set(f"k{i}", f"value-{i}".encode())
            if snapshot_at is not None and i + 1 == snapshot_at:
                await node.snapshot()
        await node.close()

    asyncio.run(scenario())


def _wal_entries(wal_dir: Path) -> list[LogEntry]:
    return [
        LogEntry.FromString(payload)
        for path in list_segments(wal_dir)
        for _, payload in record.scan(path.read_bytes())
    ]


def test_from_every_revision_across_rotations(tmp_path: Path) -> None:
    """From each revision R, the reader yields exactly the WAL's entries after R."""
    _write(tmp_path, 300)
    wal = tmp_path / "wal"
    assert len(list_segments(wal)) >= 3
    entries = _wal_entries(wal)
    assert [e.revision for e in entries] == list(range(1, 301))
    for after in range(0, 301, 3):
        with BacklogReader(wal, after, block_bytes=333) as reader:
            got = []
            while batch := reader.read(max_entries=17, max_bytes=1000):
                got += batch
        assert [c.entry for c in got] == entries[after:]
        assert all(next(iter(record.scan(c.record)))[1] == c.entry.SerializeToString() for c in got)


def test_stops_at_until_and_continues_later(tmp_path: Path) -> None:
    _write(tmp_path, 60)
    with BacklogReader(tmp_path / "wal", 10) as reader:
        first = reader.read(25, max_entries=1000)
        assert [c.revision for c in first] == list(range(11, 26))
        assert reader.read(25) == []
        assert [c.revision for c in reader.read(60)] == list(range(26, 61))


def test_compacted_below_the_oldest_segment(tmp_path: Path) -> None:
    """After a snapshot purged old segments, older revisions say 'compacted'."""
    _write(tmp_path, 600, snapshot_at=550)
    wal = tmp_path / "wal"
    oldest = segment_revision(list_segments(wal)[0])
    assert oldest > 1
    with pytest.raises(Compacted) as info:
        BacklogReader(wal, oldest - 2)
    assert info.value.oldest == oldest
    assert "compacted" in str(info.value)
    with BacklogReader(wal, oldest - 1) as reader:  # the first revision still on disk
        assert [c.revision for c in reader.read(max_entries=1000)] == list(range(oldest, 601))


def test_a_segment_purged_under_a_reader_is_compacted(tmp_path: Path) -> None:
    """A reader that needs a segment deleted meanwhile is told, not given a gap."""
    _write(tmp_path, 300)
    wal = tmp_path / "wal"
    reader = BacklogReader(wal, 0)
    assert [c.revision for c in reader.read(max_entries=3)] == [1, 2, 3]
    second = segment_revision(list_segments(wal)[2])
    Retention(wal, max_bytes=0).purge(second - 1)  # the first two segments go
    with pytest.raises(Compacted):  # noqa: PT012 - reading on until the missing segment
        while reader.read(max_entries=1000):
            pass
    reader.close()


@pytest.mark.parametrize("tail", [b"\x07\x00", b"\x00" * 40, b"garbage that is no record"])
def test_a_torn_tail_is_never_delivered(tmp_path: Path, tail: bytes) -> None:
    _write(tmp_path, 40)
    last = list_segments(tmp_path / "wal")[-1]
    good = _wal_entries(tmp_path / "wal")
    # Half of one more record, or junk: what a crash mid-append leaves.
    entry = LogEntry(revision=41, operation=1, key="x", value=b"y" * 50)
    extra = record.encode(entry.SerializeToString())
    with open(last, "ab") as f:
        f.write(extra[: len(extra) // 2] if tail == b"\x07\x00" else tail)
    with BacklogReader(tmp_path / "wal", 0) as reader:
        got = []
        while batch := reader.read(40, max_entries=7):
            got += batch
        assert [c.entry for c in got] == good
        assert reader.read(40) == []
