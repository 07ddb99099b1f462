"""Snapshots: exact round trip, damage never loaded, WAL purged behind them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvservice.engine import REVISION
from kvservice.errors import CorruptRecord, StorageError
from kvservice.storage import record
from kvservice.storage.recovery import recover
from kvservice.storage.snapshot import (
    CHUNK_BYTES,
    CHUNK_KEYS,
    child_error,
    fork_snapshot,
    list_snapshots,
    load_snapshot,
    write_snapshot,
)
from kvservice.storage.wal import list_segments
from tests.nodes import open_node

stored = st.dictionaries(
    st.text(min_size=1, max_size=20),
    st.tuples(st.integers(min_value=1, max_value=2**63), st.binary(max_size=50)).map(
        lambda rv: REVISION.pack(rv[0]) + rv[1]
    ),
    max_size=50,
)


@settings(max_examples=30)
@given(stored)
def test_round_trip(tmp_path_factory: pytest.TempPathFactory, data: dict[str, bytes]) -> None:
    snap_dir = tmp_path_factory.mktemp("snap")
    path = write_snapshot(snap_dir, data, 77)
    loaded = load_snapshot(path)
    assert loaded.revision == 77
    assert loaded.data == data


def test_many_chunks(tmp_path: Path) -> None:
    data = {f"k{i}": REVISION.pack(i + 1) + b"v" for i in range(CHUNK_KEYS * 2 + 5)}
    assert load_snapshot(write_snapshot(tmp_path, data, 9)).data == data


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_any_damage_is_corruption(tmp_path: Path, damage: str) -> None:
    """A snapshot is written atomically, so even a short file is corruption, never 'torn'."""
    data = {f"k{i}": REVISION.pack(1) + b"value" for i in range(100)}
    path = write_snapshot(tmp_path, data, 1)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x40
    elif damage == "truncate":
        del raw[-7:]
    else:
        raw += b"\x01\x02\x03"
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecord) as info:
        load_snapshot(path)
    assert str(path) in str(info.value)


def test_misnamed_snapshot_is_refused(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, {}, 5)
    wrong = path.with_name(f"{6:016x}.snap")
    path.rename(wrong)
    with pytest.raises(StorageError, match="belongs in"):
        load_snapshot(wrong)


async def _fill(data_dir: Path, count: int, **settings: object) -> None:
    node = open_node(data_dir, **settings)
    node.start()
    for i in range(count):
        await node.set(f"key{i % 50}", f"value{i}".encode())
    if node._snapshot_task is not None:
        await node._snapshot_task
    await node.close()


def test_background_snapshots_purge_the_wal(tmp_path: Path) -> None:
    """Past the threshold a snapshot is forked; covered segments are deleted; state survives."""
    asyncio.run(_fill(tmp_path, 600, wal_segment_bytes=4096, snapshot_threshold_bytes=8192))
    snaps = list_snapshots(tmp_path / "snap")
    assert 1 <= len(snaps) <= 2
    segments = list_segments(tmp_path / "wal")
    assert int(segments[0].name[:16], 16) > 1  # the oldest segments are gone
    result = recover(tmp_path)
    assert result.snapshot_revision == snaps[0][0]
    assert result.store.revision == 600
    assert result.store.get("key49") == (b"value599", 600)


def test_damaged_newest_snapshot_is_skipped_not_loaded(tmp_path: Path) -> None:
    """The older snapshot plus a longer replay gives the same state, and the damage is reported."""
    asyncio.run(_fill(tmp_path, 600, wal_segment_bytes=4096, snapshot_threshold_bytes=8192))
    snaps = list_snapshots(tmp_path / "snap")
    assert len(snaps) == 2
    newest = snaps[0][1]
    raw = bytearray(newest.read_bytes())
    raw[30] ^= 0xFF
    newest.write_bytes(bytes(raw))
    result = recover(tmp_path)
    assert result.snapshot_revision == snaps[1][0]
    assert result.damaged_snapshots
    assert str(newest) in result.damaged_snapshots[0]
    assert result.store.revision == 600
    assert result.store.get("key49") == (b"value599", 600)
    # Set aside, so it no longer counts as one of the snapshots kept.
    assert not newest.exists()
    assert newest.with_name(newest.name + ".broken").read_bytes() == bytes(raw)
    assert [rev for rev, _ in list_snapshots(tmp_path / "snap")] == [snaps[1][0]]


def test_large_values_are_split_into_bounded_chunks(tmp_path: Path) -> None:
    """Chunks end by size as well as by key count, far below the record limit."""
    value = REVISION.pack(1) + b"v" * (1 << 20)
    data = {f"big{i}": value for i in range(12)}
    path = write_snapshot(tmp_path, data, 1)
    sizes = [len(p) for _, p in record.scan(path.read_bytes())]
    assert max(sizes) < CHUNK_BYTES + (1 << 20) + 4096
    assert len(sizes) >= 2 + 12 * (1 << 20) // CHUNK_BYTES
    assert load_snapshot(path).data == data


def test_a_failed_snapshot_child_says_why(tmp_path: Path) -> None:
    """The parent learns the child's reason through the pipe, for the log."""
    pid, errors = fork_snapshot(tmp_path / "missing-dir", {}, 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1
    assert "missing-dir" in child_error(errors)
