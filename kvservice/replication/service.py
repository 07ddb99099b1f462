"""The `kvservice.v1.Replication` Connect service: node-to-node calls."""

from __future__ import annotations

from typing import Any

from connectrpc.request import RequestContext

from kvservice.errors import ReplicationRefused
from kvservice.replication.manager import ReplicationManager
from kvservice.replication.replica import ReplicaSide
from kvservice.service import connect_errors
from kvservice.v1.replication_pb2 import (
    AnnounceRequest,
    AnnounceResponse,
    InstallSnapshotRequest,
    InstallSnapshotResponse,
    PushRequest,
    PushResponse,
    PushResult,
)


class ReplicationService:
    def __init__(self, manager: ReplicationManager) -> None:
        self.manager = manager

    def _replica(self) -> ReplicaSide:
        if self.manager.replica is None:
            raise ReplicationRefused("this node is a primary; it takes no pushes")
        return self.manager.replica

    @connect_errors
    async def push(self, request: PushRequest, ctx: RequestContext[Any, Any]) -> PushResponse:
        manager = self.manager
        if manager.replica is None:
            # Answered, not raised: the pusher reads our epoch from it and, if it is
            # an older primary, fences itself (the node it promoted tells it so).
            state = manager.state
            return PushResponse(
                result=PushResult.PUSH_RESULT_REFUSED, epoch=state.epoch,
                replication_id=state.replication_id, node_id=state.node_id,
                revision=manager.node.store.revision, primary_url=manager.settings.own_url,
                message="this node is a primary; it takes no pushes",
            )  # fmt: skip
        return await manager.replica.push(request)

    @connect_errors
    async def install_snapshot(
        self, request: InstallSnapshotRequest, ctx: RequestContext[Any, Any]
    ) -> InstallSnapshotResponse:
        return await self._replica().install(request)

    @connect_errors
    async def announce(
        self, request: AnnounceRequest, ctx: RequestContext[Any, Any]
    ) -> AnnounceResponse:
        manager = self.manager
        if manager.role != "primary":
            raise ReplicationRefused(
                f"this node is a replica; announce to its primary ({manager.node.primary_url})"
            )
        if not request.replica_url.startswith(("http://", "https://")):
            raise ReplicationRefused(f"{request.replica_url!r} is not a base URL")
        manager.add_replica(request.replica_url)
        state = manager.state
        return AnnounceResponse(
            primary_url=manager.settings.own_url, replication_id=state.replication_id,
            epoch=state.epoch,
        )  # fmt: skip
