"""The node's replication role and the parts that play it.

One object per node: the persisted replication state, the role, and either
the primary's senders (one per replica) or the replica's side. The API layer
(replication service, admin RPCs, readiness, write guarantees) asks it;
nothing below the node knows it exists.

Roles change at run time: Promote makes a replica a primary (new history,
epoch + 1, the old history remembered for partial resyncs); ReplicaOf makes
any node follow a primary. Both persist the new role before acting on it. A
primary that meets a higher epoch (a replica's answer) is fenced: it stops
taking writes at once and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace

from connectrpc.errors import ConnectError

from kvservice.config import Settings
from kvservice.errors import (
    NotEnoughReplicas,
    NotPrimary,
    ReplicasNotReached,
    ReplicationRefused,
)
from kvservice.node import Node
from kvservice.peers import Peers
from kvservice.replication.primary import Sender
from kvservice.replication.replica import LinkView, Rebuild, ReplicaSide
from kvservice.replication.state import ReplicationState, new_id, save_state
from kvservice.v1.admin_connect import AdminClient
from kvservice.v1.admin_pb2 import PromoteRequest, ReplicaOfRequest, ReplicationStatusRequest

log = logging.getLogger("kvservice.replication")


@dataclass(frozen=True)
class FailoverResult:
    revision: int
    write_pause_ms: float
    replication_id: str
    epoch: int
    repointed: list[str]
    not_repointed: list[str]


@dataclass(frozen=True)
class SenderView:
    url: str
    state: str
    connected: bool
    acked_revision: int
    lag_revisions: int
    lag_seconds: float
    last_error: str
    full_resyncs: int
    partial_resyncs: int
    retries: int


class ReplicationManager:
    def __init__(
        self,
        settings: Settings,
        state: ReplicationState,
        node: Node,
        rebuild: Rebuild,
        peers: Peers | None = None,
    ) -> None:
        self.settings = settings
        # Token and TLS for calls to other nodes (peers.py).
        self.peers = peers or Peers()
        self.state = state
        self.node = node
        # A role set at run time (Promote, ReplicaOf) wins over the configured one.
        self.role = state.role or settings.role
        self.primary_url = state.primary_url or settings.primary_url or ""
        self.senders: dict[str, Sender] = {}
        self.replica: ReplicaSide | None = None
        self.fenced = state.fenced if self.role == "primary" else ""
        # The replica a planned switchover hands over to (writes refused meanwhile).
        self.switching_to = ""
        self.force_next_sync = False
        self._rebuild = rebuild
        self._ack_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._ack_moved = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._past_mismatches = 0
        self.sync_node_role()

    def sync_node_role(self) -> None:
        self.node.role = "fenced" if self.fenced else self.role
        self.node.primary_url = self.primary_url or None
        # The WAL kept behind the snapshots for returning replicas: a primary's job.
        retention = self.node.snapshotter.retention
        retention.keep_bytes = self.settings.repl_backlog_bytes if self.role == "primary" else 0

    async def start(self) -> None:
        if self.role == "primary":
            if not self.state.replication_id:
                # A primary's first start makes its history.
                await self.save(self.state.with_history(new_id(), self.state.epoch))
                log.info("new replication history",
                         extra={"replication_id": self.state.replication_id})  # fmt: skip
            for url in self.settings.replicas:
                self.add_replica(url)
        else:
            self.replica = ReplicaSide(self, self.node, self._rebuild, self.primary_url or None)
            self.replica.start()

    async def close(self) -> None:
        await self._stop_parts()
        for _, _, future in self._ack_waiters:
            if not future.done():
                future.cancel()

    async def _stop_parts(self) -> None:
        senders, self.senders = list(self.senders.values()), {}
        await asyncio.gather(*(sender.close() for sender in senders))
        if self.replica is not None:
            replica, self.replica = self.replica, None
            self._past_mismatches += replica.digest_mismatches
            async with replica.lock:  # a push or install in flight finishes first
                await replica.close()

    async def save(self, state: ReplicationState) -> None:
        """Persist the state durably, then use it."""
        await asyncio.to_thread(save_state, self.settings.data_dir, state)
        self.state = state

    # -- roles ----------------------------------------------------------------------

    async def promote(self) -> ReplicationState:
        """Replica -> primary: a new history that continues this node's (epoch + 1)."""
        if self.role == "primary":
            if self.fenced:
                # Its epoch + 1 could equal the newer primary's: two primaries.
                raise ReplicationRefused(
                    f"{self.fenced}; point this node at the new primary (replicaof) instead"
                )
            return self.state
        await self._stop_parts()
        state = self.state
        promoted = replace(
            state, replication_id=new_id(), epoch=state.epoch + 1,
            prev_replication_id=state.replication_id,
            prev_end_revision=self.node.store.revision, role="primary", primary_url="",
            fenced="",
        )  # fmt: skip
        await self.save(promoted)  # before the first write it accepts
        self.role, self.primary_url, self.fenced = "primary", "", ""
        self.sync_node_role()
        log.warning(
            "promoted to primary",
            extra={"replication_id": promoted.replication_id, "epoch": promoted.epoch,
                   "prev_replication_id": promoted.prev_replication_id,
                   "prev_end_revision": promoted.prev_end_revision},
        )  # fmt: skip
        for url in self.settings.replicas:
            self.add_replica(url)
        return promoted

    async def replica_of(self, primary_url: str, *, force: bool) -> str:
        """Follow `primary_url` from now on; return the role this node had."""
        previous = self.role
        await self._stop_parts()
        await self.save(replace(self.state, role="replica", primary_url=primary_url, fenced=""))
        self.role, self.primary_url, self.fenced = "replica", primary_url, ""
        self.force_next_sync = force
        self.sync_node_role()
        log.warning("now a replica", extra={"primary": primary_url, "was": previous,
                                            "force": force})  # fmt: skip
        self.replica = ReplicaSide(self, self.node, self._rebuild, primary_url)
        self.replica.start()
        return previous

    def fence(self, epoch: int, newer_primary: str) -> None:
        """A higher epoch exists: this primary stops taking writes at once."""
        if self.role != "primary" or epoch <= self.state.epoch or self.fenced:
            return
        where = f" at {newer_primary}" if newer_primary else ""
        self.fenced = (
            f"fenced: a newer primary{where} (epoch {epoch} > {self.state.epoch}) exists;"
            " this node takes no writes (see docs/runbook.md, 'Fenced primary')"
        )
        self.node.role = "fenced"
        self.node.primary_url = newer_primary or None
        log.critical("fenced by a higher epoch", extra={"epoch": epoch, "primary": newer_primary})
        # Remembered across a restart (until Promote or ReplicaOf).
        fenced = replace(self.state, fenced=self.fenced)
        task = asyncio.get_running_loop().create_task(self.save(fenced), name="persist fence")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def add_replica(self, url: str) -> bool:
        """Start pushing to `url` (configured, or a replica that announced itself)."""
        url = url.rstrip("/")
        if url in self.senders:
            self.senders[url].wake()
            return False
        if self.role != "primary" or self.fenced or url == self.settings.own_url:
            return False
        sender = Sender(self, self.node, url)
        self.senders[url] = sender
        sender.start()
        log.info("replica added", extra={"replica": url})
        return True

    # -- write guarantees -------------------------------------------------------------

    def check_writable(self) -> None:
        """Before a client write: refused during a switchover or below min_replicas."""
        if self.switching_to:
            raise NotPrimary(self.switching_to, "a planned switchover is in progress")
        self._check_min_replicas()

    def _check_min_replicas(self) -> None:
        """min_replicas: refuse a write while too few replicas are healthy."""
        wanted = self.settings.min_replicas
        if wanted == 0 or self.role != "primary":
            return
        max_lag = self.settings.min_replicas_max_lag_seconds
        healthy = len({
            s.peer_id or s.url for s in self.senders.values()
            if s.connected and s.lag_seconds() <= max_lag
        })  # fmt: skip
        if healthy < wanted:
            raise NotEnoughReplicas(
                f"{healthy} healthy replicas, min_replicas is {wanted} (a replica is healthy"
                f" when connected and less than {max_lag} s behind): this primary takes no"
                " writes that could be lost with it"
            )

    async def failover(self, to: str, seconds: float) -> FailoverResult:
        """Planned switchover to replica `to`: no acknowledged write is lost."""
        to = to.rstrip("/")
        if self.role != "primary" or self.fenced:
            raise ReplicationRefused("a switchover starts on the current primary")
        sender = self.senders.get(to)
        if sender is None:
            known = ", ".join(self.senders) or "none"
            raise ReplicationRefused(f"{to} is not a replica of this primary (replicas: {known})")
        if self.switching_to:
            raise ReplicationRefused(f"a switchover to {self.switching_to} is already under way")
        self.switching_to = to
        paused = time.monotonic()
        target = self.node.store.revision
        if not await self.wait_for_replicas_at(sender, target, seconds):
            self.switching_to = ""  # nothing changed anywhere: writes resume here
            raise ReplicasNotReached(
                f"{to} did not make revision {target} durable within {seconds:.0f} s"
                f" (it has {sender.acked}); writes resumed here"
            )
        try:
            async with self.admin_client(to, 30_000) as admin:
                promoted = await admin.promote(PromoteRequest(), headers=self.peers.headers)
        except (ConnectError, OSError) as exc:
            await self._after_failed_promote(to, exc)
            raise
        pause_ms = (time.monotonic() - paused) * 1000
        others = [url for url in self.senders if url != to]
        await self.replica_of(to, force=False)
        repointed, failed = [self.settings.own_url], []
        for url in others:
            try:
                async with self.admin_client(url, 10_000) as admin:
                    request = ReplicaOfRequest(primary_url=to)
                    await admin.replica_of(request, headers=self.peers.headers)
                repointed.append(url)
            except (ConnectError, OSError) as exc:
                log.error("could not repoint a replica", extra={"replica": url, "error": str(exc)})
                failed.append(url)
        self.switching_to = ""
        log.warning(
            "planned switchover done",
            extra={"to": to, "revision": target, "write_pause_ms": round(pause_ms, 1)},
        )
        return FailoverResult(target, pause_ms, promoted.replication_id, promoted.epoch,
                              repointed, failed)  # fmt: skip

    async def _after_failed_promote(self, to: str, exc: BaseException) -> None:
        """The promotion call failed, but `to` may have promoted itself all the same
        (a timeout, a dropped answer): resume writes only if it certainly did not."""
        try:
            async with self.admin_client(to, 5_000) as admin:
                status = await admin.replication_status(
                    ReplicationStatusRequest(), headers=self.peers.headers
                )
        except (ConnectError, OSError):
            # Unknown: keep refusing writes (switching_to stays set); the operator
            # checks `to` and runs replicaof or promote (docs/runbook.md).
            log.error("switchover outcome unknown: writes stay refused here",
                      extra={"to": to, "error": str(exc)})  # fmt: skip
            return
        if status.role == "primary" and status.epoch > self.state.epoch:
            self.fence(status.epoch, to)
        else:
            self.switching_to = ""

    def admin_client(self, url: str, timeout_ms: int) -> AdminClient:
        return AdminClient(url, timeout_ms=timeout_ms, http_client=self.peers.http_client)

    async def wait_for_replicas_at(self, sender: Sender, revision: int, seconds: float) -> bool:
        """Wait until this one replica made `revision` durable (False after `seconds`)."""
        deadline = time.monotonic() + seconds
        while sender.acked < revision:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._ack_moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_moved.wait(), left)
        return True

    def acked_by(self, revision: int) -> int:
        """Distinct replicas (by node id: one replica may be known by two URLs) that
        made `revision` durable."""
        return len({s.peer_id or s.url for s in self.senders.values() if s.acked >= revision})

    async def wait_for_replicas(self, revision: int, count: int, seconds: float) -> int:
        """Wait until `count` replicas made `revision` durable; return how many did."""
        if self.acked_by(revision) >= count:
            return self.acked_by(revision)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (revision, count, future)
        self._ack_waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(future), seconds)
        except TimeoutError:
            pass
        finally:
            self._ack_waiters.remove(waiter)
        return self.acked_by(revision)

    def note_ack(self) -> None:
        """A sender's acknowledged revision moved: wake the writes it satisfies."""
        self._ack_moved.set()
        for revision, count, future in self._ack_waiters:
            if not future.done() and self.acked_by(revision) >= count:
                future.set_result(None)

    # -- status -----------------------------------------------------------------------

    def sender_views(self) -> list[SenderView]:
        return [
            SenderView(
                url=s.url,
                state=s.state,
                connected=s.connected,
                acked_revision=s.acked,
                lag_revisions=s.lag_revisions(),
                lag_seconds=round(s.lag_seconds(), 3),
                last_error=s.last_error,
                full_resyncs=s.full_resyncs,
                partial_resyncs=s.partial_resyncs,
                retries=s.retries,
            )
            for s in self.senders.values()
        ]

    @property
    def digest_mismatches(self) -> int:
        """Mismatches seen by this node as a replica (kept across role changes)."""
        current = self.replica.digest_mismatches if self.replica is not None else 0
        return self._past_mismatches + current

    def link_view(self) -> LinkView | None:
        return self.replica.view() if self.replica is not None else None

    def not_ready(self) -> str | None:
        """Why this node should not take traffic for its role (None when it should)."""
        if self.fenced:
            return self.fenced
        if self.replica is not None:
            return self.replica.readiness()
        return None
