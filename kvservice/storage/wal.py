"""Write-ahead log: segment files, the fsync policies and group commit.

Segments live in `<data-dir>/wal/` and are named `%016x.wal` after the
revision of their first record. Each holds back-to-back records (see
record.py) whose payload is a `LogEntry`; revisions are consecutive across
all segments. The active (last) segment is appended to until it passes
`segment_bytes`; then, on the fsync thread, it is fsynced and a new one is
created tmp -> fsync -> rename -> fsync dir. No fsync runs on the event loop.

Durability per policy, before a write is acknowledged:
- `always`: the record is written and fsynced. Group commit: the fsync thread
  writes every record queued when it starts and fsyncs them together; writes
  arriving meanwhile wait for the next round.
- `everysec`: the record is written to the OS; a timer fsyncs once a second.
- `no`: the record is written to the OS, which flushes when it likes.
(During a rotation, writes at `everysec` and `no` wait until the new segment
exists, typically a few milliseconds.)

The durable watermark (`durable_revision`) is the highest revision whose
record is durable per the policy: fsynced at `always`, written to the OS at
`everysec` and `no`. It only moves forward, in revision order, and each move
is reported through `on_durable` (the commit feed listens).

A failed write or fsync is never retried: after an fsync error the kernel
may have dropped the dirty pages, so a later "successful" fsync proves
nothing. The log enters a failed state and refuses every later append
(fail-stop); reads of the in-memory state carry on. The same happens when
the background flusher stops for any other reason (a bug): it is
supervised, and every waiting write is then refused rather than left hanging.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from kvservice.errors import WalFailed
from kvservice.storage.files import write_all
from kvservice.storage.segments import create_segment

FsyncPolicy = Literal["always", "everysec", "no"]
log = logging.getLogger("kvservice.wal")
T = TypeVar("T")


@dataclass
class WalStats:
    """Counters read by metrics and the snapshot trigger."""

    bytes_written: int = 0
    fsyncs: int = 0
    last_batch_size: int = 0


class _Rotate(NamedTuple):
    """A mark in the queue of pending records: start a new segment here."""

    first_revision: int


class Wal:
    """Appends records to the active segment and makes them durable per policy.

    Everything that changes which files exist runs on the one fsync thread, in
    order with the writes and fsyncs: a rotation fsyncs the old segment, then
    creates the new one (tmp -> fsync -> rename -> fsync dir), so the disk never
    holds a newer segment's records, or even its empty file, while an older
    segment's records are still in flight. Snapshot pruning and segment
    purging run there too (`run_on_thread`).
    """

    def __init__(
        self,
        wal_dir: Path,
        *,
        policy: FsyncPolicy,
        segment_bytes: int,
        active_segment: Path,
        last_revision: int = 0,
        on_fsync: Callable[[float, int], None] | None = None,
        on_durable: Callable[[int], None] | None = None,
    ) -> None:
        self.dir = wal_dir
        self.policy = policy
        self.segment_bytes = segment_bytes
        self.stats = WalStats()
        self.failure: str | None = None
        # Everything recovered is on disk already: durable as far as this policy goes.
        self.durable_revision = last_revision
        self._appended_revision = last_revision
        self._on_fsync = on_fsync
        self._on_durable = on_durable
        self._active_path = active_segment
        # At fsync=always only the fsync thread touches _fd; at the other policies
        # the loop writes to it, except while a rotation (on the thread) runs.
        self._fd = os.open(active_segment, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size  # of the segment being appended to
        # Records (and rotation marks) for the fsync thread to write: all of them
        # at fsync=always, and at the other policies those appended mid-rotation.
        self._pending: list[bytes | _Rotate] = []
        self._rotation: asyncio.Future[None] | None = None  # everysec/no
        self._rotation_job: concurrent.futures.Future[None] | None = None
        # An error raised on the fsync thread, kept for close_sync().
        self._thread_error: OSError | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._dirty = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvservice-fsync")
        self._task: asyncio.Task[None] | None = None

    @property
    def active_segment(self) -> Path:
        return self._active_path

    @property
    def appended_revision(self) -> int:
        """Revision of the last record appended (durable or not)."""
        return self._appended_revision

    def start(self) -> None:
        """Start the background flusher (group commit or the once-a-second timer)."""
        if self.policy == "always":
            self._task = asyncio.create_task(self._group_commit_loop(), name="wal-group-commit")
        elif self.policy == "everysec":
            self._task = asyncio.create_task(self._everysec_loop(), name="wal-everysec")
        if self._task is not None:
            self._task.add_done_callback(self._flusher_done)

    def append(self, data: bytes, revision: int) -> None:
        """Add one encoded record (record.encode) to the log. Raises WalFailed once
        the log has failed.

        At fsync=always the record is queued for the fsync thread, which writes
        the whole group and fsyncs it in one go: the event loop makes no write
        syscall (an append contends with a concurrent fdatasync on the same
        file: ~9 µs instead of ~1 µs measured here). Otherwise it is written to
        the OS now, since that write is what those policies acknowledge.
        """
        if self.failure is not None:
            raise WalFailed(self.failure)
        if self._closing:
            raise WalFailed("the WAL is closed")
        # (One rotation at a time: records appended meanwhile join the new segment.)
        if self._size >= self.segment_bytes and self._rotation is None:
            self._size = 0
            if self.policy == "always":
                self._pending.append(_Rotate(revision))
            else:
                self._start_rotation(revision)
        self._appended_revision = revision
        if self.policy == "always" or self._rotation is not None:
            self._pending.append(data)
        else:
            try:
                # The segment's size is known here: no fstat on the hot path.
                _write_group(self._fd, [data], start=self._size)
            except OSError as exc:
                self._fail(_describe(exc))
                raise WalFailed(self.failure) from exc
            self._advance(revision)
        self._size += len(data)
        self.stats.bytes_written += len(data)
        self._dirty = True

    async def sync(self) -> None:
        """Return once every record appended so far is durable per the policy."""
        if self._rotation is not None:
            # Appended mid-rotation: written once the new segment exists.
            await asyncio.shield(self._rotation)
        if self.failure is not None:
            raise WalFailed(self.failure)
        if self.policy != "always":
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._wake.set()
        await future

    async def run_on_thread(self, work: Callable[[], T]) -> T:
        """Run a change to the file set (snapshot pruning, segment purging) on the
        fsync thread, in order with rotations, writes and fsyncs."""
        return await asyncio.wrap_future(self._executor.submit(work))

    async def close(self) -> None:
        """Make everything appended durable, stop the flusher and close the files.

        The flusher is not cancelled: it is told to stop and finishes the group
        in flight first, so a write or fsync that fails during shutdown fails
        the writes it covered (and the log) instead of being lost unseen.
        """
        self._closing = True
        self._wake.set()
        if self._task is not None:
            # (wait, not await: how the flusher ended is _flusher_done's business.)
            await asyncio.wait([self._task])
            self._task = None
        if self._rotation is not None:
            await asyncio.shield(self._rotation)
        if self.failure is None and (self._pending or self._dirty):
            try:
                await self._flush()
            except OSError as exc:
                self._fail(_describe(exc, "at shutdown"))
            except Exception as exc:
                self._fail(f"the final WAL flush failed ({exc!r})")
        self._settle_waiters()
        self._close_files()
        self._executor.shutdown(wait=True)

    def close_sync(self) -> None:
        """Close without a running event loop (forced exit, tools, tests).

        First let the fsync thread finish whatever it is running, so nothing it
        writes can land after (or interleave with) what is written here; then
        write what is still queued, fsync, and close. Nothing is written after
        an error, so the log never holds a record beyond a gap.
        """
        self._executor.shutdown(wait=True)
        if self._rotation_job is not None:  # its completion never ran on the loop
            self._rotation = None
            if self._rotation_job.exception() is None:
                self._drain_after_rotation()
        if self.failure is None and self._thread_error is None:
            try:
                if self.policy == "always":
                    self._write_and_sync(self._take_pending())
                else:
                    os.fdatasync(self._fd)
            except OSError as exc:
                self._fail(_describe(exc, "at shutdown"))
        self._close_files()

    # -- internals: the loop side ------------------------------------------

    def _advance(self, revision: int) -> None:
        """Move the durable watermark forward (never back) and tell the listener."""
        if revision <= self.durable_revision:
            return
        self.durable_revision = revision
        if self._on_durable is not None:
            self._on_durable(revision)

    def _start_rotation(self, first_revision: int) -> None:
        """everysec/no: rotate on the fsync thread; appends queue until it is done."""
        loop = asyncio.get_running_loop()
        self._rotation = loop.create_future()
        self._rotation_job = self._executor.submit(
            self._on_thread, self._next_segment, first_revision
        )
        asyncio.wrap_future(self._rotation_job).add_done_callback(self._finish_rotation)

    def _finish_rotation(self, job: asyncio.Future[None]) -> None:
        rotation, self._rotation, self._rotation_job = self._rotation, None, None
        error = job.exception()
        if isinstance(error, OSError):
            self._fail(_describe(error))
        elif error is not None:
            self._fail(f"WAL rotation failed ({error!r})")
        elif self._drain_after_rotation():
            self._advance(self._appended_revision)
        if rotation is not None and not rotation.done():
            rotation.set_result(None)  # waiters read self.failure

    def _drain_after_rotation(self) -> bool:
        """Write what was appended during the rotation to the new segment."""
        pending = [item for item in self._take_pending() if isinstance(item, bytes)]
        try:
            _write_group(self._fd, pending)
        except OSError as exc:
            self._fail(_describe(exc))
            return False
        return True

    def _take_pending(self) -> list[bytes | _Rotate]:
        pending, self._pending = self._pending, []
        return pending

    async def _flush(self) -> None:
        """Write (at always) and fsync what is pending; advance the watermark."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._dirty = False
        covered = self._appended_revision
        if self.policy == "always":
            # Taken on the loop thread: records appended during this flush go to the next.
            pending = self._take_pending()
            job = self._executor.submit(self._on_thread, self._write_and_sync, pending)
        else:
            pending = []
            job = self._executor.submit(self._on_thread, os.fdatasync, self._fd)
        try:
            await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # Cancelled from outside (a forced exit tears the loop down). If the
            # fsync thread never picked the job up, it never runs: hand its records
            # back so close_sync() writes them, in order, with no gap.
            if job.cancelled():
                self._pending[:0] = pending
            raise
        self.stats.fsyncs += 1
        if self.policy == "always":
            self._advance(covered)
        if self._on_fsync is not None:
            self._on_fsync(loop.time() - started, self.stats.last_batch_size)

    async def _group_commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._waiters or (self._closing and self._pending):
                # Every waiter taken here appended before this flush starts, so one
                # write + fsync covers them all; later arrivals wait for the next one.
                batch, self._waiters = self._waiters, []
                self.stats.last_batch_size = len(batch)
                try:
                    await self._flush()
                except BaseException:
                    # The group's records may not be durable: none of its writes is
                    # acknowledged. (_flusher_done fails the log for non-OSErrors.)
                    self._waiters[:0] = batch
                    raise
                for future in batch:
                    if not future.done():
                        future.set_result(None)
                if self._waiters:
                    self._wake.set()
            if self._closing and not self._waiters and not self._pending:
                return

    async def _everysec_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            if not self._dirty or self._rotation is not None:
                continue  # a rotation fsyncs the old segment itself
            self.stats.last_batch_size = 0
            await self._flush()

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        """Supervision: a flusher that ends with an error, or ends at all before
        close(), fails the log and refuses every write waiting on it."""
        if task.cancelled():
            # Only a forced exit cancels it; close_sync() still writes what is
            # queued, so the log is not failed, but nobody may wait forever.
            for future in self._waiters:
                if not future.done():
                    future.set_exception(WalFailed("the WAL flusher was cancelled"))
            self._waiters = []
            return
        if (error := task.exception()) is not None:
            if isinstance(error, OSError):
                self._fail(_describe(error))
            else:
                log.error("wal flusher crashed", exc_info=error)
                self._fail(f"the WAL flusher stopped unexpectedly ({error!r})")
        elif not self._closing:
            self._fail("the WAL flusher stopped unexpectedly")
        if self.failure is not None:
            self._settle_waiters()

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = f"{reason}; this node no longer accepts writes (see docs/runbook.md)"
            log.critical("wal failed: node is now read-only", extra={"reason": reason})

    def _settle_waiters(self) -> None:
        """Wake every waiter: success if all is durable, else the failure."""
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if future.done():
                continue
            if self.failure is None:
                future.set_result(None)
            else:
                future.set_exception(WalFailed(self.failure))

    def _close_files(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # -- internals: the fsync thread ---------------------------------------

    def _on_thread(self, work: Callable[..., None], *args: Any) -> None:
        """Run `work` on the fsync thread, remembering an error for close_sync()."""
        try:
            work(*args)
        except OSError as exc:
            self._thread_error = exc
            raise

    def _write_and_sync(self, pending: list[bytes | _Rotate]) -> None:
        """fsync=always: write the queued records in order, starting new segments
        where marked, then fdatasync the segment written last."""
        group: list[bytes] = []
        for item in pending:
            if isinstance(item, _Rotate):
                _write_group(self._fd, group)
                group = []
                self._next_segment(item.first_revision)
            else:
                group.append(item)
        _write_group(self._fd, group)
        os.fdatasync(self._fd)

    def _next_segment(self, first_revision: int) -> None:
        """Make the current segment durable, then create and switch to the next."""
        try:
            os.fsync(self._fd)
            path = create_segment(self.dir, first_revision)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise RotationFailed(exc.errno, exc.strerror) from exc
        os.close(self._fd)
        self._fd, self._active_path = fd, path
        log.info("wal segment rotated", extra={"segment": path.name})


class WriteRefused(OSError):
    """A write of queued records failed (as opposed to the fsync after it)."""


class RotationFailed(OSError):
    """The old segment could not be made durable or the new one created."""


def _describe(exc: OSError, when: str = "") -> str:
    if isinstance(exc, WriteRefused):
        what = "the disk refused a WAL write"
    elif isinstance(exc, RotationFailed):
        what = "could not rotate the WAL segment"
    else:
        what = "fsync of the WAL failed"
    return f"{what}{' ' + when if when else ''} ({exc})"


def _write_group(fd: int, records: list[bytes], start: int | None = None) -> None:
    """Write records in one call; on failure cut whatever part reached the file.

    `start` is the file's size before the write, when the caller knows it.
    """
    if not records:
        return
    if start is None:
        start = os.fstat(fd).st_size
    try:
        write_all(fd, b"".join(records))
    except OSError as exc:
        # No torn record is left behind for a later write (there is none:
        # fail-stop) or for the next start-up.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise WriteRefused(exc.errno, exc.strerror) from exc
