"""Watch streams: the changes to a key or a prefix, from the WAL backlog, then live.

A stream starts at `start_revision` (inclusive; 0 = from now). It reads the
matching events out of the WAL backlog (holding WAL retention meanwhile, so
the segments it still needs survive snapshots) until it has caught up with
the live position of the node's dispatcher, joins the dispatcher in the same
step (no await in between: the backlog ends exactly where live delivery
begins, so there is no gap and no duplicate), and from then on receives live
events in revision order.

One dispatcher per node (`WatchHub`) subscribes to the commit feed once and
fans each durable entry out to the watchers whose key or prefix matches.
Why not a feed subscription per stream: measured with 1,000 streams
(bench/watch_fanout_micro.py, figures in bench/results/watch.md), that makes
every stream wake, filter and translate every entry for itself: 3.8x the CPU
per delivered event when all streams watch one prefix, and about 200x when
each watches its own key (every stream pays for every write). The dispatcher
translates each entry once, finds the matching targets through an index
(exact keys; prefixes by length), not by asking every stream, builds one
shared chunk of events per target, and hands each stream of that target a
reference to it: one list append per stream per group commit.

Under load, events batch up by themselves: a stream takes everything queued
since its last message and sends it as one message (up to
`watch_batch_max_events` / `watch_batch_max_bytes`; a Txn's events never
split), so the busier the node, the fewer messages per event.

A stream whose queue would pass `watch_buffer_events` / `watch_buffer_bytes`
(its consumer reads too slowly) is ended with `resource_exhausted` naming
the last revision it delivered; it resumes from the next one. Shutdown and a
replica's full resync (its storage is replaced) end every stream with
`unavailable` naming the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvservice import values
from kvservice.errors import (
    FeedOverflow,
    InvalidArgument,
    KVError,
    ResourceExhausted,
    ShuttingDown,
    StorageError,
    StorageReplaced,
    WatchTooSlow,
    resume_hint,
)
from kvservice.feed import CommitFeed, Committed, Subscription
from kvservice.storage.backlog import BacklogReader
from kvservice.v1.kv_pb2 import Event, WatchRequest, WatchResponse
from kvservice.v1.log_pb2 import LogEntry

if TYPE_CHECKING:
    from kvservice.config import Settings
    from kvservice.node import Node

log = logging.getLogger("kvservice.watch")

SET, DELETE, TOUCH, BATCH = (
    LogEntry.OPERATION_SET,
    LogEntry.OPERATION_DELETE,
    LogEntry.OPERATION_TOUCH,
    LogEntry.OPERATION_BATCH,
)
# Bytes an event costs in a buffer besides its key and value (message framing,
# revision, type, expiry): an estimate for the byte bounds, not an exact size.
EVENT_OVERHEAD_BYTES = 24
# A stream still reading the backlog joins live delivery once it is this few
# revisions behind: the rest is read while live events queue (bounded).
JOIN_SLACK_REVISIONS = 256
# At shutdown, a stream whose client does not read its last messages is cut
# (its request task cancelled) after this long; otherwise after
# watch_stall_seconds. (uvicorn then closes the connection gracefully, which
# waits for the client to read what is buffered: a client that reads nothing
# at all keeps its TCP connection until shutdown_timeout_seconds, as any slow
# HTTP client does. ASGI offers no abort.)
SHUTDOWN_CUT_SECONDS = 1.0


def decoded_value(entry: LogEntry) -> bytes:
    """The client's bytes of a SET entry's value (zstd frames decompressed)."""
    if entry.value_encoding == LogEntry.VALUE_ENCODING_ZSTD:
        return values.decompress(entry.value)
    return entry.value


def changes_of(entry: LogEntry) -> Iterator[LogEntry]:
    """The single-key changes an entry makes: itself, or a batch's nested entries."""
    if entry.operation == BATCH:
        for nested in entry.entries:
            yield from changes_of(nested)
    else:
        yield entry


