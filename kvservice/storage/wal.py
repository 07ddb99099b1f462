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

A failed write or fsync is never retried: after an fsync error the kernel
may have dropped the dirty pages, so a later "successful" fsync proves
nothing. The log enters a failed state and refuses every later append
(fail-stop); reads of the in-memory state carry on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from kvservice.errors import Unavailable
from kvservice.storage import record
from kvservice.storage.files import fsync_dir

FsyncPolicy = Literal["always", "everysec", "no"]
SEGMENT_SUFFIX = ".wal"
log = logging.getLogger("kvservice.wal")


def segment_name(first_revision: int) -> str:
    return f"{first_revision:016x}{SEGMENT_SUFFIX}"


def segment_revision(path: Path) -> int:
    """First revision named by a segment file (ValueError for foreign names)."""
    return int(path.name.removesuffix(SEGMENT_SUFFIX), 16)


def list_segments(wal_dir: Path) -> list[Path]:
    """Segments in revision order; files with other names are ignored."""
    found = []
    for path in wal_dir.glob(f"*{SEGMENT_SUFFIX}"):
        with contextlib.suppress(ValueError):
            found.append((segment_revision(path), path))
    return [path for _, path in sorted(found)]


def create_segment(wal_dir: Path, first_revision: int) -> Path:
    """Create an empty segment durably (tmp -> fsync -> rename -> fsync dir)."""
    path = wal_dir / segment_name(first_revision)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(wal_dir)
    return path


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
    segment's records are still in flight.
    """

    def __init__(
        self,
        wal_dir: Path,
        *,
        policy: FsyncPolicy,
        segment_bytes: int,
        active_segment: Path,
        on_fsync: Callable[[float, int], None] | None = None,
    ) -> None:
        self.dir = wal_dir
        self.policy = policy
        self.segment_bytes = segment_bytes
        self.stats = WalStats()
        self.failure: str | None = None
        self._on_fsync = on_fsync
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
        # The group being fsynced right now (kept so close() can settle it).
        self._batch: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._dirty = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvservice-fsync")
        self._task: asyncio.Task[None] | None = None

    @property
    def active_segment(self) -> Path:
        return self._active_path

    def start(self) -> None:
        """Start the background flusher (group commit or the once-a-second timer)."""
        if self.policy == "always":
            self._task = asyncio.create_task(self._group_commit_loop(), name="wal-group-commit")
        elif self.policy == "everysec":
            self._task = asyncio.create_task(self._everysec_loop(), name="wal-everysec")

    def append(self, payload: bytes, revision: int) -> None:
        """Add one record to the log. Raises Unavailable once the log has failed.

        At fsync=always the record is queued for the fsync thread, which writes
        the whole group and fsyncs it in one go: the event loop makes no write
        syscall (an append contends with a concurrent fdatasync on the same
        file: ~9 µs instead of ~1 µs measured here). Otherwise it is written to
        the OS now, since that write is what those policies acknowledge.
        """
        if self.failure is not None:
            raise Unavailable(self.failure)
        data = record.encode(payload)
        # (One rotation at a time: records appended meanwhile join the new segment.)
        if self._size >= self.segment_bytes and self._rotation is None:
            self._size = 0
            if self.policy == "always":
                self._pending.append(_Rotate(revision))
            else:
                self._start_rotation(revision)
        if self.policy == "always" or self._rotation is not None:
            self._pending.append(data)
        else:
            try:
                # The segment's size is known here: no fstat on the hot path.
                _write_group(self._fd, [data], start=self._size)
            except OSError as exc:
                self._fail(_describe(exc))
                raise Unavailable(self.failure) from exc
        self._size += len(data)
        self.stats.bytes_written += len(data)
        self._dirty = True

    async def sync(self) -> None:
        """Return once every record appended so far is durable per the policy."""
        if self._rotation is not None:
            # Appended mid-rotation: written once the new segment exists.
            await asyncio.shield(self._rotation)
        if self.failure is not None:
            raise Unavailable(self.failure)
        if self.policy != "always":
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._wake.set()
        await future

    async def close(self) -> None:
        """Flush and fsync everything, stop the flusher and close the files."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._rotation is not None:
            await asyncio.shield(self._rotation)
        if self.failure is None:
            try:
                await self._flush()
            except OSError as exc:
                self._fail(_describe(exc, "at shutdown"))
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
        else:
            self._drain_after_rotation()
        if rotation is not None and not rotation.done():
            rotation.set_result(None)  # waiters read self.failure

    def _drain_after_rotation(self) -> None:
        """Write what was appended during the rotation to the new segment."""
        pending = [item for item in self._take_pending() if isinstance(item, bytes)]
        try:
            _write_group(self._fd, pending)
        except OSError as exc:
            self._fail(_describe(exc))

    def _take_pending(self) -> list[bytes | _Rotate]:
        pending, self._pending = self._pending, []
        return pending

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._dirty = False
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
            # close() cancels the flusher. If that happened before the fsync thread
            # picked the job up, the job never runs: hand its records back so the
            # final flush writes them. (A job already running finishes; the final
            # flush queues behind it on the single fsync thread.)
            if job.cancelled():
                self._pending[:0] = pending
            raise
        elapsed = loop.time() - started
        self.stats.fsyncs += 1
        if self._on_fsync is not None:
            self._on_fsync(elapsed, self.stats.last_batch_size)

    async def _group_commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._waiters:
                continue
            # Every waiter taken here appended before this flush starts, so one
            # write + fsync covers them all; later arrivals wait for the next one.
            self._batch, self._waiters = self._waiters, []
            self.stats.last_batch_size = len(self._batch)
            try:
                await self._flush()
            except OSError as exc:
                self._fail(_describe(exc))
                self._settle_waiters()
                return
            batch, self._batch = self._batch, []
            for future in batch:
                if not future.done():
                    future.set_result(None)

    async def _everysec_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if not self._dirty or self._rotation is not None:
                continue  # a rotation fsyncs the old segment itself
            self.stats.last_batch_size = 0
            try:
                await self._flush()
            except OSError as exc:
                self._fail(_describe(exc))
                return

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = f"{reason}; this node no longer accepts writes (see docs/runbook.md)"
            log.critical("wal failed: node is now read-only", extra={"reason": reason})

    def _settle_waiters(self) -> None:
        """Wake every waiter: success if all is fsynced, else the failure."""
        waiters = self._batch + self._waiters
        self._batch, self._waiters = [], []
        for future in waiters:
            if future.done():
                continue
            if self.failure is None:
                future.set_result(None)
            else:
                future.set_exception(Unavailable(self.failure))

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
        _write_all(fd, b"".join(records))
    except OSError as exc:
        # No torn record is left behind for a later write (there is none:
        # fail-stop) or for the next start-up.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise WriteRefused(exc.errno, exc.strerror) from exc


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def purge_segments(wal_dir: Path, covered_revision: int) -> list[Path]:
    """Delete segments whose records are all <= covered_revision; never the last one.

    A segment is wholly covered when the next segment starts at or before
    covered_revision + 1.
    """
    segments = list_segments(wal_dir)
    removed = []
    for current, following in itertools.pairwise(segments):
        if segment_revision(following) > covered_revision + 1:
            break
        current.unlink()
        removed.append(current)
    if removed:
        fsync_dir(wal_dir)
    return removed
