"""Snapshots: exact round trip, damage never loaded, WAL purged behind them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvservice.engine import HEADER
from kvservice.errors import CorruptRecord, SnapshotFailed, StorageError
from kvservice.storage import record
from kvservice.storage.recovery import recover
from kvservice.storage.segments import list_segments, list_snapshots
from kvservice.storage.snapshot import CHUNK_BYTES, CHUNK_KEYS, load_snapshot, write_snapshot
from tests.nodes import open_node

stored = st.dictionaries(
    st.text(min_size=1, max_size=20),
    st.tuples(st.integers(min_value=1, max_value=2**63), st.binary(max_size=50)).map(
        lambda rv: HEADER.pack(rv[0]) + rv[1]
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
    data = {f"k{i}": HEADER.pack(i + 1) + b"v" for i in range(CHUNK_KEYS * 2 + 5)}
    assert load_snapshot(write_snapshot(tmp_path, data, 9)).data == data


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_any_damage_is_corruption(tmp_path: Path, damage: str) -> None:
    """A snapshot is written atomically, so even a short file is corruption, never 'torn'."""
    data = {f"k{i}": HEADER.pack(1) + b"value" for i in range(100)}
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


async def _fill(data_dir: Path, count: int, *, snapshots_at: tuple[int, ...] = (),
                **settings: object) -> None:  # fmt: skip
    """Write `count` sets; take a snapshot on demand after each write number in `snapshots_at`."""
    node = open_node(data_dir, **settings)
    node.start()
    for i in range(count):
        await node.set(f"key{i % 50}", f"value{i}".encode())
        if i + 1 in snapshots_at:
            await node.snapshot()
    await node.snapshotter.close()
    await node.close()


def test_background_snapshots_purge_the_wal(tmp_path: Path) -> None:
    """Past the threshold a snapshot is written; covered segments are deleted; state survives."""

    async def scenario() -> None:
        node = open_node(tmp_path, wal_segment_bytes=4096, snapshot_threshold_bytes=8192,
                         repl_backlog_bytes=4096)  # fmt: skip
        node.start()
        for i in range(1200):
            await node.set(f"key{i % 50}", f"value{i}".encode())
        await node.snapshotter.close()
        # The size trigger wrote some (how many depends on the machine's speed)...
        assert list_snapshots(tmp_path / "snap")
        # ...and two more at the end make the oldest kept one cover all but the
        # newest segments, whatever the timing was.
        await node.snapshot()
        await node.set("key49", b"value1199")
        await node.snapshot()
        await node.close()

    asyncio.run(scenario())
    snaps = list_snapshots(tmp_path / "snap")
    assert 1 <= len(snaps) <= 2
    segments = list_segments(tmp_path / "wal")
    assert int(segments[0].name[:16], 16) > 1  # the oldest segments are gone
    result = recover(tmp_path)
    assert result.snapshot_revision == snaps[0][0]
    assert result.store.revision == 1201
    assert result.store.get("key49") == (b"value1199", 1201)


def test_damaged_newest_snapshot_is_skipped_not_loaded(tmp_path: Path) -> None:
    """The older snapshot plus a longer replay gives the same state, and the damage is reported."""
    # Two snapshots taken on demand (not by the size trigger, whose timing varies).
    asyncio.run(_fill(tmp_path, 600, snapshots_at=(200, 400), wal_segment_bytes=4096))
    snaps = list_snapshots(tmp_path / "snap")
    assert [rev for rev, _ in snaps] == [400, 200]
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


def test_a_snapshot_builds_on_the_previous_one_and_the_wal(tmp_path: Path) -> None:
    """The writer process loads the newest snapshot, replays the WAL up to the durable
    watermark, and writes exactly the node's state at that revision."""

    async def scenario() -> dict[str, tuple[bytes, int] | None]:
        node = open_node(tmp_path, wal_segment_bytes=4096)
        node.start()
        for i in range(300):
            await node.set(f"k{i % 70}", f"v{i}".encode())
            if i % 9 == 0:
                await node.delete(f"k{(i * 7) % 70}")
        first = await node.snapshot()
        for i in range(300, 450):
            await node.set(f"k{i % 90}", f"v{i}".encode())
        second = await node.snapshot()
        assert second.revision == node.store.revision > first.revision
        expected = {key: node.store.get(key) for key in node.store.data}
        await node.close()
        return expected

    expected = asyncio.run(scenario())
    newest = list_snapshots(tmp_path / "snap")[0][1]
    loaded = load_snapshot(newest)
    assert {key: (value[8:], HEADER.unpack_from(value)[0])
            for key, value in loaded.data.items()} == expected  # fmt: skip


def test_a_failed_snapshot_says_why_and_leaves_no_process_behind(tmp_path: Path) -> None:
    """The writer's reason reaches the caller and the log; the node forgets the process
    in every path, so a later shutdown can never signal a reused pid."""

    async def scenario() -> None:
        node = open_node(tmp_path)
        node.start()
        await node.set("k", b"v")
        snap_dir = tmp_path / "snap"
        snap_dir.rename(tmp_path / "snap-moved")  # the writer cannot create its file
        with pytest.raises(SnapshotFailed, match="snap"):
            await node.snapshot()
        assert node.snapshotter._proc is None
        assert not node.snapshotter.running
        (tmp_path / "snap-moved").rename(snap_dir)
        info = await node.snapshot()  # and the next one works
        assert info.revision == 1
        assert node.snapshotter._proc is None
        node.close_sync()  # kills nothing: there is no process to kill

    asyncio.run(scenario())
    assert recover(tmp_path).store.get("k") == (b"v", 1)


def test_large_values_are_split_into_bounded_chunks(tmp_path: Path) -> None:
    """Chunks end by size as well as by key count, far below the record limit."""
    value = HEADER.pack(1) + b"v" * (1 << 20)
    data = {f"big{i}": value for i in range(12)}
    path = write_snapshot(tmp_path, data, 1)
    sizes = [len(p) for _, p in record.scan(path.read_bytes())]
    assert max(sizes) < CHUNK_BYTES + (1 << 20) + 4096
    assert len(sizes) >= 2 + 12 * (1 << 20) // CHUNK_BYTES
    assert load_snapshot(path).data == data
