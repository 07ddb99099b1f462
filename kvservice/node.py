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

import logging
from dataclasses import dataclass

from kvservice.engine import Store
from kvservice.errors import InvalidArgument, ShuttingDown, WalFailed
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
        if self.closed:
            raise ShuttingDown("the node is shutting down")
        data = record.encode(entry.SerializeToString())
        self.feed.stage(entry, data)
        try:
            self.wal.append(data, entry.revision)
        except WalFailed:
            self.feed.unstage(entry.revision)
            raise
        self.store.apply(entry)
        self.snapshotter.maybe_start()
        await self.wal.sync()
        return entry.revision
