"""The node's replication role and the parts that play it.

One object per node: the persisted replication state, the role, and either
the primary's senders (one per replica) or the replica's side. The API layer
(replication service, admin status, readiness) asks it; nothing below the
node knows it exists.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from kvservice.config import Settings
from kvservice.node import Node
from kvservice.replication.primary import Sender
from kvservice.replication.replica import LinkView, Rebuild, ReplicaSide
from kvservice.replication.state import ReplicationState, new_id, save_state

log = logging.getLogger("kvservice.replication")


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
        self, settings: Settings, state: ReplicationState, node: Node, rebuild: Rebuild
    ) -> None:
        self.settings = settings
        self.state = state
        self.node = node
        self.role = settings.role
        self.senders: dict[str, Sender] = {}
        self.replica: ReplicaSide | None = None
        self._rebuild = rebuild
        node.role = self.role

    async def start(self) -> None:
        if self.role == "primary":
            if not self.state.replication_id:
                # A primary's first start makes its history.
                await self.save(self.state.with_history(new_id(), self.state.epoch))
                log.info("new replication history", extra={"replication_id":
                                                            self.state.replication_id})  # fmt: skip
            for url in self.settings.replicas:
                self.add_replica(url)
        else:
            self.replica = ReplicaSide(self, self.node, self._rebuild)
            self.replica.start()

    async def close(self) -> None:
        await asyncio.gather(*(sender.close() for sender in self.senders.values()))
        self.senders.clear()
        if self.replica is not None:
            await self.replica.close()

    async def save(self, state: ReplicationState) -> None:
        """Persist the state durably, then use it."""
        await asyncio.to_thread(save_state, self.settings.data_dir, state)
        self.state = state

    def add_replica(self, url: str) -> bool:
        """Start pushing to `url` (configured, or a replica that announced itself)."""
        url = url.rstrip("/")
        if url in self.senders:
            self.senders[url].wake()
            return False
        if self.role != "primary" or url == self.settings.own_url:
            return False
        sender = Sender(self, self.node, url)
        self.senders[url] = sender
        sender.start()
        log.info("replica added", extra={"replica": url})
        return True

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

    def link_view(self) -> LinkView | None:
        return self.replica.view() if self.replica is not None else None

    def not_ready(self) -> str | None:
        """Why this node should not take traffic for its role (None when it should)."""
        if self.replica is not None:
            return self.replica.readiness()
        return None

    def linked(self) -> bool:
        return self.replica is None or self.replica.readiness() is None