def event_of(change: LogEntry, revision: int) -> Event | None:
    """The event for one single-key change at `revision` (None: nothing a watcher sees)."""
    operation = change.operation
    if operation == SET:
        return Event(
            type=Event.EVENT_TYPE_SET, key=change.key, value=decoded_value(change),
            revision=revision, expires_at_ms=change.expires_at_ms,
        )  # fmt: skip
    if operation == DELETE:
        kind = Event.EVENT_TYPE_EXPIRE if change.expired else Event.EVENT_TYPE_DELETE
        return Event(type=kind, key=change.key, revision=revision)
    if operation == TOUCH:
        return Event(
            type=Event.EVENT_TYPE_TOUCH, key=change.key, revision=revision,
            expires_at_ms=change.expires_at_ms,
        )  # fmt: skip
    return None  # an operation from a newer version: nothing to show


def events_of(entry: LogEntry) -> list[Event]:
    """Every event of one log entry; a batch's all carry the batch's revision."""
    events = (event_of(change, entry.revision) for change in changes_of(entry))
    return [event for event in events if event is not None]


def without_value(event: Event) -> Event:
    if not event.value:
        return event
    return Event(
        type=event.type, key=event.key, revision=event.revision,
        expires_at_ms=event.expires_at_ms,
    )  # fmt: skip


def event_bytes(event: Event) -> int:
    return len(event.key) + len(event.value) + EVENT_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class Target:
    """What one stream watches: exactly `key`, or every key starting with `prefix`."""

    text: str
    is_prefix: bool
    keys_only: bool

    def matches(self, key: str) -> bool:
        return key.startswith(self.text) if self.is_prefix else key == self.text


def target_of(request: WatchRequest, max_key_bytes: int) -> Target:
    """Validate a request's target (invalid_argument when there is none or it is too long)."""
    which = request.WhichOneof("target")
    if which is None:
        raise InvalidArgument("set one of key or prefix (an empty prefix watches every key)")
    text = request.key if which == "key" else request.prefix
    if which == "key" and not text:
        raise InvalidArgument("key must not be empty (an empty prefix watches every key)")
    if len(text.encode()) > max_key_bytes:
        raise InvalidArgument(
            f"{which} is {len(text.encode())} bytes; the limit is {max_key_bytes}"
            " (setting max_key_bytes)"
        )
    return Target(text, which == "prefix", request.keys_only)


@dataclass(slots=True)
class Chunk:
    """Events of one stretch of revisions for one target, shared by its streams.

    Every revision up to `last_revision` was looked at; `events` are the ones
    that match. A chunk with `progress` set carries no events: a progress mark.
    """

    events: list[Event]
    last_revision: int
    size: int
    progress: bool = False
    _message: WatchResponse | None = None

    def message(self) -> WatchResponse:
        """One response holding just this chunk, built once for every stream sharing it."""
        if self._message is None:
            self._message = WatchResponse(events=self.events)
        return self._message


def progress_chunk(revision: int) -> Chunk:
    return Chunk([], revision, 0, progress=True)


