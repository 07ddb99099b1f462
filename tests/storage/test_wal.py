"""WAL: group commit, fsync policies, rotation and fail-stop on disk errors."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import threading
import time
from pathlib import Path

import pytest

from kvservice.errors import WalFailed
from kvservice.storage.recovery import recover
from kvservice.storage.retention import Retention
from kvservice.storage.segments import list_segments, segment_revision
from tests.nodes import open_node


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _burst(data_dir: Path, writers: int, **settings) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
    node = open_node(data_dir, **settings)
    node.start()
    revisions = await asyncio.gather(*(node.set(f"k{i}", b"v") for i in range(writers)))
    fsyncs = node.wal.stats.fsyncs
    await node.close()
    return list(revisions), fsyncs


def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    """64 concurrent writes at fsync=always are acknowledged after far fewer than 64 fsyncs."""
    revisions, fsyncs = run(_burst(tmp_path, 64, fsync="always"))
    assert sorted(revisions) == list(range(1, 65))
    assert 1 <= fsyncs <= 8  # one for the first writer, one for those that queued behind it
    assert len(recover(tmp_path).store) == 64


@pytest.mark.parametrize("policy", ["everysec", "no"])
def test_other_policies_ack_without_fsync(tmp_path: Path, policy: str) -> None:
    """everysec and no acknowledge after the OS write; the data is still recovered."""
    revisions, fsyncs = run(_burst(tmp_path, 20, fsync=policy))
    assert sorted(revisions) == list(range(1, 21))
    assert fsyncs <= 1  # at most the fsync of a graceful close
    assert recover(tmp_path).store.revision == 20


def test_everysec_fsyncs_within_a_second_or_so(tmp_path: Path) -> None:
    async def scenario() -> int:
        node = open_node(tmp_path, fsync="everysec")
        node.start()
        await node.set("k", b"v")
        await asyncio.sleep(1.5)
        fsyncs = node.wal.stats.fsyncs
        await node.close()
        return fsyncs

    assert run(scenario()) >= 1


def test_failed_fsync_fails_writes_but_not_reads(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """After an fsync error every write is refused (fail-stop); reads keep working."""

    async def scenario() -> None:
        node = open_node(tmp_path, fsync="always")
        node.start()
        assert await node.set("before", b"1") == 1

        def broken(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", broken)
        with pytest.raises(WalFailed, match="fsync of the WAL failed"):
            await node.set("during", b"2")
        monkeypatch.undo()
        # Even with a healthy fsync again, the node never pretends: still refused.
        with pytest.raises(WalFailed, match="no longer accepts writes"):
            await node.set("after", b"3")
        with pytest.raises(WalFailed):
            await node.delete("before")
        assert node.get("before") == (b"1", 1)
        await node.close()

    run(scenario())
    assert recover(tmp_path).store.get("before") == (b"1", 1)


@pytest.mark.parametrize("policy", ["always", "no"])
def test_refused_write_leaves_no_partial_record(tmp_path: Path, monkeypatch, policy: str) -> None:  # type: ignore[no-untyped-def]
    """A write cut short by ENOSPC is cut from the file, refused, and gone after a restart."""
    real_write = os.write

    async def scenario() -> None:
        node = open_node(tmp_path, fsync=policy)
        node.start()
        await node.set("a", b"1")

        def half_then_full(fd: int, data) -> int:  # type: ignore[no-untyped-def]
            if len(data) > 5:
                return real_write(fd, bytes(data[:5]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", half_then_full)
        with pytest.raises(WalFailed, match="disk refused a WAL write"):
            await node.set("b", b"2")
        monkeypatch.undo()
        with pytest.raises(WalFailed, match="no longer accepts writes"):
            await node.set("c", b"3")
        assert node.get("a") == (b"1", 1)
        await node.close()

    run(scenario())
    result = recover(tmp_path)
    assert result.torn_tail is None  # the partial record was cut, not left behind
    assert result.store.revision == 1
    assert result.store.get("b") is None


def test_segments_rotate_and_are_named_by_first_revision(tmp_path: Path) -> None:
    async def scenario() -> None:
        node = open_node(tmp_path, fsync="always", wal_segment_bytes=4096)
        node.start()
        for i in range(200):
            await node.set(f"key{i}", b"x" * 100)
        await node.close()

    run(scenario())
    segments = list_segments(tmp_path / "wal")
    assert len(segments) > 3
    assert segment_revision(segments[0]) == 1
    result = recover(tmp_path)
    assert result.store.revision == 200
    firsts = [segment_revision(p) for p in segments]
    assert firsts == sorted(firsts)


def test_purge_keeps_segments_still_needed(tmp_path: Path) -> None:
    """Only segments wholly covered by a revision go, and never the last one."""
    wal = tmp_path / "wal"
    wal.mkdir()
    for first in (1, 11, 21):
        (wal / f"{first:016x}.wal").write_bytes(b"")
    retention = Retention(wal, max_bytes=0)
    assert [p.name for p in retention.purge(10)] == [f"{1:016x}.wal"]
    assert retention.purge(15) == []  # segment 11.. holds 15 < x <= 20 too
    assert [p.name for p in retention.purge(1000)] == [f"{11:016x}.wal"]
    assert [p.name for p in list_segments(wal)] == [f"{21:016x}.wal"]


def test_a_retired_segment_is_fsynced_before_the_next_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No record of a newer segment may reach the disk before an older segment is
    durable, or a power loss could leave a revision gap instead of a torn tail."""
    calls: list[tuple[str, int]] = []
    real = {name: getattr(os, name) for name in ("write", "fsync", "fdatasync")}

    def spy(name: str):  # type: ignore[no-untyped-def]
        def call(fd: int, *args):  # type: ignore[no-untyped-def]
            calls.append((name, fd))
            return real[name](fd, *args)

        return call

    async def scenario() -> list[int]:
        node = open_node(tmp_path, fsync="always", wal_segment_bytes=4096)
        node.start()
        for name in real:
            monkeypatch.setattr(os, name, spy(name))
        # One group spanning a rotation: all appended before the fsync thread runs.
        await asyncio.gather(*(node.set(f"k{i}", b"x" * 200) for i in range(40)))
        monkeypatch.undo()
        await node.close()
        return [fd for op, fd in calls if op == "write"]

    written_fds = run(scenario())
    assert len(set(written_fds)) >= 2  # the group did cross segments
    for older, newer in itertools.pairwise(dict.fromkeys(written_fds)):
        first_newer_write = calls.index(("write", newer))
        assert ("fsync", older) in calls[:first_newer_write]
    assert recover(tmp_path).store.revision == 40


