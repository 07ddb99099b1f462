"""Rewinding a data dir to a fork point: from its own snapshots and WAL, staged and
switched crash-safely, with the entries after the fork saved in diverged/."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kvservice.engine import digest_of
from kvservice.errors import CannotRewind
from kvservice.storage import record
from kvservice.storage.install import COMPLETE, RESYNC_DIR, finish_install
from kvservice.storage.recovery import recover
from kvservice.storage.rewind import DIVERGED_DIR, save_diverged, stage_rewind, state_at
from kvservice.storage.segments import list_segments, segment_revision
from kvservice.storage.snapshot import write_snapshot
from kvservice.v1.log_pb2 import LogEntry
from tests.nodes import open_node

COUNT = 60
FORK = 25


def history(data_dir: Path, **settings: object) -> list[dict[str, bytes]]:
    """Write COUNT entries (sets, overwrites and deletes) on a node; return the store's
    data after each revision (index = revision)."""
    states: list[dict[str, bytes]] = [{}]

    async def scenario() -> None:
        node = open_node(data_dir, **settings)
        node.start()
        for i in range(COUNT):
            key = f"k{i % 17}"
            if i % 5 == 4 and key in node.store:
                await node.delete(key)
            else:
                await node.set(key, f"v{i}".encode() * 40)
            states.append(dict(node.store.data))
            assert node.store.revision == len(states) - 1
        await node.close()

    asyncio.run(scenario())
    return states


def test_rebuilt_from_the_wal_alone_when_there_is_no_snapshot(tmp_path: Path) -> None:
    states = history(tmp_path)
    rewound = state_at(tmp_path, FORK)
    assert (rewound.base_revision, rewound.replayed) == (0, FORK)
    assert rewound.store.revision == FORK
    assert rewound.store.data == states[FORK]
    assert rewound.store.digest == digest_of(states[FORK].items())


def test_rebuilt_from_the_newest_snapshot_at_or_before_the_fork(tmp_path: Path) -> None:
    states = history(tmp_path)
    snap_dir = tmp_path / "snap"
    for revision in (10, 20, 40):  # 40 is past the fork: never a base
        write_snapshot(snap_dir, states[revision], revision)
    rewound = state_at(tmp_path, FORK)
    assert (rewound.base_revision, rewound.replayed) == (20, FORK - 20)
    assert rewound.store.data == states[FORK]
    # A damaged snapshot is skipped for an older one, as recovery does.
    newest = snap_dir / f"{20:016x}.snap"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    rewound = state_at(tmp_path, FORK)
    assert (rewound.base_revision, rewound.replayed) == (10, FORK - 10)
    assert rewound.store.data == states[FORK]


def test_no_rewind_once_snapshots_and_wal_are_compacted_past_the_fork(tmp_path: Path) -> None:
    states = history(tmp_path, wal_segment_bytes=4096)
    segments = list_segments(tmp_path / "wal")
    later = [s for s in segments if segment_revision(s) > FORK + 1]
    assert later, "the WAL did not rotate past the fork"
    covered = segment_revision(later[0]) - 1
    # What a snapshot at `covered` and a purge leave: nothing at or before the fork.
    write_snapshot(tmp_path / "snap", states[covered], covered)
    for segment in segments[: segments.index(later[0])]:
        segment.unlink()
    with pytest.raises(CannotRewind, match="compacted"):
        state_at(tmp_path, FORK)


def test_a_rewind_staged_then_switched_is_what_recovery_finds(tmp_path: Path) -> None:
    states = history(tmp_path)
    stage_rewind(tmp_path, state_at(tmp_path, FORK).store)
    assert finish_install(tmp_path)
    result = recover(tmp_path)
    assert (result.store.revision, result.store.data) == (FORK, states[FORK])

    async def go_on() -> int:  # the log continues right after the fork point
        node = open_node(tmp_path)
        node.start()
        revision = await node.set("next", b"x")
        await node.close()
        return revision

    assert asyncio.run(go_on()) == FORK + 1
    assert recover(tmp_path).store.revision == FORK + 1


def test_a_crash_before_the_rewind_is_complete_keeps_the_old_state(tmp_path: Path) -> None:
    states = history(tmp_path)
    stage_rewind(tmp_path, state_at(tmp_path, FORK).store)
    (tmp_path / RESYNC_DIR / COMPLETE).unlink()  # the crash came before COMPLETE
    result = recover(tmp_path)
    assert (result.store.revision, result.store.data) == (COUNT, states[COUNT])
    assert not (tmp_path / RESYNC_DIR).exists()


@pytest.mark.parametrize("renames", [0, 1, 2])
def test_a_crash_after_the_rewind_is_complete_finishes_it(tmp_path: Path, renames: int) -> None:
    """Killed after COMPLETE, with 0, 1 or 2 of the swaps of wal/ done: the next start
    finishes the switch (a rename of snap/ or wal/ is each one step)."""
    states = history(tmp_path)
    stage_rewind(tmp_path, state_at(tmp_path, FORK).store)
    staging = tmp_path / RESYNC_DIR
    if renames >= 1:
        os.replace(tmp_path / "wal", staging / "old-wal")
    if renames >= 2:
        os.replace(staging / "wal", tmp_path / "wal")
    result = recover(tmp_path)
    assert (result.store.revision, result.store.data) == (FORK, states[FORK])


def test_diverged_entries_are_saved_once_with_their_count(tmp_path: Path) -> None:
    history(tmp_path)
    path, count = save_diverged(tmp_path, FORK, COUNT)
    assert count == COUNT - FORK
    assert path.parent == tmp_path / DIVERGED_DIR
    entries = [LogEntry.FromString(p) for _, p in record.scan(path.read_bytes(), str(path))]
    assert [e.revision for e in entries] == list(range(FORK + 1, COUNT + 1))
    # Saved again (a rewind retried after a crash): the same file, no copy.
    assert save_diverged(tmp_path, FORK, COUNT) == (path, count)
    assert list((tmp_path / DIVERGED_DIR).iterdir()) == [path]
