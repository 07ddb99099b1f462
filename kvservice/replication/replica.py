"""A replica's half of replication: apply pushes, install snapshots, announce itself.

Pushes are applied one at a time (a lock): entries must continue this node's
log exactly — same history (replication id), `prev_revision` equal to the
last applied revision — or nothing is applied and the answer says where the
replica is, so a duplicate or reordered batch is never applied twice. Applied
entries go to the replica's own WAL with the primary's revisions and are
acknowledged once durable per the replica's own fsync policy. The primary keeps
a few pushes in flight: one that arrives before the push it continues waits
briefly for it, and the fsync is awaited outside the lock, so the next push is
applied while the previous one's fsync runs.

A full resync streams a snapshot file in pieces into `resync/`; the replica
keeps serving its old data until the file is complete, verified and staged,
then switches (storage/install.py) in one step.

A node whose history the new primary's continues (a promotion), but that
holds entries past the fork point — a demoted primary's unshipped tail —
saves them to `diverged/`, rewinds its own state to the fork point
(storage/rewind.py, staged and switched like a full resync) and resumes by
partial resync; only when its files no longer reach back to the fork does it
ask for a full resync.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from connectrpc.errors import ConnectError

from kvservice.engine import Store
from kvservice.errors import CannotRewind, ReplicationRefused, RevisionGap, StorageError
from kvservice.storage.install import Incoming, discard_install, finish_install, stage_install
from kvservice.storage.rewind import Rewound, save_diverged, stage_rewind, state_at
from kvservice.storage.snapshot import LoadedSnapshot, load_snapshot
from kvservice.v1.replication_connect import ReplicationClient
from kvservice.v1.replication_pb2 import (
    AnnounceRequest,
    InstallSnapshotRequest,
    InstallSnapshotResponse,
    PrimaryInfo,
    PushRequest,
    PushResponse,
    PushResult,
)

if TYPE_CHECKING:
    from kvservice.node import Node
    from kvservice.replication.manager import ReplicationManager
    from kvservice.storage.wal import Wal

log = logging.getLogger("kvservice.replica")
# How long a push waits for the one it continues (reordered on the way: milliseconds).
PREDECESSOR_WAIT_SECONDS = 1.0

# Give the node a new WAL, feed and snapshotter around an installed store, started.
Rebuild = Callable[[Store], None]


@dataclass
class LinkView:
    state: str
    primary_url: str
    last_contact_seconds: float
    lag_seconds: float
    primary_revision: int
    last_error: str


class ReplicaSide:
    """Applies what the primary sends; knows how fresh this replica is."""

    def __init__(
        self, manager: ReplicationManager, node: Node, rebuild: Rebuild, primary_url: str | None
    ) -> None:
        self.manager = manager
        self.node = node
        self.rebuild = rebuild
        self.settings = manager.settings
        self.configured_primary = primary_url
        # The URL the primary advertises itself by (its answer to Announce): it may
        # spell the same node differently from primary_url (localhost, a DNS name).
        self.advertised_primary = ""
        self.primary_url = self.configured_primary or ""
        self.state = "unlinked"
        self.last_contact: float | None = None  # monotonic
        # (revision, when the primary first reported it durable): the lag is the age
        # of the oldest report above what this replica has applied.
        self._reports: collections.deque[tuple[int, float]] = collections.deque()
        # Whether this replica reached its primary's durable revision since it (re)linked.
        self.caught_up = False
        self._latest_sent_ms = 0  # the newest push seen (older ones are stale replays)
        self.primary_revision = 0
        self.last_error = ""
        self.digest_mismatches = 0
        self.digest_error = ""  # the last mismatch, until a full resync repairs it
        # Why this replica refuses its primary's data (it would lose writes), if it does.
        self.refused = ""
        self.full_resync_reason = ""  # why it asks for a full resync (needs_full_resync)
        self.broken = ""  # a staged full resync could not be switched to: restart needed
        self.needs_full_resync = False
        self.lock = asyncio.Lock()
        self._incoming: Incoming | None = None
        # A rewind to the fork point under way (outlives a push whose caller gave up).
        self._rewinding: asyncio.Task[bool] | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self.node.primary_url = self.primary_url or None
        if self.configured_primary:
            self._announcer = asyncio.create_task(self._announce_loop(), name="announce")

    async def close(self) -> None:
        self._closing = True
        if self._announcer is not None:
            # (connect-python turns a cancelled call into ConnectError(CANCELED), so
            # the loop also checks _closing; and the wait is bounded regardless.)
            self._announcer.cancel()
            await asyncio.wait([self._announcer], timeout=5)
        if self._rewinding is not None:
            await asyncio.wait([self._rewinding])  # a switch half done must finish
        if self._incoming is not None:
            self._incoming.close()
            self._incoming = None

    # -- pushes -------------------------------------------------------------------

    async def push(self, request: PushRequest) -> PushResponse:
        if request.records:
            await self._await_predecessor(request)
        async with self.lock:
            answer = await self._apply(request)
            wal = self.node.wal
        if answer.result == PushResult.PUSH_RESULT_OK and request.records:
            return await self._when_durable(answer, wal)
        return answer

    async def _when_durable(self, answer: PushResponse, wal: Wal) -> PushResponse:
        """`answer` once what the push appended to `wal` is durable. Awaited outside the
        lock: the next push is applied while this one's fsync runs, and group commit
        makes both durable together."""
        if wal is not self.node.wal:  # a full resync replaced the log meanwhile
            return self._answer(
                PushResult.PUSH_RESULT_POSITION_MISMATCH, "a full resync replaced the log"
            )
        await wal.sync()
        answer.durable_revision = wal.durable_revision
        return answer

    async def _await_predecessor(self, request: PushRequest) -> None:
        """The primary keeps several pushes in flight, each on its own connection, so
        one can arrive before the push it continues: give that one time to be applied.
        (Bounded: a predecessor that was lost never comes, and the push is then
        answered with this replica's position, as any out-of-order push is.)"""
        same_history = request.primary.replication_id == self.manager.state.replication_id
        if same_history and request.prev_revision > self.node.store.revision:
            await self.node.wait_for_revision(request.prev_revision, PREDECESSOR_WAIT_SECONDS)

    async def _apply(self, request: PushRequest) -> PushResponse:
        """Apply the push if it continues this replica's log (not yet durable); the answer."""
        if self._closing or self.broken:  # the role changed meanwhile, or a switch failed
            return self._answer(
                PushResult.PUSH_RESULT_REFUSED, self.broken or "this node is no longer a replica"
            )
        refused = await self._not_applicable(request)
        if refused is not None:
            return refused
        await self._adopt(request.primary)
        if request.records:
            try:
                self.node.apply_replicated(list(request.records))
            except (RevisionGap, ReplicationRefused) as exc:
                return self._answer(PushResult.PUSH_RESULT_REFUSED, str(exc))
        self._note_position()
        self.state = "streaming"
        self.last_error = ""
        if not self.needs_full_resync:
            self.manager.force_next_sync = False  # following normally again
        store = self.node.store
        if request.digest_revision == store.revision and store.digest != request.digest:
            return self._digest_mismatch(request)
        # Its revision is this push's last (later pushes may be applied before the answer).
        return self._answer(PushResult.PUSH_RESULT_OK, "")

    async def _not_applicable(self, request: PushRequest) -> PushResponse | None:
        """The answer to a push that must not be applied; None when it may be."""
        early = self._refused_or_stale(request)
        if early is not None:
            return early
        self._heard_from(request.primary)
        if self.needs_full_resync:
            return self._answer(
                PushResult.PUSH_RESULT_HISTORY_MISMATCH,
                f"{self.full_resync_reason}; waiting for a full resync",
            )
        if not self._same_history(request.primary):
            protected = self._protect(request.primary)
            if protected or not await self._rewind_to_fork(request.primary):
                refused = protected or self.broken
                return self._answer(
                    PushResult.PUSH_RESULT_REFUSED if refused
                    else PushResult.PUSH_RESULT_HISTORY_MISMATCH,
                    refused or self._why_full_resync(),
                )  # fmt: skip
            # Rewound: now at the fork point, in a history the primary's continues.
        self.refused = self._behind(request.primary)
        if self.refused:
            return self._answer(PushResult.PUSH_RESULT_REFUSED, self.refused)
        if request.prev_revision != self.node.store.revision:
            return self._answer(
                PushResult.PUSH_RESULT_POSITION_MISMATCH,
                f"this replica is at revision {self.node.store.revision},"
                f" not {request.prev_revision}",
            )
        return None

    def _refused_or_stale(self, request: PushRequest) -> PushResponse | None:
        refusal = self._refusal(request.primary)
        if refusal:
            return self._answer(PushResult.PUSH_RESULT_REFUSED, refusal)
        if 0 < request.primary.sent_unix_ms < self._latest_sent_ms and (
            request.prev_revision != self.node.store.revision
        ):
            # A delayed or replayed push, older than one already handled: its view of
            # the primary is stale. Only the position is answered.
            return self._answer(PushResult.PUSH_RESULT_POSITION_MISMATCH, "a stale push")
        return None

    def _behind(self, primary: PrimaryInfo) -> str:
        """Same history, but the primary lost what this replica holds (restarted on an
        old data dir): never let it rewind us ("" when it is not behind)."""
        if primary.durable_revision >= self.node.store.revision:
            return ""
        if self.manager.force_next_sync:  # the operator decided: replace our data
            self.needs_full_resync = True
            self.full_resync_reason = "replicaof --force: replacing this replica's data"
            return ""
        return (
            f"the primary at {primary.url} is at revision {primary.durable_revision}, behind"
            f" this replica's {self.node.store.revision} in the same history: refusing to"
            " follow it (promote this replica, or replicaof --force after deciding; see"
            " docs/runbook.md, 'Replica ahead of its primary')"
        )

    def _protect(self, primary: PrimaryInfo) -> str:
        """Why this replica must not be overwritten by a diverging history ("" if it may).

        A node accepts a history that diverges from its own only from a higher
        epoch (a promotion), so an empty or stale primary never wipes a replica;
        `replicaof --force` overrides, and a digest mismatch asks for it.
        """
        state = self.manager.state
        if (
            primary.epoch > state.epoch
            or self.manager.force_next_sync
            or (not state.replication_id and self.node.store.revision == 0)
        ):
            self.refused = ""
            return ""
        self.refused = (
            f"the primary at {primary.url} (history {primary.replication_id}, epoch"
            f" {primary.epoch}) would replace this replica's data (history"
            f" {state.replication_id or '(restored)'}, revision {self.node.store.revision},"
            f" epoch {state.epoch}) without a higher epoch: refusing. Promote this replica,"
            " or point it there with `kvservice replicaof --force` after deciding"
            " (docs/runbook.md, 'Replica ahead of its primary')"
        )
        return self.refused

    def _digest_mismatch(self, request: PushRequest) -> PushResponse:
        self.digest_mismatches += 1
        self.digest_error = (
            f"state digest mismatch at revision {request.digest_revision}: this replica has"
            f" {self.node.store.digest:016x}, the primary {request.digest:016x}"
        )
        log.error(
            "state digest mismatch",
            extra={"revision": request.digest_revision, "replica_digest":
                   f"{self.node.store.digest:016x}", "primary_digest": f"{request.digest:016x}",
                   "repair": self.settings.repair_on_mismatch},
        )  # fmt: skip
        if self.settings.repair_on_mismatch:
            self.needs_full_resync = True
            self.full_resync_reason = f"{self.digest_error} (repair_on_mismatch)"
        return self._answer(PushResult.PUSH_RESULT_DIGEST_MISMATCH, self.digest_error)

    def _answer(self, result: PushResult, message: str) -> PushResponse:
        if message and result != PushResult.PUSH_RESULT_POSITION_MISMATCH:
            if message != self.last_error:  # once per reason, not once per push
                log.warning("replication push not applied", extra={"reason": message})
            self.last_error = message
        state = self.manager.state
        return PushResponse(
            result=result, revision=self.node.store.revision,
            durable_revision=self.node.wal.durable_revision,
            replication_id=state.replication_id, epoch=state.epoch, node_id=state.node_id,
            message=message, primary_url=self.primary_url,
            prev_replication_id="" if state.replication_id else state.prev_replication_id,
        )  # fmt: skip

    def _refusal(self, primary: PrimaryInfo) -> str:
        if self.manager.role != "replica":
            return "this node is a primary, not a replica"
        if primary.epoch < self.manager.state.epoch and not self.manager.force_next_sync:
            return (
                f"the pushing primary's epoch {primary.epoch} is lower than this replica's"
                f" {self.manager.state.epoch}: it is not the current primary"
            )
        followed = {self.configured_primary, self.advertised_primary}
        if self.configured_primary and primary.url and primary.url not in followed:
            return (
                f"this replica follows {self.configured_primary}, not {primary.url}"
                " (change primary_url to move it)"
            )
        return ""

    def _same_history(self, primary: PrimaryInfo) -> bool:
        mine = self.manager.state.replication_id
        if mine == primary.replication_id:
            return True
        if mine and mine == primary.prev_replication_id:
            # The primary's history continues ours (it was promoted): up to the
            # fork point they are the same.
            return self.node.store.revision <= primary.prev_end_revision
        if not mine and self.manager.state.prev_replication_id == primary.replication_id:
            # Restored from a backup of this very history: a prefix of it.
            return self.node.store.revision <= primary.durable_revision
        # A node with no history yet joins any (nothing of its own to lose).
        return not mine and self.node.store.revision == 0

    def _why_full_resync(self) -> str:
        if self.needs_full_resync:
            return self.full_resync_reason
        return (
            f"this replica is in history {self.manager.state.replication_id or '(none)'}"
            f" at revision {self.node.store.revision}; a full resync is needed"
        )

    # -- rewinding to the fork point ------------------------------------------------

    def _forked_from(self, primary: PrimaryInfo) -> bool:
        """The primary's history continues ours, but this node holds entries past the
        fork point (revision prev_end_revision) that the primary never received."""
        mine = self.manager.state.replication_id
        return (
            bool(mine)
            and mine == primary.prev_replication_id
            and self.node.store.revision > primary.prev_end_revision
        )

    async def _rewind_to_fork(self, primary: PrimaryInfo) -> bool:
        """Save the entries past the fork point to diverged/ and rewind this node to
        the fork point; True when done (a partial resync follows), False when a full
        resync is needed instead."""
        if self._rewinding is None:
            if not self._forked_from(primary):
                return False
            fork = primary.prev_end_revision
            self._rewinding = asyncio.create_task(self._rewind(fork), name="rewind")
        task = self._rewinding
        try:
            # Shielded: a push whose caller gave up (timeout) leaves the rewind running,
            # and the next push waits for the same one instead of starting another.
            return await asyncio.shield(task)
        finally:
            if task.done() and self._rewinding is task:
                self._rewinding = None

    async def _rewind(self, fork: int) -> bool:
        data_dir = self.settings.data_dir
        if self._incoming is not None:  # an older full resync's transfer: staging is ours now
            self._incoming.close()
            self._incoming = None
        await self._save_diverged(fork)
        started = time.monotonic()
        try:
            rewound = await self._stage_rewind(fork)
        except (CannotRewind, StorageError, OSError, ValueError) as exc:
            await asyncio.to_thread(discard_install, data_dir)
            self.needs_full_resync = True
            self.full_resync_reason = f"cannot rewind to the fork point at revision {fork}: {exc}"
            log.error("rewind to the fork point impossible: full resync instead",
                      extra={"fork_revision": fork, "reason": str(exc)})  # fmt: skip
            return False
        dropped = self.node.store.revision - fork
        # Past COMPLETE the switch must finish (a failure leaves it for the next start).
        try:
            await asyncio.shield(self._switch_to(rewound.store))
        except Exception as exc:
            self.broken = (
                f"a rewind to the fork point was staged but switching to it failed ({exc!r}):"
                " restart the node to finish it"
            )
            log.critical("rewind switch failed", extra={"error": repr(exc)})
            return False
        log.warning(
            "rewound to the fork point; resuming by partial resync",
            extra={"revision": fork, "entries_set_aside": dropped,
                   "base_snapshot_revision": rewound.base_revision,
                   "replayed": rewound.replayed, "keys": len(rewound.store),
                   "seconds": round(time.monotonic() - started, 3)},
        )  # fmt: skip
        return True

    async def _stage_rewind(self, fork: int) -> Rewound:
        """Rebuild this node's state at `fork` from its own files and stage it."""
        data_dir = self.settings.data_dir
        retention = self.node.snapshotter.retention
        # A snapshot meanwhile must not purge the WAL the rebuild reads.
        retention.hold("rewind", lambda: 0)
        try:
            rewound = await asyncio.to_thread(state_at, data_dir, fork)
        finally:
            retention.release("rewind")
        await asyncio.to_thread(stage_rewind, data_dir, rewound.store)
        return rewound

    async def _save_diverged(self, fork: int) -> None:
        """Entries past the fork point were never received by the new primary: keep
        them in diverged/ (the rewind or full resync that follows drops them) and
        say how many."""
        last = self.node.store.revision
        await self.node.wal.sync()  # every one of them is in the WAL file first
        path, count = await asyncio.to_thread(save_diverged, self.settings.data_dir, fork, last)
        log.error(
            "entries the new primary never received were moved aside",
            extra={"count": count, "after_revision": fork, "path": str(path),
                   "expected": last - fork},
        )  # fmt: skip

    async def _adopt(self, primary: PrimaryInfo) -> None:
        state = self.manager.state
        if state.replication_id != primary.replication_id or state.epoch != primary.epoch:
            await self.manager.save(state.with_history(primary.replication_id, primary.epoch))
            log.info(
                "replica joined the primary's history",
                extra={"replication_id": primary.replication_id, "epoch": primary.epoch},
            )

    def _heard_from(self, primary: PrimaryInfo) -> None:
        now = time.monotonic()
        if self.linked_state(now) == "unlinked":
            # Back from a restart or a lost link: not ready until caught up again (the
            # age of what is missing is unknown: it may be far older than the link).
            self.caught_up = False
        self.last_contact = now
        self._latest_sent_ms = max(self._latest_sent_ms, primary.sent_unix_ms)
        self.primary_revision = primary.durable_revision
        if primary.durable_revision > (self._reports[-1][0] if self._reports else 0):
            self._reports.append((primary.durable_revision, self.last_contact))
        if primary.url and primary.url != self.primary_url:
            self.primary_url = primary.url
            self.node.primary_url = self.configured_primary or primary.url
        if self.state == "unlinked":
            log.info("linked to the primary", extra={"primary": primary.url})
            self.state = "connecting"

    def _note_position(self) -> None:
        while self._reports and self._reports[0][0] <= self.node.store.revision:
            self._reports.popleft()
        if self.node.store.revision >= self.primary_revision:
            self.caught_up = True

    # -- full resync ----------------------------------------------------------------

    async def install(self, request: InstallSnapshotRequest) -> InstallSnapshotResponse:
        async with self.lock:
            refusal = self._install_refusal(request.primary)
            if refusal:
                self.last_error = refusal
                raise ReplicationRefused(refusal)
            self._heard_from(request.primary)
            data_dir = self.settings.data_dir
            if request.offset == 0 and not self._same_history(request.primary):
                protected = self._protect(request.primary)
                if protected:
                    raise ReplicationRefused(protected)
            if request.offset == 0:
                if self._incoming is not None:
                    self._incoming.close()
                self._incoming = await asyncio.to_thread(Incoming, data_dir, request.transfer_id)
                self.state = "full-sync"
                log.info(
                    "full resync started",
                    extra={"primary": request.primary.url, "revision": request.revision},
                )
            incoming = self._incoming
            if incoming is None or incoming.transfer_id != request.transfer_id:
                raise ReplicationRefused("no such snapshot transfer here; start again at offset 0")
            if request.offset != incoming.size:
                return InstallSnapshotResponse(next_offset=incoming.size)
            if request.data:
                await asyncio.to_thread(incoming.write, request.data)
            if not request.done:
                return InstallSnapshotResponse(next_offset=incoming.size)
            self._incoming = None
            try:
                snapshot = await self._stage(incoming, request)
            except BaseException:
                # Nothing live was touched: forget the transfer, keep serving old data.
                await asyncio.to_thread(discard_install, data_dir)
                self.state = "unlinked"
                raise
            # Past COMPLETE the switch must finish: shielded from cancellation (a
            # shutdown), and a failure leaves the staged install for the next start.
            try:
                await asyncio.shield(self._switch(snapshot, request))
            except Exception as exc:
                self.broken = (
                    f"a full resync was staged but switching to it failed ({exc!r}):"
                    " restart the node to finish it"
                )
                log.critical("full resync switch failed", extra={"error": repr(exc)})
                raise
            return InstallSnapshotResponse(
                next_offset=incoming.size, revision=self.node.store.revision
            )

    def _install_refusal(self, primary: PrimaryInfo) -> str:
        """Why a snapshot transfer is not taken now ("" when it is)."""
        if self._closing or self.broken:
            return self.broken or "this node is no longer a replica"
        if self._rewinding is not None:  # it stages in resync/ too
            return "rewinding to the fork point; try again"
        return self._refusal(primary)

    async def _stage(self, incoming: Incoming, request: InstallSnapshotRequest) -> LoadedSnapshot:
        """Verify the received snapshot (every record) and stage it (COMPLETE last)."""
        data_dir = self.settings.data_dir
        path = await asyncio.to_thread(incoming.finish)
        snapshot = await asyncio.to_thread(load_snapshot_as, path, request.revision)
        await asyncio.to_thread(stage_install, data_dir, path, snapshot.revision)
        return snapshot

    async def _switch(self, snapshot: LoadedSnapshot, request: InstallSnapshotRequest) -> None:
        """Switch the node to the staged snapshot: its history, its files, its store."""
        started = time.monotonic()
        # The new history is recorded once staged: a crash from here on finishes
        # the install at the next start, so state and data always agree.
        state = self.manager.state
        await self.manager.save(
            state.with_history(request.primary.replication_id, request.primary.epoch)
        )
        store = Store()
        store.load(snapshot.data, snapshot.revision, snapshot.digest)
        await self._switch_to(store)
        self.state = "streaming"
        self.needs_full_resync, self.digest_error = False, ""
        self.manager.force_next_sync = False  # used: the forced replacement happened
        log.info(
            "full resync installed",
            extra={"revision": snapshot.revision, "keys": len(store),
                   "load_seconds": round(time.monotonic() - started, 3)},
        )  # fmt: skip

    async def _switch_to(self, store: Store) -> None:
        """Put the staged files in place of the live ones and serve `store` (their
        state): the one switch of a full resync and of a rewind."""
        node = self.node
        await node.snapshotter.close()
        await node.wal.close()
        await asyncio.to_thread(finish_install, self.settings.data_dir)
        self.rebuild(store)
        self._note_position()

    # -- announcing -------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        """Until the primary pushes (heartbeats at least every repl_heartbeat_seconds),
        ask it to: so a replica joins with no change to the primary's config."""
        primary = self.configured_primary
        assert primary is not None
        quiet_after = max(3 * self.settings.repl_heartbeat_seconds, 1.0)
        peers = self.manager.peers
        async with ReplicationClient(
            primary, timeout_ms=5000, http_client=peers.http_client
        ) as client:
            while not self._closing:
                silent = self.last_contact is None or (
                    time.monotonic() - self.last_contact > quiet_after
                )
                if silent:
                    try:
                        reply = await client.announce(
                            AnnounceRequest(
                                replica_url=self.settings.own_url,
                                node_id=self.manager.state.node_id,
                            ),
                            headers=peers.headers,
                        )
                        self.advertised_primary = reply.primary_url
                    except (ConnectError, OSError) as exc:
                        if self._closing:
                            return
                        what = (
                            f"{exc.code.name.lower()}: {exc.message}"
                            if isinstance(exc, ConnectError) else str(exc)
                        )  # fmt: skip
                        self.last_error = f"announcing to {primary} failed: {what}"
                        log.warning("announce failed", extra={"primary": primary, "error": what})
                await asyncio.sleep(1.0)

    # -- status -------------------------------------------------------------------------

    def view(self) -> LinkView:
        now = time.monotonic()
        contact = now - self.last_contact if self.last_contact is not None else -1.0
        return LinkView(
            state=self.linked_state(now), primary_url=self.primary_url,
            last_contact_seconds=round(contact, 3), lag_seconds=round(self.lag_seconds(now), 3),
            primary_revision=self.primary_revision, last_error=self.last_error,
        )  # fmt: skip

    def linked_state(self, now: float) -> str:
        if self.state == "full-sync":
            return "full-sync"
        if (
            self.last_contact is None
            or now - self.last_contact > self.settings.replica_max_lag_seconds
        ):
            return "unlinked"
        return "streaming" if self.state == "streaming" else "unlinked"

    def lag_seconds(self, now: float) -> float:
        """How long ago the primary first reported a revision this replica still lacks
        (0 when it has everything reported); silence beyond a heartbeat counts too."""
        if self._reports:
            return now - self._reports[0][1]
        silence = now - self.last_contact if self.last_contact is not None else 0.0
        return max(0.0, silence - self.settings.repl_heartbeat_seconds)

    def readiness(self) -> str | None:
        """Why this replica is not ready (None when it is)."""
        problem = self.broken or self.digest_error or self.refused
        if problem:
            return problem
        now = time.monotonic()
        if not self.caught_up and self.linked_state(now) == "streaming":
            return (
                f"catching up: at revision {self.node.store.revision} of the primary's"
                f" {self.primary_revision}"
            )
        state = self.linked_state(now)
        if state == "full-sync":
            return "full resync in progress"
        if state != "streaming":
            heard = (
                "never heard from"
                if self.last_contact is None
                else f"not heard from for {now - self.last_contact:.1f} s"
            )
            return f"not linked to the primary ({self.primary_url or 'unknown'}: {heard})"
        lag = self.lag_seconds(now)
        if lag > self.settings.replica_max_lag_seconds:
            return f"lagging {lag:.1f} s behind the primary (replica_max_lag_seconds)"
        return None


def load_snapshot_as(path: Path, revision: int) -> LoadedSnapshot:
    """Load (verifying every record) a received snapshot that must hold `revision`."""
    snapshot = load_snapshot(path, check_name=False)
    if snapshot.revision != revision:
        raise ReplicationRefused(
            f"the snapshot holds revision {snapshot.revision}, the primary said {revision}"
        )
    return snapshot
