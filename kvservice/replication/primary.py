"""A primary's half of replication: one sender per replica.

Each sender runs on its own, with its own position, so a slow or dead replica
never slows the primary's writes or the other replicas: writes only stage
entries in the commit feed, and a sender that falls behind its bounded feed
buffer goes back to reading the WAL backlog.

A session: probe the replica (an empty push answers its history and
position) -> partial resync from the backlog when the history matches and
the WAL still reaches back, else a full resync (the newest snapshot file,
streamed in pieces, then the entries after it) -> stream live entries from
the commit feed, with a heartbeat push when idle. Up to PUSH_WINDOW pushes
are in flight (each continues where the one before ends, without waiting for
its answer). Live entries are pushed from the event-loop pass that made them
durable, and each answer is handled in the pass that reads it (`_pump`, over
the replication channel's callbacks): under load a pass serves dozens of
requests, so every task wake-up on the way would add milliseconds of lag. A
failure or refusal of any push ends the session, and the next one resumes
from where the replica really is (its probe says). While a session runs, the replica holds
the WAL it still needs (retention), so a transfer under load completes in one
attempt. Failures are retried with tenacity: exponential backoff with jitter,
capped at repl_retry_max_seconds, reset once a session made progress; every
retry is logged and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from connectrpc.errors import ConnectError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from kvservice.errors import Compacted, FeedOverflow, ShuttingDown
from kvservice.feed import Committed, Subscription
from kvservice.metrics import REPLICATION_LAG_BUCKETS, Buckets
from kvservice.replication.channel import ReplicaChannel
from kvservice.storage.backlog import BacklogReader
from kvservice.storage.segments import data_dirs, list_snapshots
from kvservice.v1.replication_pb2 import (
    InstallSnapshotRequest,
    PrimaryInfo,
    PushRequest,
    PushResponse,
    PushResult,
)

if TYPE_CHECKING:
    from kvservice.node import Node
    from kvservice.replication.manager import ReplicationManager

log = logging.getLogger("kvservice.primary")

# Pushes are small and quick; a snapshot's last piece makes the replica load it.
PUSH_TIMEOUT_MS = 10_000
INSTALL_TIMEOUT_MS = 600_000
# Pushes in flight per replica. With one, every entry committed while a push is out
# waits for its whole round trip, the replica's fsync included (most of the lag at a
# few thousand writes/s); with more, the replica applies the next batches while the
# previous one's fsync runs (its group commit covers them all). The window only bounds
# how long a slow fsync or answer can hold the stream: 3 measured better than 2 for the
# same CPU (bench/results/replication.md). Entries are not held back to share a push:
# over the replication channel a push costs the primary 85-137 us of CPU
# (bench/pushcost.py), so one per group commit stays within the CPU target.
PUSH_WINDOW = 3


@dataclass(frozen=True)
class InFlight:
    """A push sent and not yet checked."""

    answer: asyncio.Future[PushResponse]
    carries_entries: bool


class LinkError(Exception):
    """The session with a replica ended; the sender reconnects (with backoff)."""


RETRYABLE = (LinkError, ConnectError, OSError, Compacted)


class Sender:
    """Keeps one replica up to date."""

    def __init__(self, manager: ReplicationManager, node: Node, url: str) -> None:
        self.manager = manager
        self.node = node
        self.url = url
        settings = manager.settings
        self.batch_entries = settings.repl_batch_max_entries
        self.batch_bytes = settings.repl_batch_max_bytes
        self.heartbeat = settings.repl_heartbeat_seconds
        self.retry_max = settings.repl_retry_max_seconds
        self.state = "connecting"
        self.position = 0  # the replica's last applied revision, as last reported
        self.sent = 0  # the last revision sent to it (pushes in flight included)
        self.acked = 0  # the replica's durable revision, as last reported
        self.last_error = ""
        self.full_resyncs = 0
        self.partial_resyncs = 0
        self.retries = 0
        self.connected = False
        self.peer_id = ""  # the replica's node id, from its answers
        # (revision, when it became durable here, live) of entries the replica may not
        # have, one per group commit: its lag in seconds is the age of the first one
        # above `acked`. Live entries (from the feed) were acknowledged to their writers
        # then; backlog entries count from when they were read.
        self._durable_at: collections.deque[tuple[int, float, bool]] = collections.deque()
        # Per live entry: from its writer's acknowledgement to the replica's durable ack.
        self.durable_lag = Buckets(REPLICATION_LAG_BUCKETS)
        self._progressed = False
        self._in_flight: collections.deque[InFlight] = collections.deque()
        # Set (per session) when a push in flight failed or was refused: the stream
        # stops waiting for entries and ends the session.
        self._trouble: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        # While following the feed: its subscription, and how the follow ends early (a
        # push failed or was refused, the feed overflowed, this primary was fenced).
        self._live: Subscription | None = None
        self._follow_end: asyncio.Future[BaseException] | None = None
        self._paused = False  # a heartbeat is out: live pushes wait for its answer
        self._pushes = 0  # pushes sent (a follow is idle when this did not move)
        peers = manager.peers
        self._channel = ReplicaChannel(
            url, timeout_ms=PUSH_TIMEOUT_MS, headers=peers.headers, ssl_context=peers.ssl_context
        )
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sender {self.url}")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            # connect-python turns a cancelled call into ConnectError(CANCELED): the
            # loop checks _closing too, and the wait is bounded regardless.
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5)
        self._release()
        await self._channel.close()

    async def _run(self) -> None:
        while not self._closing:
            self._progressed = False
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(initial=0.05, max=self.retry_max, jitter=0.2),
                retry=retry_if_exception(self._retryable),
                before_sleep=self._before_retry,
                sleep=self._backoff,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._session_until_progress_lost()
            except ShuttingDown:
                self.connected = False
                self._set_state("failed" if self.manager.fenced else "connecting")
                return
            except Exception as exc:  # a bug: log it, keep the sender alive
                log.exception("replica sender crashed", extra={"replica": self.url})
                self._fail(f"internal error: {exc!r}")
                await asyncio.sleep(self.retry_max)

    def _retryable(self, exc: BaseException) -> bool:
        return not self._closing and isinstance(exc, RETRYABLE)

    async def _session_until_progress_lost(self) -> None:
        """One session; a failure after the session got going returns (reconnect at
        once with fresh backoff) instead of raising (backoff grows)."""
        try:
            await self._session()
        except RETRYABLE as exc:
            if self._closing:
                raise ShuttingDown("the sender is closing") from exc
            self._fail(_describe(exc))
            if not self._progressed:
                raise
            log.warning("replica link lost; reconnecting",
                        extra={"replica": self.url, "error": self.last_error})  # fmt: skip
        finally:
            await self._abandon_in_flight()
            self._release()

    def wake(self) -> None:
        """The replica announced itself: retry now instead of at the end of the backoff."""
        self._wake.set()

    async def _backoff(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _before_retry(self, retry: RetryCallState) -> None:
        self.retries += 1
        wait = retry.next_action.sleep if retry.next_action is not None else 0.0
        log.warning(
            "replica unreachable; retrying",
            extra={"replica": self.url, "attempt": retry.attempt_number,
                   "retry_in_seconds": round(wait, 3), "error": self.last_error},
        )  # fmt: skip

    def _fail(self, reason: str) -> None:
        if reason != self.last_error:  # retries of the same failure are logged by _before_retry
            log.warning("replica link failed", extra={"replica": self.url, "reason": reason})
        self.last_error = reason
        self.connected = False
        self.state = "failed"

    # -- a session ------------------------------------------------------------------

    async def _session(self) -> None:
        self._set_state("connecting")
        probe = await self._push(self.position, [])
        self.connected = True
        self.peer_id = probe.node_id
        if probe.result == PushResult.PUSH_RESULT_REFUSED:
            raise LinkError(f"the replica refused: {probe.message}")
        # The replica may ask for a full resync itself (a digest mismatch).
        same = probe.result != PushResult.PUSH_RESULT_HISTORY_MISMATCH and self._same_history(probe)
        if same and probe.revision > self.node.wal.durable_revision:
            raise LinkError(
                f"the replica is at revision {probe.revision}, ahead of this primary's"
                f" {self.node.wal.durable_revision} in the same history: not overwriting it"
                " (see docs/runbook.md, 'Replica ahead of its primary')"
            )
        self.position = probe.revision
        # What it holds now, in our history (a replica that lost its tail or is in
        # another history has acknowledged nothing of ours yet).
        self.acked = probe.durable_revision if same else 0
        self._durable_at.clear()
        self._note_behind(self.node.wal.durable_revision, time.monotonic(), live=False)
        self._hold(lambda: self.position)
        reader = await self._open_backlog(self.position) if same else None
        if reader is None:
            self.full_resyncs += 1
            self._set_state("full-sync")
            revision = await self._full_resync()
            self.position = revision
            self._hold(lambda: self.position)
            reader = await self._open_backlog(revision)
            if reader is None:
                raise LinkError(f"the WAL after snapshot revision {revision} is gone")
        else:
            self.partial_resyncs += 1
            log.info("partial resync", extra={"replica": self.url, "from_revision": self.position})
        self._set_state("streaming")
        self.sent = self.position
        self._trouble = asyncio.get_running_loop().create_future()
        await self._stream(reader)

    def _same_history(self, probe: PushResponse) -> bool:
        state = self.manager.state
        if probe.replication_id == state.replication_id:
            return True
        if probe.replication_id and probe.replication_id == state.prev_replication_id:
            return probe.revision <= state.prev_end_revision  # ours continues theirs
        if not probe.replication_id and probe.prev_replication_id == state.replication_id:
            return probe.revision <= self.node.wal.durable_revision  # restored from our backup
        return not probe.replication_id and probe.revision == 0

    async def _open_backlog(self, after: int) -> BacklogReader | None:
        wal_dir = self.node.wal.dir
        try:
            return await asyncio.to_thread(BacklogReader, wal_dir, after)
        except Compacted as exc:
            log.info("backlog does not reach back: full resync",
                     extra={"replica": self.url, "reason": str(exc)})  # fmt: skip
            return None

    async def _stream(self, reader: BacklogReader) -> None:
        """Catch up from the backlog, then follow the feed; back to the backlog on overflow."""
        while True:
            subscription = self.node.feed.subscribe(
                max_entries=max(4 * self.batch_entries, 10_000), max_bytes=4 * (64 << 20)
            )
            try:
                with reader:
                    await self._catch_up(reader, subscription.start)
                await self._follow(subscription)
            except FeedOverflow:
                log.info("replica fell behind the feed; reading the backlog",
                         extra={"replica": self.url, "revision": self.position})  # fmt: skip
                # (After what was sent: the pushes in flight carry the rest.)
                reader = await asyncio.to_thread(BacklogReader, self.node.wal.dir, self.sent)
            finally:
                subscription.close()

    async def _catch_up(self, reader: BacklogReader, until: int) -> None:
        while self.sent < until:
            batch = await asyncio.to_thread(
                reader.read, until, max_entries=self.batch_entries, max_bytes=self.batch_bytes
            )
            if not batch:
                raise LinkError(f"the WAL ends before revision {until}")
            self._stamp(batch)
            await self._send(batch)

    async def _follow(self, subscription: Subscription) -> None:
        """Ship live entries as they become durable (`_pump`, called by the feed and by
        every answer); this task only sends a heartbeat when a whole interval passed
        without a push, and ends the follow when a push failed or the pump stopped."""
        trouble = self._trouble
        assert trouble is not None, "streaming outside a session"
        end = self._follow_end = asyncio.get_running_loop().create_future()
        self._live = subscription
        subscription.listener = self._pump
        try:
            self._pump()
            while True:
                pushes = self._pushes
                await asyncio.wait((trouble, end), timeout=self.heartbeat,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if end.done():
                    raise end.result()
                if trouble.done():
                    await self._settle_all()  # raises at the push that failed
                if self._pushes == pushes:
                    await self._heartbeat()
        finally:
            subscription.listener = None
            self._live = self._follow_end = None

    def _pump(self) -> None:
        """Push what the feed holds now, while fewer than PUSH_WINDOW pushes are out.
        Runs in the event-loop pass that published the entries or read an answer, so
        no task wake-up stands between an entry's durability and its push."""
        subscription, end = self._live, self._follow_end
        if subscription is None or end is None or end.done() or self._paused:
            return
        try:
            self._settle_answered()
            while len(self._in_flight) < PUSH_WINDOW:
                batch = subscription.get_nowait(self.batch_entries)
                if not batch:
                    return
                self._stamp(batch)
                for part in _by_bytes(batch, self.batch_bytes):
                    self._push_now(part)
        except Exception as exc:  # (raised here, it would end the WAL's commit callback)
            end.set_result(exc)

    async def _heartbeat(self) -> None:
        """An empty push continuing what the replica holds, with the store's digest
        when idle. Live pushes wait for its answer (one sent meanwhile could be
        applied before it, and it would then no longer continue the replica's log)."""
        self._paused = True
        try:
            await self._settle_all()
            await self._send([])
            await self._settle_all()
        finally:
            self._paused = False
        self._pump()

    async def _send(self, batch: list[Committed]) -> None:
        """Push `batch` after what was sent before, without waiting for the answers to
        earlier pushes (up to PUSH_WINDOW in flight)."""
        self._settle_answered()
        while len(self._in_flight) >= PUSH_WINDOW:
            await self._settle_oldest()
        self._push_now(batch)

    def _push_now(self, batch: list[Committed]) -> None:
        """Send `batch` after what was sent before, now: on an idle connection of the
        channel with its answer handled as it is read, else (connecting) from a task."""
        request = self._request(self.sent, [item.record for item in batch], self._digest_for(batch))
        answered: asyncio.Future[PushResponse] = asyncio.get_running_loop().create_future()
        answer: asyncio.Future[PushResponse] = answered
        if not self._channel.push_nowait(request, functools.partial(self._answered, answered)):
            answer = asyncio.ensure_future(self._push_request(request))
            answer.add_done_callback(lambda _: self._pump())
        trouble = self._trouble
        if trouble is not None:
            answer.add_done_callback(lambda done: _signal_failure(done, trouble))
        self._in_flight.append(InFlight(answer, bool(batch)))
        self._pushes += 1
        if batch:
            self.sent = batch[-1].revision

    def _answered(
        self,
        answer: asyncio.Future[PushResponse],
        reply: PushResponse | None,
        error: BaseException | None,
    ) -> None:
        """A push sent by _push_now was answered (or failed): note it, push more."""
        if answer.cancelled():  # the session was abandoned: its answers mean nothing now
            return
        if reply is not None:
            try:
                self._note_reply(reply)
            except ShuttingDown as exc:
                error = exc
        if not answer.done():
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(reply)  # type: ignore[arg-type]
        self._pump()

    def _settle_answered(self) -> None:
        """Check the answers already in, oldest first (raises like _check)."""
        while self._in_flight and self._in_flight[0].answer.done():
            push = self._in_flight.popleft()
            self._check(push.answer.result(), push.carries_entries)

    async def _settle_oldest(self) -> None:
        push = self._in_flight[0]
        reply = await push.answer
        self._in_flight.popleft()
        self._check(reply, push.carries_entries)

    async def _settle_all(self) -> None:
        while self._in_flight:
            await self._settle_oldest()

    async def _abandon_in_flight(self) -> None:
        """The session ended: stop waiting for the answers still out."""
        pushes = [push.answer for push in self._in_flight]
        self._in_flight.clear()
        for answer in pushes:
            answer.cancel()
        if pushes:
            self._channel.abort()  # (their answers would arrive into the next session)
            await asyncio.wait(pushes)
        self._trouble = None

    def _check(self, reply: PushResponse, carried_entries: bool) -> None:
        """Act on a push's answer: raise LinkError unless it was applied."""
        if reply.result == PushResult.PUSH_RESULT_OK:
            self.position = max(self.position, reply.revision)
            if carried_entries:
                self._progressed = True  # data went through: a later failure retries at once
            return
        if reply.result == PushResult.PUSH_RESULT_POSITION_MISMATCH:
            self.position = reply.revision
            raise LinkError(f"position mismatch: the replica is at {reply.revision}")
        if reply.result == PushResult.PUSH_RESULT_HISTORY_MISMATCH:
            raise LinkError(f"history mismatch: {reply.message}")
        if reply.result == PushResult.PUSH_RESULT_DIGEST_MISMATCH:
            raise LinkError(f"digest mismatch: {reply.message}")
        raise LinkError(f"the replica refused: {reply.message}")

    def _digest_for(self, batch: list[Committed]) -> tuple[int, int] | None:
        """(revision, digest) the replica should have after this batch, when known:
        live entries carry it; an idle heartbeat uses the store's own."""
        if batch:
            last = batch[-1]
            return (last.revision, last.digest) if last.digest is not None else None
        store = self.node.store
        if store.revision == self.sent == self.node.wal.durable_revision:
            return store.revision, store.digest
        return None

    async def _push(
        self, prev_revision: int, records: list[bytes], digest: tuple[int, int] | None = None
    ) -> PushResponse:
        return await self._push_request(self._request(prev_revision, records, digest))

    def _request(
        self, prev_revision: int, records: list[bytes], digest: tuple[int, int] | None
    ) -> PushRequest:
        request = PushRequest(primary=self._info(), prev_revision=prev_revision, records=records)
        if digest is not None:
            request.digest_revision, request.digest = digest
        return request

    async def _push_request(self, request: PushRequest) -> PushResponse:
        reply = await self._channel.push(request)
        self._note_reply(reply)
        return reply

    def _note_reply(self, reply: PushResponse) -> None:
        """Fence on a newer epoch; note the replica's durable revision."""
        if reply.epoch > self.manager.state.epoch:
            # A newer primary exists: stop taking writes at once (fencing).
            self.manager.fence(reply.epoch, reply.primary_url)
            raise ShuttingDown(f"fenced by epoch {reply.epoch}")
        if reply.result == PushResult.PUSH_RESULT_OK and reply.durable_revision > self.acked:
            # (Only an answer in our history counts: another's revisions mean nothing here.)
            self._acknowledged(reply.durable_revision)
            self.manager.note_ack()

    def _info(self) -> PrimaryInfo:
        state = self.manager.state
        return PrimaryInfo(
            url=self.manager.settings.own_url, node_id=state.node_id,
            replication_id=state.replication_id, epoch=state.epoch,
            durable_revision=self.node.wal.durable_revision,
            sent_unix_ms=int(time.time() * 1000),
            prev_replication_id=state.prev_replication_id,
            prev_end_revision=state.prev_end_revision,
        )  # fmt: skip

    # -- full resync ----------------------------------------------------------------

    async def _full_resync(self) -> int:
        """Stream the newest snapshot file; return its revision."""
        snap_dir = data_dirs(self.manager.settings.data_dir)[1]
        if not list_snapshots(snap_dir):
            await self.node.snapshot()
        revision, path = list_snapshots(snap_dir)[0]
        self._hold(lambda: revision)  # the WAL after it stays until the replica has it
        # Opened now: a snapshot pruned meanwhile stays readable through the descriptor.
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        transfer = uuid.uuid4().hex
        started = time.monotonic()
        log.info("full resync", extra={"replica": self.url, "revision": revision})
        offset = 0
        try:
            while True:
                data = await asyncio.to_thread(os.read, fd, self.batch_bytes)
                done = not data
                reply = await self._channel.install_snapshot(
                    InstallSnapshotRequest(
                        primary=self._info(), transfer_id=transfer, revision=revision,
                        offset=offset, data=data, done=done,
                    ),
                    timeout_ms=INSTALL_TIMEOUT_MS if done else PUSH_TIMEOUT_MS,
                )  # fmt: skip
                offset += len(data)
                if reply.next_offset != offset:
                    raise LinkError(f"snapshot transfer out of step at byte {offset}")
                if done:
                    break
        finally:
            os.close(fd)
        self.position = self.acked = reply.revision
        self._progressed = True  # a transfer completed: a later failure retries at once
        self.manager.note_ack()
        log.info(
            "full resync done",
            extra={"replica": self.url, "revision": revision, "bytes": offset,
                   "seconds": round(time.monotonic() - started, 3)},
        )  # fmt: skip
        return revision

    # -- retention, state, status ----------------------------------------------------

    def _hold(self, revision: Callable[[], int]) -> None:
        self.node.snapshotter.retention.hold(self._hold_name, revision)

    def _release(self) -> None:
        self.node.snapshotter.retention.release(self._hold_name)

    @property
    def _hold_name(self) -> str:
        return f"replica {self.url}"

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("replica link state", extra={"replica": self.url, "state": state,
                                                  "was": self.state})  # fmt: skip
            self.state = state

    def lag_revisions(self) -> int:
        return max(0, self.node.wal.durable_revision - self.acked)

    def _stamp(self, batch: list[Committed]) -> None:
        """Note when the entries of `batch` became durable here: one stamp per group
        commit (its last entry). Entries read back from disk carry no time: now."""
        if not batch:
            return
        for item, after in itertools.pairwise(batch):
            if after.durable_at != item.durable_at:
                self._note_behind(item.revision, item.durable_at or time.monotonic(),
                                  live=bool(item.durable_at))  # fmt: skip
        last = batch[-1]
        self._note_behind(last.revision, last.durable_at or time.monotonic(),
                          live=bool(last.durable_at))  # fmt: skip

    def _note_behind(self, revision: int, at: float, *, live: bool) -> None:
        """Entries up to `revision` were durable here at `at` (monotonic); the replica
        has them once acked reaches it."""
        if revision > self.acked and (not self._durable_at or revision > self._durable_at[-1][0]):
            self._durable_at.append((revision, at, live))

    def _acknowledged(self, revision: int) -> None:
        """The replica holds everything up to `revision` durably: count each live entry
        newly acknowledged in `durable_lag`, at the age of its group commit."""
        now = time.monotonic()
        done = self.acked
        stamps = self._durable_at
        while stamps and stamps[0][0] <= revision:
            last, at, live = stamps.popleft()
            if live and last > done:
                self.durable_lag.observe(now - at, last - done)
            done = max(done, last)
        if stamps and done < revision:  # part of the next group commit
            _, at, live = stamps[0]
            if live:
                self.durable_lag.observe(now - at, revision - done)
        self.acked = revision

    def lag_seconds(self) -> float:
        """Age of the oldest entry durable here that the replica has not acknowledged."""
        if not self._durable_at or self.lag_revisions() == 0:
            return 0.0
        return time.monotonic() - self._durable_at[0][1]


def _by_bytes(batch: list[Committed], limit: int) -> list[list[Committed]]:
    """Split a batch so each part's records stay within `limit` bytes (one entry at least)."""
    parts: list[list[Committed]] = [[]]
    size = 0
    for item in batch:
        if parts[-1] and size + len(item.record) > limit:
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += len(item.record)
    return parts


def _signal_failure(answer: asyncio.Future[PushResponse], trouble: asyncio.Future[None]) -> None:
    """A push's answer came (or it failed): wake the session when it was not applied."""
    failed = answer.cancelled() or answer.exception() is not None
    if (failed or answer.result().result != PushResult.PUSH_RESULT_OK) and not trouble.done():
        trouble.set_result(None)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectError):
        return f"{exc.code.name.lower()}: {exc.message}"
    return str(exc) or type(exc).__name__