@pytest.mark.parametrize("policy", ["always", "everysec", "no"])
def test_rotation_and_fsyncs_stay_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """Every fsync, rotations' included, runs on the fsync thread; the log stays whole."""
    threads: set[str] = set()
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def spy(real):  # type: ignore[no-untyped-def]
        def call(fd: int) -> None:
            threads.add(threading.current_thread().name)
            real(fd)

        return call

    async def scenario() -> list[int]:
        node = open_node(tmp_path, fsync=policy, wal_segment_bytes=4096)
        node.start()
        monkeypatch.setattr(os, "fsync", spy(real_fsync))
        monkeypatch.setattr(os, "fdatasync", spy(real_fdatasync))
        revisions = [await node.set(f"k{i % 7}", b"y" * 150) for i in range(120)]
        revisions += await asyncio.gather(*(node.set(f"g{i}", b"z" * 150) for i in range(60)))
        await node.close()
        monkeypatch.undo()
        return revisions

    revisions = run(scenario())
    assert sorted(revisions) == list(range(1, 181))
    assert threads
    assert all(name.startswith("kvservice-fsync") for name in threads), threads
    assert len(list_segments(tmp_path / "wal")) > 5
    assert recover(tmp_path).store.revision == 180


def test_forced_exit_mid_flush_keeps_the_log_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forced exit (tasks cancelled, close_sync) while the fsync thread is busy
    neither interleaves writes nor leaves a gap: the next start-up succeeds and
    holds every acknowledged write."""
    real_fsync, real_fdatasync, real_write = os.fsync, os.fdatasync, os.write

    def slow(real):  # type: ignore[no-untyped-def]
        def call(fd: int, *args):  # type: ignore[no-untyped-def]
            if threading.current_thread().name.startswith("kvservice-fsync"):
                time.sleep(0.02)  # the thread is slow; whoever else writes is not
            return real(fd, *args)

        return call

    async def scenario() -> dict[str, int]:
        node = open_node(tmp_path, fsync="always", wal_segment_bytes=4096)
        node.start()
        monkeypatch.setattr(os, "fsync", slow(real_fsync))
        monkeypatch.setattr(os, "fdatasync", slow(real_fdatasync))
        monkeypatch.setattr(os, "write", slow(real_write))
        acked: dict[str, int] = {}

        async def writer(i: int) -> None:
            for j in range(1000):
                key = f"w{i}-{j}"
                acked[key] = await node.set(key, b"q" * 200)

        tasks = [asyncio.create_task(writer(i)) for i in range(16)]
        await asyncio.sleep(0.5)  # groups done, one in flight
        # More records queued behind the group in flight (appended, never acked).
        tasks += [asyncio.create_task(node.set(f"late{i}", b"l")) for i in range(8)]
        await asyncio.sleep(0)
        assert node.wal._pending
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        node.close_sync()  # what the cancelled lifespan does after a second signal
        monkeypatch.undo()
        return acked

    acked = run(scenario())
    assert len(acked) > 16
    assert len(list_segments(tmp_path / "wal")) > 1  # rotations happened meanwhile
    result = recover(tmp_path)
    assert result.torn_tail is None
    for key, revision in acked.items():
        assert result.store.get(key) == (b"q" * 200, revision)
