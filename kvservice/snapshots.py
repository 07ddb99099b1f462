"""When and how snapshots are taken, pruned, and the WAL behind them purged.

A snapshot is written by a separate process (storage/compact.py) that reads
the newest snapshot and the WAL up to the durable watermark from disk and
writes the next snapshot. The server never forks itself: a fork of a
threaded interpreter is deprecated from Python 3.12 and can deadlock on a
lock another thread held; and the helper needs no copy of the server's
memory. It costs the helper one load of the data set (its RSS is about the
server's) and runs on the other core while the node keeps serving.

After a snapshot, on the WAL's fsync thread (in order with rotations):
snapshots beyond the newest two are deleted, then WAL segments that the
oldest kept snapshot covers and no retention holder needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvservice.errors import SnapshotFailed, WalFailed
from kvservice.storage.retention import Retention
from kvservice.storage.segments import data_dirs
from kvservice.storage.snapshot import prune_snapshots
from kvservice.storage.wal import Wal

log = logging.getLogger("kvservice.snapshots")


@dataclass(frozen=True)
class SnapshotInfo:
    revision: int
    path: Path
    key_count: int
    seconds: float


class Snapshotter:
    """Starts snapshot writer processes, one at a time, and cleans up after them."""

    def __init__(
        self,
        data_dir: Path,
        wal: Wal,
        retention: Retention,
        *,
        threshold_bytes: int,
        last_snapshot_unix: float | None = None,
        on_written: Callable[[float], None] = lambda seconds: None,
        on_failed: Callable[[], None] = lambda: None,
    ) -> None:
        self.data_dir = data_dir
        self.snap_dir = data_dirs(data_dir)[1]
        self.wal = wal
        self.retention = retention
        self.threshold_bytes = threshold_bytes
        self.last_snapshot_unix = last_snapshot_unix
        self._on_written = on_written
        self._on_failed = on_failed
        self._wal_bytes_at_snapshot = 0
        self._task: asyncio.Task[SnapshotInfo] | None = None
        # The writer process while one runs; None in every other state.
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def maybe_start(self) -> None:
        """After a write: start a snapshot once the WAL grew past the threshold."""
        grown = self.wal.stats.bytes_written - self._wal_bytes_at_snapshot
        if grown >= self.threshold_bytes and self._task is None:
            self._start()

    async def snapshot(self) -> SnapshotInfo:
        """Take a snapshot now (or join the one running); SnapshotFailed says why not."""
        if self.wal.failure is not None:
            # Memory may hold writes the failed WAL never made durable (they were
            # answered `unavailable`); a snapshot must never make them durable.
            raise WalFailed(self.wal.failure)
        task = self._task or self._start()
        return await asyncio.shield(task)

    def _start(self) -> asyncio.Task[SnapshotInfo]:
        task = asyncio.create_task(self._run(), name="snapshot")
        # A background snapshot's failure is logged and counted in _run.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._task = task
        return task

    async def _run(self) -> SnapshotInfo:
        # Everything up to the watermark is on disk for the writer to read.
        revision = self.wal.durable_revision
        self._wal_bytes_at_snapshot = self.wal.stats.bytes_written
        started = time.monotonic()
        try:
            revision, keys, path = await self._write(revision)
            oldest_kept = await self.wal.run_on_thread(lambda: prune_snapshots(self.snap_dir))
            purged = await self.wal.run_on_thread(lambda: self.retention.purge(oldest_kept))
        except (OSError, SnapshotFailed) as exc:
            self._on_failed()
            log.error("snapshot failed", extra={"revision": revision, "error": str(exc)})
            raise SnapshotFailed(f"snapshot at revision {revision} failed: {exc}") from None
        finally:
            self._task = None
        seconds = time.monotonic() - started
        self.last_snapshot_unix = time.time()
        self._on_written(seconds)
        # Writes may have passed the threshold again while this one ran.
        self.maybe_start()
        log.info(
            "snapshot written",
            extra={"revision": revision, "keys": keys, "seconds": round(seconds, 3),
                   "segments_purged": len(purged)},
        )  # fmt: skip
        return SnapshotInfo(revision, path, keys, seconds)

    async def _write(self, revision: int) -> tuple[int, int, Path]:
        """Run the writer process; return (revision, keys, path) from its report."""
        command = [sys.executable, "-m", "kvservice.storage.compact",
                   str(self.data_dir), str(revision)]  # fmt: skip
        # Popen (vfork + exec in C) returns in microseconds; the wait runs in a thread.
        proc = subprocess.Popen(  # noqa: ASYNC220
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._proc = proc
        try:
            out, err = await asyncio.to_thread(proc.communicate)
        finally:
            self._proc = None
        if proc.returncode != 0:
            reason = err.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
            raise SnapshotFailed(f"the snapshot writer failed: {reason}")
        written, keys, path = out.decode().split(" ", 2)
        return int(written), int(keys), Path(path.strip())

    async def close(self) -> None:
        """Let a running snapshot finish: it is bounded and makes the next start faster."""
        task = self._task
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    def close_sync(self) -> None:
        """Forced exit: stop a running writer (its .tmp file is removed at the next start)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
