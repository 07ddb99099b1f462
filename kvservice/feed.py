"""The commit feed: committed LogEntries, in revision order, once durable.

Replication and watch streams consume it. The node stages every entry (with
its encoded record, so nobody re-encodes) as it appends it to the WAL; the
WAL reports its durable watermark moving (`advance`), and the feed then hands
the entries up to the watermark to every subscription. Nothing leaves the
node before it is durable.

Each subscription has a bounded buffer. One slow consumer never blocks
writes or other consumers: a subscription that overflows is ended with
FeedOverflow carrying the last revision its consumer received, and the
consumer resumes from the backlog reader (storage/backlog.py), which yields
exactly the revisions after that one.

Joining without a gap: subscribe first (live entries start after the
watermark at that moment, `Subscription.start`), then read the backlog from
your own revision up to `start`, then consume the subscription.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvservice.errors import FeedOverflow, ShuttingDown
from kvservice.v1.log_pb2 import LogEntry


@dataclass(slots=True)
class Committed:
    """One committed entry and its encoded WAL record (header and payload).

    `digest` is the store's digest right after this entry (set by the node in
    the same step; None for entries read back from disk). `durable_at` is when
    it became durable here (time.monotonic(), set when the feed publishes it:
    its writer is acknowledged then; 0.0 for entries read back from disk).
    """

    entry: LogEntry
    record: bytes
    digest: int | None = None
    durable_at: float = 0.0

    @property
    def revision(self) -> int:
        return self.entry.revision


class Subscription:
    """A consumer's view of the feed: a bounded buffer of durable entries."""

    def __init__(self, feed: CommitFeed, start: int, max_entries: int, max_bytes: int) -> None:
        self._feed = feed
        # Live entries begin after this revision (the watermark when subscribing).
        self.start = start
        # The last revision handed to the consumer.
        self.last_revision = start
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: deque[Committed] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()
        self._ended: Exception | None = None
        # Called (no arguments) when entries arrive or the subscription ends, in the
        # same step: a consumer that must not wait for a task wake-up (replication).
        self.listener: Callable[[], None] | None = None

    def _push(self, items: list[Committed]) -> None:
        """Feed side: queue entries, or end the subscription when it overflows."""
        if self._ended is not None:
            return
        size = sum(len(item.record) for item in items)
        if len(self._items) + len(items) > self.max_entries or self._bytes + size > self.max_bytes:
            self._items.clear()
            self._bytes = 0
            self._end(FeedOverflow(self.last_revision, self.max_entries))
            return
        self._items.extend(items)
        self._bytes += size
        self._ready.set()
        if self.listener is not None:
            self.listener()

    def _end(self, reason: Exception) -> None:
        self._ended = reason
        self._feed._subscriptions.discard(self)
        self._ready.set()
        if self.listener is not None:
            self.listener()

    async def get(self, max_entries: int = 1024) -> list[Committed]:
        """Wait for and take up to `max_entries` entries, oldest first.

        Raises FeedOverflow (resume from the backlog after its `last_revision`)
        or ShuttingDown once the feed is closed and the buffer is empty.
        """
        while not self._items:
            if self._ended is not None:
                raise self._ended
            self._ready.clear()
            await self._ready.wait()
        return self.get_nowait(max_entries)

    def get_nowait(self, max_entries: int = 1024) -> list[Committed]:
        """Take what is buffered now (maybe nothing); raises like get() once ended."""
        if not self._items:
            if self._ended is not None:
                raise self._ended
            return []
        taken = [self._items.popleft() for _ in range(min(max_entries, len(self._items)))]
        self._bytes -= sum(len(item.record) for item in taken)
        self.last_revision = taken[-1].revision
        return taken

    def close(self) -> None:
        """Stop receiving (the consumer is done)."""
        if self._ended is None:
            self._end(ShuttingDown("the subscription was closed"))

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class CommitFeed:
    """Holds appended-but-not-durable entries and fans durable ones out."""

    def __init__(self, durable_revision: int) -> None:
        self.durable_revision = durable_revision
        self._staged: deque[Committed] = deque()
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    def stage(self, entry: LogEntry, record: bytes) -> Committed:
        """The node appended `entry` to the WAL (not yet durable)."""
        committed = Committed(entry, record)
        self._staged.append(committed)
        return committed

    def unstage(self, revision: int) -> None:
        """The WAL refused the entry just staged: it will never be committed."""
        if self._staged and self._staged[-1].revision == revision:
            self._staged.pop()

    def advance(self, revision: int) -> None:
        """The WAL's durable watermark reached `revision`: publish up to it."""
        staged = self._staged
        released = []
        now = time.monotonic()
        while staged and staged[0].revision <= revision:
            item = staged.popleft()
            item.durable_at = now
            released.append(item)
        self.durable_revision = max(self.durable_revision, revision)
        if released and self._subscriptions:
            for subscription in tuple(self._subscriptions):
                subscription._push(released)

    def subscribe(self, *, max_entries: int = 65536, max_bytes: int = 64 << 20) -> Subscription:
        """Receive every entry after the current durable watermark, in order."""
        if self._closed:
            raise ShuttingDown("the node is shutting down")
        subscription = Subscription(self, self.durable_revision, max_entries, max_bytes)
        self._subscriptions.add(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def close(self) -> None:
        """Shutdown: every subscription ends once its buffer is drained."""
        self._closed = True
        for subscription in tuple(self._subscriptions):
            subscription._end(ShuttingDown("the node is shutting down"))