class Watcher:
    """One stream's queue of chunks, filled by the dispatcher, drained by its stream."""

    def __init__(
        self,
        target: Target,
        first_revision: int,
        limits: WatchLimits,
        on_too_slow: Callable[[], None] = lambda: None,
    ) -> None:
        self.target = target
        self.on_too_slow = on_too_slow
        # Revisions below this are not wanted (a start in the future).
        self.first_revision = first_revision
        self.limits = limits
        # Every change up to this revision was delivered (handed to the transport).
        self.delivered = first_revision - 1
        # Live events come after this revision (-1 until the stream joins).
        self.joined_at = -1
        self._pending: deque[Chunk] = deque()
        self._events = 0
        self._bytes = 0
        self._ready = asyncio.Event()
        # Makes the error that ends the stream, from the last revision delivered
        # (known only once the message in flight, if any, was sent).
        self._ended: Callable[[int], KVError] | None = None
        self.task: asyncio.Task[object] | None = None

    def offer(self, chunk: Chunk) -> None:
        """Dispatcher side: queue a chunk, or end the stream when its buffer is full."""
        if self._ended is not None:
            return
        events, size = self._events + len(chunk.events), self._bytes + chunk.size
        if events > self.limits.buffer_events or size > self.limits.buffer_bytes:
            why = (
                f"this watch stream's consumer fell behind: more than {self.limits.buffer_events}"
                f" events or {self.limits.buffer_bytes} bytes were waiting (settings"
                " watch_buffer_events, watch_buffer_bytes)"
            )
            self.end(lambda last: WatchTooSlow(last, why), drop_pending=True)
            self.on_too_slow()
            return
        self._pending.append(chunk)
        self._events, self._bytes = events, size
        self._ready.set()

    def end(
        self,
        reason: Callable[[int], KVError],
        *,
        drop_pending: bool = False,
        cut_after: float | None = None,
    ) -> None:
        """End the stream once what is queued was sent (or at once: `drop_pending`).

        A client that reads nothing leaves the stream blocked in a send: its
        request is cancelled after `cut_after` seconds (default
        watch_stall_seconds), so it cannot hold a stream slot forever."""
        if self._ended is not None:
            return
        self._ended = reason
        if drop_pending:
            self._pending.clear()
            self._events = self._bytes = 0
        self._ready.set()
        task = self.task
        if task is not None and not task.done():
            delay = self.limits.stall_seconds if cut_after is None else cut_after
            asyncio.get_running_loop().call_later(delay, _cut_if_stuck, task, 3)

    async def take(self) -> list[Chunk]:
        """Wait for chunks and take every one queued; raise the end reason once drained."""
        while not self._pending:
            if self._ended is not None:
                raise self._ended(self.delivered)
            self._ready.clear()
            await self._ready.wait()
        taken = list(self._pending)
        self._pending.clear()
        self._events = self._bytes = 0
        return taken


def _cut_if_stuck(task: asyncio.Task[object], tries: int) -> None:
    """Cancel a stream's request task that is still blocked sending to a client that
    does not read. connect-python answers the first cancel by trying to send the
    end of the stream (which blocks again), so cancel again until it is done."""
    if task.done() or tries == 0:
        return
    task.cancel()
    asyncio.get_running_loop().call_later(SHUTDOWN_CUT_SECONDS, _cut_if_stuck, task, tries - 1)


@dataclass(frozen=True, slots=True)
class WatchLimits:
    max_streams: int
    buffer_events: int
    buffer_bytes: int
    batch_events: int
    batch_bytes: int
    progress_seconds: float
    stall_seconds: float
    max_key_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> WatchLimits:
        return cls(
            max_streams=settings.watch_max_streams,
            buffer_events=settings.watch_buffer_events,
            buffer_bytes=settings.watch_buffer_bytes,
            batch_events=settings.watch_batch_max_events,
            batch_bytes=settings.watch_batch_max_bytes,
            progress_seconds=settings.watch_progress_seconds,
            stall_seconds=settings.watch_stall_seconds,
            max_key_bytes=settings.max_key_bytes,
        )


