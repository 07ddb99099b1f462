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
import contextlib
import heapq
import itertools
import logging
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from kvservice import ops
from kvservice.engine import BATCH, SLOT_MS, Item, Store
from kvservice.errors import (
    NotPrimary,
    ReplicationRefused,
    RevisionGap,
    ShuttingDown,
    StorageError,
    WalFailed,
)
from kvservice.feed import CommitFeed
from kvservice.ops import Limits
from kvservice.snapshots import SnapshotInfo, Snapshotter
from kvservice.storage import record
from kvservice.storage.wal import Wal
from kvservice.v1.kv_pb2 import Condition, Op, OpResult
from kvservice.v1.log_pb2 import LogEntry

log = logging.getLogger("kvservice.node")


@dataclass(frozen=True)
class ExpirySettings:
    cycle_ms: int = 100
    keys_per_cycle: int = 1000


class Node:
    """Serves reads and writes on top of a recovered store."""

    def __init__(
        self,
        store: Store,
        wal: Wal,
        feed: CommitFeed,
        snapshotter: Snapshotter,
        limits: Limits,
        *,
        expiry: ExpirySettings | None = None,
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
        self.expiry = expiry or ExpirySettings()
        self._expiry_task: asyncio.Task[None] | None = None
        self.expired_total = 0
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.wal.start()
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_forever())

    async def close(self) -> None:
        """Stop background work, make the WAL durable and close it (graceful shutdown)."""
        if self.closed:
            return
        self.closed = True
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
        await self.snapshotter.close()
        await self.wal.close()
        self.feed.close()
        log.info("node closed", extra={"revision": self.store.revision})

    def close_sync(self) -> None:
        """Last-resort close when the event loop is gone (forced exit)."""
        if self.closed:
            return
        self.closed = True
        if self._expiry_task is not None:
            self._expiry_task.cancel()
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

    def item(self, key: str) -> Item | None:
        """The live key (hidden once its expiry has passed, on every node)."""
        self.limits.check_key(key)
        return self.store.item(key)

    def mget(self, keys: list[str]) -> tuple[int, list[Item | None]]:
        """Many keys read in one step, so all at one revision."""
        self.limits.check_batch(len(keys), "keys")
        for key in keys:
            self.limits.check_key(key)
        return self.store.revision, [self.store.item(key) for key in keys]

    async def set(
        self, key: str, value: bytes, ttl_ms: int = 0, if_revision: int | None = None
    ) -> int:
        self.limits.check_key(key)
        self.limits.check_value(value)
        ops.check_ttl(ttl_ms)  # before any state is read
        self._check_writable()
        now = self.store.clock()
        self._expire_due(key, now)
        ops.check_revision(self.store, key, if_revision)
        expires = ops.expires_at(now, ttl_ms)
        return await self._commit(ops.set_entry(key, value, expires, self.limits))

    async def delete(self, key: str, if_revision: int | None = None) -> tuple[bool, int]:
        self.limits.check_key(key)
        self._check_writable()
        expired = self._expire_due(key, self.store.clock())
        ops.check_revision(self.store, key, if_revision)
        if self.store.item(key) is None:
            # Nothing changes, so nothing more is logged (as etcd's DeleteRange).
            if expired:
                await self.wal.sync()
            elif self.wal.failure is not None:
                raise WalFailed(self.wal.failure)
            return False, self.store.revision
        return True, await self._commit(ops.delete_entry(key))

    async def touch(self, key: str, ttl_ms: int, if_revision: int | None = None) -> tuple[int, int]:
        """Set or clear a key's expiry: (revision, expires_at_ms)."""
        self.limits.check_key(key)
        ops.check_ttl(ttl_ms)
        self._check_writable()
        now = self.store.clock()
        self._expire_due(key, now)
        ops.check_revision(self.store, key, if_revision)
        entry = ops.touch_entry(self.store, key, ttl_ms, now)
        return await self._commit(entry), entry.expires_at_ms

    async def increment(self, key: str, delta: int, ttl_ms: int = 0) -> tuple[int, int]:
        """Add to a decimal counter: (new value, revision)."""
        self.limits.check_key(key)
        ops.check_ttl(ttl_ms)
        self._check_writable()
        now = self.store.clock()
        self._expire_due(key, now)
        entry, value = ops.increment_entry(
            self.store, key, delta, ttl_ms, now_ms=now, limits=self.limits
        )
        return value, await self._commit(entry)

    async def txn(
        self, conditions: list[Condition], success: list[Op], failure: list[Op]
    ) -> tuple[bool, int, list[OpResult]]:
        """Check conditions and apply one branch under one revision, as one record."""
        ops.validate_txn(conditions, success, failure, self.limits)
        self._check_writable()
        now = self.store.clock()
        keys = {c.key for c in conditions}
        for op in (*success, *failure):
            keys.add(getattr(op, str(op.WhichOneof("op"))).key)
        expired = sum(self._expire_due(key, now) for key in sorted(keys))
        plan = ops.plan_txn(
            self.store, conditions, success, failure, now_ms=now, limits=self.limits
        )
        if plan.entries:
            batch = LogEntry(operation=BATCH, entries=plan.entries)
            revision = await self._commit(batch)
        else:
            if expired:
                await self.wal.sync()
            elif self.wal.failure is not None:
                raise WalFailed(self.wal.failure)
            revision = self.store.revision
        ops.stamp_results(plan.results, revision)
        return plan.succeeded, revision, plan.results

    async def snapshot(self) -> SnapshotInfo:
        return await self.snapshotter.snapshot()

    def _check_writable(self) -> None:
        if self.role != "primary":
            if self.role == "fenced":
                raise NotPrimary(self.primary_url, "this node was fenced by a newer primary")
            raise NotPrimary(self.primary_url)
        if self.closed:
            raise ShuttingDown("the node is shutting down")

    async def _commit(self, entry: LogEntry) -> int:
        """Log and apply one entry of a client write and wait until it is durable.
        (Callers checked `_check_writable()` with no await since.)"""
        self._log(entry)
        self._wake_readers()
        await self.wal.sync()
        return entry.revision

    def _log(self, entry: LogEntry) -> None:
        """Number an entry with the next revision, then log and apply it."""
        entry.revision = self.store.revision + 1
        self._append(entry, record.encode(entry.SerializeToString()))

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

    # -- expiry -----------------------------------------------------------------

    def _expire_due(self, key: str, now_ms: int) -> bool:
        """Before a write reads `key`: if its expiry has passed, commit its removal
        first (a DELETE marked expired), so watchers and replicas see the expiry
        before what follows. Returns whether it did; the caller's sync covers it."""
        if not self.store.is_expired(key, now_ms):
            return False
        self._log(ops.delete_entry(key, expired=True))
        self.expired_total += 1
        self._sync_soon()  # durable even if the write that found it then fails
        return True

    def _sync_soon(self) -> None:
        """Make entries that no client waits for (expiry removals) durable, without
        waiting here: group commit only flushes for a waiter."""
        task = asyncio.get_running_loop().create_task(self.wal.sync())
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # a failed WAL is reported by the write path and readiness

    def expire_cycle(self, limit: int) -> int:
        """One round of active expiry (primary only): remove up to `limit` keys whose
        expiry has passed. Returns how many were removed; await `wal.sync()` after.

        A replica keeps an expired key until its primary's DELETE arrives; it only
        drops the wheel's stale entries and looks again at due keys next cycle."""
        now = self.store.clock()
        store = self.store
        removed = 0
        primary = self.role == "primary" and not self.closed and self.wal.failure is None
        for key in store.expiry.due(now, limit, store.expiry_at):
            if primary:
                self._log(ops.delete_entry(key, expired=True))
                removed += 1
            else:
                store.expiry.add(key, now + SLOT_MS, now)  # look again next slot
        if removed:
            self._wake_readers()
            self.expired_total += removed
        return removed

    async def _expire_forever(self) -> None:
        """The active expiry cycle: bounded work every expiry_cycle_ms, so a burst of
        expiring keys is spread over cycles instead of stalling the loop."""
        interval = self.expiry.cycle_ms / 1000
        while not self.closed:
            await asyncio.sleep(interval)
            try:
                if self.expire_cycle(self.expiry.keys_per_cycle):
                    self._sync_soon()
            except (WalFailed, ShuttingDown):
                continue  # the write path reports these; expiry resumes if it can
            except Exception:
                log.exception("expiry cycle failed; retrying next cycle")

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
