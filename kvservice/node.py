"""A node: the store, its WAL and snapshots, and the rules for a write.

The write path is: validate -> build the LogEntry for the next revision ->
hand its record to the WAL (written to the OS now, or queued for the fsync
thread at fsync=always) -> apply it in memory -> wait until it is durable per
the fsync policy -> acknowledge. No await separates the first three steps, so
log order, memory order and revision order are the same.
Reads see a write as soon as it is applied, before it is durable (as in
Redis); a write is acknowledged only once durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvservice.config import Settings
from kvservice.engine import Store
from kvservice.errors import InvalidArgument, Unavailable
from kvservice.metrics import Metrics
from kvservice.storage.recovery import Recovery, data_dirs
from kvservice.storage.snapshot import (
    child_error,
    fork_snapshot,
    prune_snapshots,
    snapshot_name,
)
from kvservice.storage.wal import Wal, list_segments, purge_segments
from kvservice.v1.log_pb2 import LogEntry

log = logging.getLogger("kvservice.node")


@dataclass(frozen=True)
class SnapshotInfo:
    revision: int
    path: Path
    key_count: int
    seconds: float


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int
    max_value_bytes: int

    def check_key(self, key: str) -> None:
        if not key:
            raise InvalidArgument("key must not be empty")
        # A str of n characters is at most 4n UTF-8 bytes: encode only when it matters.
        if len(key) * 4 > self.max_key_bytes and len(key.encode()) > self.max_key_bytes:
            raise InvalidArgument(
                f"key is {len(key.encode())} bytes; the limit is {self.max_key_bytes}"
                " (setting max_key_bytes)"
            )

    def check_value(self, value: bytes) -> None:
        if len(value) > self.max_value_bytes:
            raise InvalidArgument(
                f"value is {len(value)} bytes; the limit is {self.max_value_bytes}"
                " (setting max_value_bytes)"
            )


class Node:
    """Serves reads and writes on top of a recovered store."""

    def __init__(self, settings: Settings, recovery: Recovery, metrics: Metrics) -> None:
        assert recovery.active_segment is not None
        self.settings = settings
        self.store: Store = recovery.store
        self.recovery = recovery
        self.metrics = metrics
        self.limits = Limits(settings.max_key_bytes, settings.max_value_bytes)
        self.wal_dir, self.snap_dir = data_dirs(settings.data_dir)
        self.wal = Wal(
            self.wal_dir,
            policy=settings.fsync,
            segment_bytes=settings.wal_segment_bytes,
            active_segment=recovery.active_segment,
            on_fsync=metrics.observe_fsync,
        )
        self._wal_bytes_at_snapshot = 0
        self._snapshot_task: asyncio.Task[SnapshotInfo | None] | None = None
        self._snapshot_pid: int | None = None
        self.last_snapshot_unix = _mtime(recovery.snapshot_path)
        self.closed = False
        # Set by the first SIGTERM/SIGINT: readiness and health turn NOT_SERVING
        # at once, so load balancers stop sending while requests drain.
        self.draining = False
        metrics.bind_node(self)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.wal.start()

    async def close(self) -> None:
        """Stop background work, fsync the WAL and close it (graceful shutdown)."""
        if self.closed:
            return
        self.closed = True
        await self._stop_snapshot()
        await self.wal.close()
        log.info("node closed", extra={"revision": self.store.revision})

    def close_sync(self) -> None:
        """Last-resort close when the event loop is gone (forced exit)."""
        if self.closed:
            return
        self.closed = True
        if self._snapshot_pid is not None:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.kill(self._snapshot_pid, 9)
                os.waitpid(self._snapshot_pid, 0)
        self.wal.close_sync()

    def begin_drain(self) -> None:
        """A shutdown signal arrived: report not ready while requests finish."""
        self.draining = True

    @property
    def write_failure(self) -> str | None:
        return self.wal.failure

    # -- the API ----------------------------------------------------------------

    def get(self, key: str) -> tuple[bytes, int] | None:
        self.limits.check_key(key)
        return self.store.get(key)

    async def set(self, key: str, value: bytes) -> int:
        self.limits.check_key(key)
        self.limits.check_value(value)
        entry = self.store.next_set(key, value)
        return await self._commit(entry)

    async def delete(self, key: str) -> tuple[bool, int]:
        self.limits.check_key(key)
        if key not in self.store:
            # Nothing changes, so nothing is logged (as etcd's DeleteRange).
            if self.wal.failure is not None:
                raise Unavailable(self.wal.failure)
            return False, self.store.revision
        entry = self.store.next_delete(key)
        return True, await self._commit(entry)

    async def _commit(self, entry: LogEntry) -> int:
        if self.closed:
            raise Unavailable("the node is shutting down")
        self.wal.append(entry.SerializeToString(), entry.revision)
        self.store.apply(entry)
        self._maybe_snapshot()
        await self.wal.sync()
        return entry.revision

    # -- snapshots ----------------------------------------------------------------

    def _maybe_snapshot(self) -> None:
        grown = self.wal.stats.bytes_written - self._wal_bytes_at_snapshot
        if grown >= self.settings.snapshot_threshold_bytes and self._snapshot_task is None:
            self._snapshot_task = asyncio.create_task(self._snapshot(), name="snapshot")

    async def snapshot(self) -> SnapshotInfo | None:
        """Take a snapshot now (or join the one running); None when it failed (logged)."""
        if self.wal.failure is not None:
            # Memory may hold writes the failed WAL never made durable (they were
            # answered `unavailable`); a snapshot would make them durable after all.
            raise Unavailable(self.wal.failure)
        if self._snapshot_task is None:
            self._snapshot_task = asyncio.create_task(self._snapshot(), name="snapshot")
        return await asyncio.shield(self._snapshot_task)

    async def _snapshot(self) -> SnapshotInfo | None:
        revision = self.store.revision
        key_count = len(self.store)
        self._wal_bytes_at_snapshot = self.wal.stats.bytes_written
        started = time.monotonic()
        try:
            self._snapshot_pid, errors = fork_snapshot(self.snap_dir, self.store.data, revision)
            _, status = await asyncio.get_running_loop().run_in_executor(
                None, os.waitpid, self._snapshot_pid, 0
            )
            self._snapshot_pid = None
            reason = child_error(errors)
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                raise OSError(f"snapshot child failed: {reason or f'wait status {status}'}")
            oldest_kept = prune_snapshots(self.snap_dir)
            purge_segments(self.wal_dir, oldest_kept)
        except OSError as exc:
            self.metrics.snapshot_failures.inc()
            log.error("snapshot failed", extra={"revision": revision, "error": str(exc)})
            return None
        finally:
            self._snapshot_task = None
        seconds = time.monotonic() - started
        self.last_snapshot_unix = time.time()
        self.metrics.snapshot_seconds.observe(seconds)
        log.info("snapshot written", extra={"revision": revision, "seconds": round(seconds, 3)})
        return SnapshotInfo(revision, self.snap_dir / snapshot_name(revision), key_count, seconds)

    async def _stop_snapshot(self) -> None:
        task = self._snapshot_task
        if task is None:
            return
        # Let a running snapshot finish: it is bounded and makes the next start faster.
        with contextlib.suppress(Exception):
            await task

    def wal_segments(self) -> int:
        return len(list_segments(self.wal_dir))


def _mtime(path: Path | None) -> float | None:
    if path is None:
        return None
    try:
        return path.stat().st_mtime
    except OSError:
        return None
