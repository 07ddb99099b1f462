"""A node: the write path, and reads of the recovered store.

The write path is: validate -> build the LogEntry for the next revision ->
stage it in the commit feed and hand its record to the WAL (written to the
OS now, or queued for the fsync thread at fsync=always) -> apply it in
memory -> wait until it is durable per the fsync policy -> acknowledge. The
WAL's durable watermark then releases the entry to the feed's subscribers.
No await separates the first steps, so log order, memory order, feed order
and revision order are the same.

Reads see a write as soon as it is applied, before it is durable (as in
Redis); a write is acknowledged, and leaves the node (feed, replication,
watch), only once durable.

The node is built with its parts (server.build_node): it does not know about
metrics, snapshots' mechanics or the network.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from kvservice.engine import Store
from kvservice.errors import (
    InvalidArgument,
    NotPrimary,
    ReplicationRefused,
    RevisionGap,
    ShuttingDown,
    StorageError,
    WalFailed,
)
from kvservice.feed import CommitFeed
from kvservice.snapshots import SnapshotInfo, Snapshotter
from kvservice.storage import record
from kvservice.storage.wal import Wal
from kvservice.v1.log_pb2 import LogEntry

log = logging.getLogger("kvservice.node")


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

    def __init__(
        self,
        store: Store,
        wal: Wal,
        feed: CommitFeed,
        snapshotter: Snapshotter,
        limits: Limits,
    ) -> None:
        self.store = store
        self.wal = wal
        self.feed = feed
        self.snapshotter = snapshotter
        self.limits = limits
        self.closed = False
        # Set by the first SIGTERM/SIGINT: readiness and health turn NOT_SERVING
        # at once, so load balancers stop sending while requests drain.
        self.draining = False
        # "primary", "replica" (writes only from its primary: apply_replicated) or
        # "fenced" (a former primary that met a higher epoch).
        self.role = "primary"
        self.primary_url: str | None = None
        # Readers waiting for a revision (min_revision): (revision, seq, future).
        self._revision_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_seq = itertools.count()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.wal.start()

    async def close(self) -> None:
        """Stop background work, make the WAL durable and close it (graceful shutdown)."""
        if self.closed:
            return
        self.closed = True
        await self.snapshotter.close()
        await self.wal.close()
        self.feed.close()
        log.info("node closed", extra={"revision": self.store.revision})

    def close_sync(self) -> None:
        """Last-resort close when the event loop is gone (forced exit)."""
        if self.closed:
            return
        self.closed = True
        self.snapshotter.close_sync()
        self.wal.close_sync()

    def begin_drain(self) -> None:
        """A shutdown signal arrived: report not ready while requests finish."""
        self.draining = True

    @property
    def write_failure(self) -> str | None:
        return self.wal.failure

    @property
    def durable_revision(self) -> int:
        return self.wal.durable_revision

    # -- the API ----------------------------------------------------------------

    def get(self, key: str) -> tuple[bytes, int] | None:
        self.limits.check_key(key)
        return self.store.get(key)

    async def set(self, key: str, value: bytes) -> int:
        self.limits.check_key(key)
        self.limits.check_value(value)
        return await self._commit(self.store.next_set(key, value))

    async def delete(self, key: str) -> tuple[bool, int]:
        self.limits.check_key(key)
        if key not in self.store:
            # Nothing changes, so nothing is logged (as etcd's DeleteRange).
            if self.wal.failure is not None:
                raise WalFailed(self.wal.failure)
            return False, self.store.revision
        return True, await self._commit(self.store.next_delete(key))

    async def snapshot(self) -> SnapshotInfo:
        return await self.snapshotter.snapshot()

    async def _commit(self, entry: LogEntry) -> int:
        if self.role != "primary":
            if self.role == "fenced":
                raise NotPrimary(self.primary_url, "this node was fenced by a newer primary")
            raise NotPrimary(self.primary_url)
        if self.closed:
            raise ShuttingDown("the node is shutting down")
        self._append(entry, record.encode(entry.SerializeToString()))
        self._wake_readers()
        await self.wal.sync()
        return entry.revision

    def _append(self, entry: LogEntry, data: bytes) -> None:
        """Log and apply one entry (no await: log, feed and memory order stay one)."""
        committed = self.feed.stage(entry, data)
        try:
            self.wal.append(data, entry.revision)
        except WalFailed:
            self.feed.unstage(entry.revision)
            raise
        self.store.apply(entry)
        committed.digest = self.store.digest  # before any consumer runs
        self.snapshotter.maybe_start()

    # -- replication ------------------------------------------------------------

    def apply_replicated(self, records: list[bytes]) -> int:
        """A replica's write path: append the primary's records unchanged and apply
        them. They must continue this node's log exactly (checked before anything
        is written). Returns the last revision applied; await `wal.sync()` before
        acknowledging it."""
        if self.closed:
            raise ShuttingDown("the node is shutting down")
        if self.role != "replica":
            raise ReplicationRefused(f"this node is a {self.role}; it applies no pushes")
        entries = [_decode_record(data) for data in records]
        expected = self.store.revision + 1
        for entry in entries:
            if entry.revision != expected:
                raise RevisionGap(f"expected revision {expected}, got {entry.revision}")
            expected += 1
        for entry, data in zip(entries, records, strict=True):
            self._append(entry, data)
        self._wake_readers()
        return self.store.revision

    def swap_storage(self, store: Store, wal: Wal, feed: CommitFeed, snap: Snapshotter) -> None:
        """Switch to a store installed by a full resync (the old parts are closed)."""
        self.feed.close()
        self.store, self.wal, self.feed, self.snapshotter = store, wal, feed, snap
        self._wake_readers()

    async def wait_for_revision(self, revision: int, seconds: float) -> bool:
        """Wait until this node has applied `revision`; False when `seconds` passed first."""
        if self.store.revision >= revision:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._revision_waiters
        if len(waiters) > 1024:  # drop the ones that gave up (they are done)
            self._revision_waiters = waiters = [w for w in waiters if not w[2].done()]
            heapq.heapify(waiters)
        heapq.heappush(waiters, (revision, next(self._waiter_seq), future))
        try:
            await asyncio.wait_for(asyncio.shield(future), seconds)
        except TimeoutError:
            future.cancel()  # done: pruned from the heap later, never woken
            return self.store.revision >= revision
        return True

    def _wake_readers(self) -> None:
        waiters = self._revision_waiters
        while waiters and waiters[0][0] <= self.store.revision:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(None)


def _decode_record(data: bytes) -> LogEntry:
    """The one LogEntry framed in `data` (checksums verified)."""
    try:
        [(_, payload)] = list(record.scan(data, "<replicated record>"))
        return LogEntry.FromString(payload)
    except (StorageError, DecodeError, ValueError) as exc:
        raise ReplicationRefused(f"a replicated record is damaged: {exc}") from exc
