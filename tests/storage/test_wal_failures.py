"""The WAL's failure paths: a failing close, a crashing flusher, file-set changes
off the event loop. Each of these acknowledged, hung or blocked before."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from kvservice.errors import WalFailed
from kvservice.storage.recovery import recover
from kvservice.storage.segments import list_segments, segment_revision
from tests.nodes import open_node


def test_a_write_failing_during_close_fails_the_writes_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the fsync thread while close() runs: both pending Sets are refused,
    the WAL is failed, and the data dir starts again without `wal repair`."""
    real_write = os.write
    entered, release = threading.Event(), threading.Event()

    def write(fd: int, data: bytes) -> int:
        if threading.current_thread().name.startswith("kvservice-fsync"):
            entered.set()
            release.wait(10)  # held until close() has begun
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    async def scenario() -> list[object]:
        node = open_node(tmp_path, fsync="always")
        node.start()
        assert await node.set("before", b"0") == 1
        monkeypatch.setattr(os, "write", write)
        sets = [asyncio.create_task(node.set(f"k{i}", b"v")) for i in range(2)]
        await asyncio.to_thread(entered.wait, 10)  # the group's write is in flight
        closing = asyncio.create_task(node.close())
        await asyncio.sleep(0.05)  # close() is under way
        release.set()
        results = await asyncio.gather(*sets, return_exceptions=True)
        await closing
        monkeypatch.undo()
        assert node.wal.failure is not None
        return results

    results = asyncio.run(scenario())
    assert all(isinstance(r, WalFailed) for r in results), results
    result = recover(tmp_path)  # no `wal repair` needed
    assert result.store.revision == 1
    assert result.store.get("before") == (b"0", 1)


def test_a_crashing_flusher_fails_the_wal_instead_of_hanging_writers(tmp_path: Path) -> None:
    """An exception other than OSError in the group-commit task (here: the fsync
    metrics callback) fails the log; waiting writes are refused, not left hanging."""

    async def scenario() -> None:
        node = open_node(tmp_path, fsync="always")
        node.start()
        assert await node.set("before", b"0") == 1

        def broken_metrics(seconds: float, batch: int) -> None:
            raise RuntimeError("metrics bug")

        node.wal._on_fsync = broken_metrics
        with pytest.raises(WalFailed, match="flusher stopped unexpectedly"):
            await asyncio.wait_for(node.set("during", b"1"), timeout=5)
        assert node.write_failure is not None  # /readyz reads this: 503
        with pytest.raises(WalFailed):
            await asyncio.wait_for(node.set("after", b"2"), timeout=5)
        assert node.get("before") == (b"0", 1)
        await asyncio.wait_for(node.close(), timeout=5)

    asyncio.run(scenario())


@pytest.mark.parametrize("policy", ["always", "everysec"])
def test_a_cancelled_flusher_still_closes_cleanly(tmp_path: Path, policy: str) -> None:
    """A flusher cancelled from outside (what a forced exit does) does not fail the
    log: close() still makes everything durable."""

    async def scenario() -> None:
        node = open_node(tmp_path, fsync=policy)
        node.start()
        await node.set("k", b"v")
        task = node.wal._task
        assert task is not None
        task.cancel()
        await asyncio.sleep(0.05)
        await node.close()

    asyncio.run(scenario())  # a cancelled flusher (a forced exit) does not fail the log
    assert recover(tmp_path).store.get("k") == (b"v", 1)


def test_file_set_changes_run_on_the_fsync_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshot pruning and segment purging fsync directories on the one storage
    thread, in order with rotations, never on the event loop."""
    real_fsync = os.fsync
    directory_fsyncs: list[tuple[str, str]] = []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            target = os.readlink(f"/proc/self/fd/{fd}")
            directory_fsyncs.append((os.path.basename(target), threading.current_thread().name))
        real_fsync(fd)

    async def scenario() -> None:
        node = open_node(tmp_path, wal_segment_bytes=4096, repl_backlog_bytes=4096)
        node.start()
        monkeypatch.setattr(os, "fsync", fsync)
        for round_ in range(4):
            for i in range(60):
                await node.set(f"k{i}", f"{round_}".encode() * 100)
            await node.snapshot()  # prunes snapshots beyond two, purges segments
        monkeypatch.undo()
        await node.close()

    asyncio.run(scenario())
    dirs = {name for name, _ in directory_fsyncs}
    assert {"wal", "snap"} <= dirs, directory_fsyncs  # purges and prunes did happen
    assert all(thread.startswith("kvservice-fsync") for _, thread in directory_fsyncs), (
        directory_fsyncs
    )
    assert recover(tmp_path).store.get("k59") == (b"3" * 100, 240)
    assert segment_revision(list_segments(tmp_path / "wal")[0]) > 1  # purges did happen