class Group:
    """The live streams of one target: they get the very same chunks."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.watchers: set[Watcher] = set()
        self.events: list[Event] = []  # matched in the slice being fanned out


class Targets:
    """Live groups indexed so that matching a key costs a few dict lookups, whatever
    the number of streams: exact keys by key, prefixes by prefix and length."""

    def __init__(self) -> None:
        self.groups: dict[Target, Group] = {}
        self._by_key: dict[str, list[Group]] = {}
        self._by_prefix: dict[str, list[Group]] = {}
        self._prefix_lengths: dict[int, int] = {}  # length -> prefixes of that length

    def add(self, watcher: Watcher) -> None:
        target = watcher.target
        group = self.groups.get(target)
        if group is None:
            group = self.groups[target] = Group(target)
            index = self._by_prefix if target.is_prefix else self._by_key
            index.setdefault(target.text, []).append(group)
            if target.is_prefix and len(index[target.text]) == 1:
                length = len(target.text)
                self._prefix_lengths[length] = self._prefix_lengths.get(length, 0) + 1
        group.watchers.add(watcher)

    def remove(self, watcher: Watcher) -> None:
        target = watcher.target
        group = self.groups.get(target)
        if group is None:
            return
        group.watchers.discard(watcher)
        if group.watchers:
            return
        del self.groups[target]
        index = self._by_prefix if target.is_prefix else self._by_key
        index[target.text].remove(group)
        if not index[target.text]:
            del index[target.text]
            if target.is_prefix:
                length = len(target.text)
                self._prefix_lengths[length] -= 1
                if not self._prefix_lengths[length]:
                    del self._prefix_lengths[length]

    def matching(self, key: str) -> list[Group]:
        found = list(self._by_key.get(key, ()))
        by_prefix = self._by_prefix
        if len(by_prefix) <= len(self._prefix_lengths):
            for prefix, groups in by_prefix.items():
                if key.startswith(prefix):
                    found.extend(groups)
        else:
            for length in self._prefix_lengths:
                if length <= len(key) and (same := by_prefix.get(key[:length])):
                    found.extend(same)
        return found

    def watchers(self) -> Iterator[Watcher]:
        for group in self.groups.values():
            yield from group.watchers


class WatchHub:
    """The node's watch streams and the one dispatcher that feeds them."""

    def __init__(
        self, node: Node, settings: Settings, on_too_slow: Callable[[], None] = lambda: None
    ) -> None:
        self.node = node
        self.limits = WatchLimits.of(settings)
        # Counted by the caller (a metric): a stream ended for its slow consumer.
        self.on_too_slow = on_too_slow
        self._open: set[Watcher] = set()  # every stream, live or still reading the backlog
        self.closed = False
        self.targets = Targets()
        self._feed: CommitFeed | None = None
        self._subscription: Subscription | None = None
        self._position = 0  # every entry up to here was fanned out
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Remember the loop, so a signal handler can end the streams (drain_soon)."""
        self._loop = asyncio.get_running_loop()

    def drain_soon(self) -> None:
        """From a signal handler: end every stream on the loop's next turn."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.close)

    def close(self) -> None:
        """Shutdown: refuse new streams; end every open one once its queue is sent."""
        if self.closed:
            return
        self.closed = True
        self._end_all(shutting_down, cut_after=SHUTDOWN_CUT_SECONDS)
        self._unsubscribe()
        # Streams still reading the backlog stop at their next batch; one blocked
        # sending to a client that reads nothing is cut like a live one.
        for watcher in self._open:
            if watcher.task is not None and watcher.joined_at < 0:
                loop = asyncio.get_running_loop()
                loop.call_later(SHUTDOWN_CUT_SECONDS, _cut_if_stuck, watcher.task, 3)

    @property
    def streams(self) -> int:
        """Streams open now (live or reading the backlog)."""
        return len(self._open)

    # -- one stream ---------------------------------------------------------------

    async def stream(self, request: WatchRequest) -> AsyncGenerator[WatchResponse, None]:
        """The responses of one Watch call (raises KVError subclasses to end it)."""
        target = target_of(request, self.limits.max_key_bytes)
        if self.closed:
            raise ShuttingDown(SHUTTING_DOWN)
        if self.streams >= self.limits.max_streams:
            raise ResourceExhausted(
                f"{self.streams} watch streams are open; the limit is"
                f" {self.limits.max_streams} (setting watch_max_streams)"
            )
        feed = self.node.feed
        first = request.start_revision or self._live_position() + 1
        watcher = Watcher(target, first, self.limits, self.on_too_slow)
        watcher.task = asyncio.current_task()
        self._open.add(watcher)
        try:
            async with contextlib.aclosing(self._catch_up(watcher, feed)) as backlog:
                async for response in backlog:
                    yield response
            # "Live from here": also what sends the response headers of a quiet stream.
            yield WatchResponse(progress_revision=watcher.joined_at)
            watcher.delivered = max(watcher.delivered, watcher.joined_at)
            while True:
                chunks = await watcher.take()
                messages = _live_messages(chunks, watcher.first_revision, self.limits)
                for response, covered in messages:
                    yield response
                    watcher.delivered = max(watcher.delivered, covered)
        finally:
            self._leave(watcher)
            self._open.discard(watcher)

    async def _catch_up(
        self, watcher: Watcher, feed: CommitFeed
    ) -> AsyncGenerator[WatchResponse, None]:
        """Backlog events from the stream's first revision until it joins live delivery."""
        after = watcher.first_revision - 1
        if after >= self._live_position():  # from now, or from a future revision
            self._join(watcher, feed)
            return
        retention = self.node.snapshotter.retention
        hold = f"watch {next(self._ids)}"
        # The stream needs the WAL after what it delivered (the reader is at or past it).
        retention.hold(hold, lambda: watcher.delivered)
        try:
            reader = await asyncio.to_thread(BacklogReader, self.node.wal.dir, after)
            with reader:
                while True:
                    if watcher.joined_at < 0 and (
                        self._live_position() - reader.position <= JOIN_SLACK_REVISIONS
                    ):
                        self._join(watcher, feed)
                    if watcher.joined_at >= 0 and reader.position >= watcher.joined_at:
                        return
                    until = watcher.joined_at if watcher.joined_at >= 0 else self._live_position()
                    batch = await asyncio.to_thread(
                        reader.read, until, max_entries=self.limits.batch_events,
                        max_bytes=self.limits.batch_bytes,
                    )  # fmt: skip
                    self._check_open(watcher, feed)
                    if not batch:
                        raise StorageError(f"the WAL on disk ends before revision {until}")
                    for response in _backlog_messages(batch, watcher.target, self.limits):
                        yield response
                        watcher.delivered = response.events[-1].revision
                    watcher.delivered = reader.position
        finally:
            retention.release(hold)

    def _check_open(self, watcher: Watcher, feed: CommitFeed) -> None:
        if self.closed:
            raise shutting_down(watcher.delivered)
        if self.node.feed is not feed:
            raise storage_replaced(watcher.delivered)

    # -- the dispatcher -------------------------------------------------------------

    def _live_position(self) -> int:
        """The revision after which a stream joining now receives live events."""
        if self._subscription is not None:
            return self._position
        return self.node.feed.durable_revision

    def _join(self, watcher: Watcher, feed: CommitFeed) -> None:
        """Add a stream to live delivery (no await here: see the module docstring)."""
        self._check_open(watcher, feed)
        if self._subscription is None:
            self._subscribe()
        self.targets.add(watcher)
        watcher.joined_at = self._position

    def _leave(self, watcher: Watcher) -> None:
        self.targets.remove(watcher)
        if not self.targets.groups:
            self._unsubscribe()

    def _subscribe(self) -> None:
        # Subscribed only while streams are live: an unwatched node pays nothing
        # per write. The subscription's buffer is the feed's default (65,536
        # entries, 64 MiB): only a starved event loop lets it fill.
        feed = self.node.feed
        subscription = feed.subscribe()
        self._feed, self._subscription = feed, subscription
        self._position = subscription.start
        self._tasks = [
            asyncio.create_task(self._dispatch(subscription), name="watch dispatcher"),
            asyncio.create_task(self._tick(), name="watch progress"),
        ]

    def _unsubscribe(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []

    async def _dispatch(self, subscription: Subscription) -> None:
        try:
            while True:
                self._fan_out(await subscription.get(self.limits.batch_events))
        except FeedOverflow:
            self._end_all(lambda last: WatchTooSlow(last, DISPATCHER_BEHIND))
        except ShuttingDown:
            if self.node.feed is not self._feed:  # a full resync swapped the storage
                self._end_all(storage_replaced)
            else:
                self._end_all(shutting_down)
        except Exception:  # a bug: end the streams rather than leave them hanging
            log.exception("watch dispatcher failed")
            self._end_all(lambda last: ShuttingDown(f"internal error; {resume_hint(last)}"))
        finally:
            if self._subscription is subscription:
                self._unsubscribe()

    def _end_all(self, reason: Callable[[int], KVError], cut_after: float | None = None) -> None:
        for watcher in list(self.targets.watchers()):
            self.targets.remove(watcher)
            watcher.end(reason, cut_after=cut_after)

    async def _tick(self) -> None:
        """A progress mark for every live stream at least every watch_progress_seconds."""
        while True:
            await asyncio.sleep(self.limits.progress_seconds)
            chunk = progress_chunk(self._position)
            for watcher in list(self.targets.watchers()):
                watcher.offer(chunk)

    def _fan_out(self, items: list[Committed]) -> None:
        """Hand every live stream the events of `items` that match its target."""
        targets = self.targets
        touched: list[Group] = []
        size = 0
        for item in items:
            entry = item.entry
            for change in changes_of(entry):
                groups = targets.matching(change.key)
                if not groups:
                    continue
                event = event_of(change, entry.revision)
                if event is None:
                    continue
                size += event_bytes(event)
                for group in groups:
                    if not group.events:
                        touched.append(group)
                    group.events.append(without_value(event) if group.target.keys_only else event)
            # Cut between entries (never inside one), so that chunks stay bounded.
            if size >= self.limits.batch_bytes:
                self._deliver(touched, entry.revision)
                touched, size = [], 0
        if items:
            self._deliver(touched, items[-1].revision)
            self._position = items[-1].revision

    @staticmethod
    def _deliver(groups: list[Group], last_revision: int) -> None:
        for group in groups:
            events, group.events = group.events, []
            chunk = Chunk(events, last_revision, sum(map(event_bytes, events)))
            for watcher in list(group.watchers):
                watcher.offer(chunk)


SHUTTING_DOWN = "the node is shutting down"
DISPATCHER_BEHIND = "this node could not fan events out fast enough (its event loop is saturated)"


def shutting_down(last_revision: int) -> ShuttingDown:
    return ShuttingDown(f"{SHUTTING_DOWN}; {resume_hint(last_revision)}")


def storage_replaced(last_revision: int) -> StorageReplaced:
    return StorageReplaced(
        "this replica's data was replaced by a full resync from its primary (its history"
        f" may differ); {resume_hint(last_revision)}"
    )


def _backlog_messages(
    batch: list[Committed], target: Target, limits: WatchLimits
) -> Iterator[WatchResponse]:
    """The matching events of backlog entries, a Txn's always in one message."""
    message = WatchResponse()
    size = 0
    for item in batch:
        events = [e for e in events_of(item.entry) if target.matches(e.key)]
        if not events:
            continue
        if target.keys_only:
            events = [without_value(e) for e in events]
        grown = sum(map(event_bytes, events))
        if message.events and (
            len(message.events) + len(events) > limits.batch_events
            or size + grown > limits.batch_bytes
        ):
            yield message
            message, size = WatchResponse(), 0
        message.events.extend(events)
        size += grown
    if message.events:
        yield message


def _live_messages(
    chunks: list[Chunk], first_revision: int, limits: WatchLimits
) -> Iterator[tuple[WatchResponse, int]]:
    """Responses for queued chunks, as few as the batch limits allow, each with the
    revision it covers up to. A chunk alone is sent as its shared message."""
    batch: list[Chunk] = []
    events = size = 0
    for chunk in chunks:
        if chunk.progress:
            if batch:
                yield _merged(batch), batch[-1].last_revision
                batch, events, size = [], 0, 0
            yield WatchResponse(progress_revision=chunk.last_revision), chunk.last_revision
            continue
        wanted = _from_revision(chunk, first_revision)
        if wanted is None:
            continue
        full = events + len(wanted.events) > limits.batch_events
        if batch and (full or size + wanted.size > limits.batch_bytes):
            yield _merged(batch), batch[-1].last_revision
            batch, events, size = [], 0, 0
        batch.append(wanted)
        events += len(wanted.events)
        size += wanted.size
    if batch:
        yield _merged(batch), batch[-1].last_revision


def _from_revision(chunk: Chunk, first_revision: int) -> Chunk | None:
    """The chunk without events before `first_revision` (a stream started in the future)."""
    if chunk.events[0].revision >= first_revision:
        return chunk
    events = [event for event in chunk.events if event.revision >= first_revision]
    if not events:
        return None
    return Chunk(events, chunk.last_revision, sum(map(event_bytes, events)))


def _merged(batch: list[Chunk]) -> WatchResponse:
    if len(batch) == 1:
        return batch[0].message()
    return WatchResponse(events=[event for chunk in batch for event in chunk.events])
