"""KVStore handlers: call the node, and turn domain errors into Connect errors.

This is the one place where kvservice errors become Connect codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from kvservice.digests import MAX_BUCKETS, bucket_digests
from kvservice.engine import Item
from kvservice.errors import (
    Compacted,
    ConditionFailed,
    FeedOverflow,
    InvalidArgument,
    KeyNotFound,
    KVError,
    NotACounter,
    NotEnoughReplicas,
    NotLinked,
    NotPrimary,
    PermissionDenied,
    ReplicasNotReached,
    ReplicationRefused,
    ResourceExhausted,
    RevisionNotReached,
    ShuttingDown,
    SnapshotFailed,
    StorageReplaced,
    Unauthenticated,
    WalFailed,
)
from kvservice.node import Node
from kvservice.replication.manager import ReplicationManager
from kvservice.scan import ScanLimits, read_page
from kvservice.storage.backup import backup_stream
from kvservice.v1.admin_pb2 import (
    BackupRequest,
    BackupResponse,
    DigestRequest,
    DigestResponse,
    FailoverRequest,
    FailoverResponse,
    KeyDigest,
    PromoteRequest,
    PromoteResponse,
    ReplicaLink,
    ReplicaOfRequest,
    ReplicaOfResponse,
    ReplicaStatus,
    ReplicationStatusRequest,
    ReplicationStatusResponse,
    SnapshotRequest,
    SnapshotResponse,
)
from kvservice.v1.kv_pb2 import (
    DeleteRequest,
    DeleteResponse,
    GetRequest,
    GetResponse,
    IncrementRequest,
    IncrementResponse,
    MGetRequest,
    MGetResponse,
    ScanRequest,
    ScanResponse,
    SetRequest,
    SetResponse,
    TouchRequest,
    TouchResponse,
    TxnRequest,
    TxnResponse,
    WatchRequest,
    WatchResponse,
)
from kvservice.watch import WatchHub

log = logging.getLogger("kvservice.service")
S = TypeVar("S")
Req = TypeVar("Req")
R = TypeVar("R")
Handler = Callable[[S, Req, RequestContext[Any, Any]], Coroutine[Any, Any, R]]
# The one map from domain errors to Connect codes (first match wins).
CODES: dict[type[KVError], Code] = {
    InvalidArgument: Code.INVALID_ARGUMENT,
    ConditionFailed: Code.ABORTED,
    KeyNotFound: Code.NOT_FOUND,
    NotACounter: Code.FAILED_PRECONDITION,
    ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    FeedOverflow: Code.RESOURCE_EXHAUSTED,
    Compacted: Code.OUT_OF_RANGE,
    NotPrimary: Code.FAILED_PRECONDITION,
    ReplicationRefused: Code.FAILED_PRECONDITION,
    RevisionNotReached: Code.DEADLINE_EXCEEDED,
    ReplicasNotReached: Code.DEADLINE_EXCEEDED,
    NotEnoughReplicas: Code.UNAVAILABLE,
    NotLinked: Code.UNAVAILABLE,
    WalFailed: Code.UNAVAILABLE,
    ShuttingDown: Code.UNAVAILABLE,
    SnapshotFailed: Code.UNAVAILABLE,
    StorageReplaced: Code.UNAVAILABLE,
    Unauthenticated: Code.UNAUTHENTICATED,
    PermissionDenied: Code.PERMISSION_DENIED,
}


def wait_budget(ctx: RequestContext[Any, Any], cap: float) -> float:
    """Seconds a handler may wait: `cap`, cut to the request's deadline less a margin
    (10 %, 20-200 ms) so the answer saying why reaches the client before it gives up."""
    deadline_ms = ctx.timeout_ms()
    if deadline_ms is None:
        return cap
    seconds = deadline_ms / 1000
    return max(0.0, min(cap, seconds - min(0.2, max(0.02, seconds / 10))))


def get_response(item: Item | None) -> GetResponse:
    if item is None:
        return GetResponse()
    return GetResponse(
        found=True, value=item.value, revision=item.revision, expires_at_ms=item.expires_at_ms
    )


def to_connect_error(exc: KVError) -> ConnectError:
    for kind, code in CODES.items():
        if isinstance(exc, kind):
            return ConnectError(code, str(exc))
    return ConnectError(Code.INTERNAL, str(exc))


def connect_errors(handler: Handler[S, Req, R]) -> Handler[S, Req, R]:
    """Map domain errors to Connect codes; log anything else and answer `internal`."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, ctx: RequestContext[Any, Any]) -> R:
        try:
            return await handler(self, request, ctx)
        except ConnectError:
            raise
        except KVError as exc:
            raise to_connect_error(exc) from None
        except Exception:
            log.exception("unexpected error", extra={"method": ctx.method().name})
            raise ConnectError(
                Code.INTERNAL, "internal error; the server log has the details"
            ) from None

    return wrapper


class AdminService:
    """Implements the generated `Admin` protocol: operator actions."""

    def __init__(self, node: Node, replication: ReplicationManager) -> None:
        self.node = node
        self.replication = replication

    @connect_errors
    async def replication_status(
        self, request: ReplicationStatusRequest, ctx: RequestContext[Any, Any]
    ) -> ReplicationStatusResponse:
        manager, node = self.replication, self.node
        state = manager.state
        reply = ReplicationStatusResponse(
            role=manager.role, node_id=state.node_id, replication_id=state.replication_id,
            epoch=state.epoch, revision=node.store.revision,
            durable_revision=node.wal.durable_revision,
            advertise_url=manager.settings.own_url,
            prev_replication_id=state.prev_replication_id,
            prev_end_revision=state.prev_end_revision, fenced=manager.fenced,
        )  # fmt: skip
        for view in manager.sender_views():
            reply.replicas.append(
                ReplicaStatus(
                    url=view.url,
                    state=view.state,
                    acked_revision=view.acked_revision,
                    lag_revisions=view.lag_revisions,
                    lag_seconds=view.lag_seconds,
                    last_error=view.last_error,
                    full_resyncs=view.full_resyncs,
                    partial_resyncs=view.partial_resyncs,
                )
            )
        link = manager.link_view()
        if link is not None:
            reply.link.CopyFrom(
                ReplicaLink(
                    primary_url=link.primary_url,
                    state=link.state,
                    last_contact_seconds=link.last_contact_seconds,
                    lag_seconds=link.lag_seconds,
                    primary_revision=link.primary_revision,
                    last_error=link.last_error,
                )
            )
        return reply

    @connect_errors
    async def snapshot(
        self, request: SnapshotRequest, ctx: RequestContext[Any, Any]
    ) -> SnapshotResponse:
        info = await self.node.snapshot()
        return SnapshotResponse(
            revision=info.revision, path=str(info.path), key_count=info.key_count
        )

    @connect_errors
    async def promote(
        self, request: PromoteRequest, ctx: RequestContext[Any, Any]
    ) -> PromoteResponse:
        state = await self.replication.promote()
        return PromoteResponse(
            replication_id=state.replication_id, epoch=state.epoch,
            revision=self.node.store.revision, prev_replication_id=state.prev_replication_id,
            prev_end_revision=state.prev_end_revision,
        )  # fmt: skip

    @connect_errors
    async def replica_of(
        self, request: ReplicaOfRequest, ctx: RequestContext[Any, Any]
    ) -> ReplicaOfResponse:
        url = request.primary_url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"primary_url {request.primary_url!r} is not a base URL")
        if url == self.replication.settings.own_url:
            raise InvalidArgument("a node cannot follow itself")
        previous = await self.replication.replica_of(url, force=request.force)
        return ReplicaOfResponse(primary_url=url, previous_role=previous)

    @connect_errors
    async def failover(
        self, request: FailoverRequest, ctx: RequestContext[Any, Any]
    ) -> FailoverResponse:
        done = await self.replication.failover(request.to, wait_budget(ctx, 60.0))
        return FailoverResponse(
            revision=done.revision, write_pause_ms=done.write_pause_ms,
            replication_id=done.replication_id, epoch=done.epoch,
            repointed=done.repointed, not_repointed=done.not_repointed,
        )  # fmt: skip

    async def backup(
        self, request: BackupRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[BackupResponse]:
        """A snapshot taken now, streamed in bounded chunks, then its SHA-256."""
        try:
            info = await self.node.snapshot()
        except KVError as exc:
            raise to_connect_error(exc) from None
        state = self.replication.state
        chunks = backup_stream(info.path, state.replication_id, state.epoch)
        digest = hashlib.sha256()
        size = 0
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            digest.update(chunk)
            size += len(chunk)
            yield BackupResponse(data=chunk)
        yield BackupResponse(revision=info.revision, sha256=digest.hexdigest(), size=size)

    @connect_errors
    async def digest(self, request: DigestRequest, ctx: RequestContext[Any, Any]) -> DigestResponse:
        if request.buckets > MAX_BUCKETS:
            raise InvalidArgument(f"buckets is at most {MAX_BUCKETS}")
        node = self.node
        if request.min_revision > node.store.revision:
            wait = wait_budget(ctx, self.replication.settings.min_revision_max_wait_ms / 1000)
            if not await node.wait_for_revision(request.min_revision, wait):
                raise RevisionNotReached(
                    f"this node is at revision {node.store.revision}, not {request.min_revision}"
                )
        store = node.store
        reply = DigestResponse(revision=store.revision, digest=store.digest)
        if request.buckets:
            # Copied in this step, so the buckets describe exactly that revision.
            data = dict(store.data)
            found = await asyncio.to_thread(
                bucket_digests, data, request.buckets, set(request.list_buckets)
            )
            reply.bucket_digests.extend(found.digests)
            for key, revision, term, bucket in found.keys:
                reply.keys.append(KeyDigest(key=key, revision=revision, hash=term, bucket=bucket))
        return reply


class KVStoreService:
    """Implements the generated `KVStore` protocol on top of a Node."""

    def __init__(
        self, node: Node, replication: ReplicationManager, watches: WatchHub | None = None
    ) -> None:
        self.node = node
        self.replication = replication
        self.watches = watches or WatchHub(node, replication.settings)
        self.max_wait = replication.settings.min_revision_max_wait_ms / 1000
        self.max_replica_wait = replication.settings.wait_replicas_max_wait_ms / 1000
        self.scan_limits = ScanLimits(
            replication.settings.scan_max_bytes, node.limits.max_key_bytes
        )

    @connect_errors
    async def get(self, request: GetRequest, ctx: RequestContext[Any, Any]) -> GetResponse:
        if request.min_revision > self.node.store.revision:
            await self._wait_for(request.min_revision, ctx)
        return get_response(self.node.item(request.key))

    @connect_errors
    async def m_get(self, request: MGetRequest, ctx: RequestContext[Any, Any]) -> MGetResponse:
        if request.min_revision > self.node.store.revision:
            await self._wait_for(request.min_revision, ctx)
        revision, items = self.node.mget(list(request.keys))
        return MGetResponse(revision=revision, items=[get_response(item) for item in items])

    async def _wait_for(self, revision: int, ctx: RequestContext[Any, Any]) -> None:
        """Read-your-writes: wait until applied, within the deadline; never a stale answer."""
        wait = wait_budget(ctx, self.max_wait)
        if await self.node.wait_for_revision(revision, wait):
            return
        reason = self.replication.not_ready()
        if reason is not None:
            raise NotLinked(f"revision {revision} not reached: {reason}")
        raise RevisionNotReached(
            f"this node is at revision {self.node.store.revision}; revision {revision} was not"
            f" reached within {wait * 1000:.0f} ms (min_revision_max_wait_ms or the deadline)"
        )

    @connect_errors
    async def set(self, request: SetRequest, ctx: RequestContext[Any, Any]) -> SetResponse:
        self.replication.check_writable()
        revision = await self.node.set(
            request.key,
            request.value,
            request.ttl_ms,
            request.if_revision if request.HasField("if_revision") else None,
        )
        await self._replicated(revision, request.wait_replicas, ctx)
        return SetResponse(revision=revision)

    @connect_errors
    async def delete(self, request: DeleteRequest, ctx: RequestContext[Any, Any]) -> DeleteResponse:
        self.replication.check_writable()
        deleted, revision = await self.node.delete(
            request.key, request.if_revision if request.HasField("if_revision") else None
        )
        if deleted:
            await self._replicated(revision, request.wait_replicas, ctx)
        return DeleteResponse(deleted=deleted, revision=revision)

    @connect_errors
    async def touch(self, request: TouchRequest, ctx: RequestContext[Any, Any]) -> TouchResponse:
        self.replication.check_writable()
        revision, expires = await self.node.touch(
            request.key,
            request.ttl_ms,
            request.if_revision if request.HasField("if_revision") else None,
        )
        await self._replicated(revision, request.wait_replicas, ctx)
        return TouchResponse(revision=revision, expires_at_ms=expires)

    @connect_errors
    async def increment(
        self, request: IncrementRequest, ctx: RequestContext[Any, Any]
    ) -> IncrementResponse:
        self.replication.check_writable()
        value, revision = await self.node.increment(request.key, request.delta, request.ttl_ms)
        await self._replicated(revision, request.wait_replicas, ctx)
        return IncrementResponse(value=value, revision=revision)

    @connect_errors
    async def txn(self, request: TxnRequest, ctx: RequestContext[Any, Any]) -> TxnResponse:
        self.replication.check_writable()
        before = self.node.store.revision
        succeeded, revision, results = await self.node.txn(
            list(request.conditions), list(request.success), list(request.failure)
        )
        if revision != before:
            await self._replicated(revision, request.wait_replicas, ctx)
        return TxnResponse(succeeded=succeeded, revision=revision, results=results)

    async def _replicated(self, revision: int, wanted: int, ctx: RequestContext[Any, Any]) -> None:
        """wait_replicas: hold the answer until that many replicas made it durable."""
        if wanted == 0:
            return
        wait = wait_budget(ctx, self.max_replica_wait)
        got = await self.replication.wait_for_replicas(revision, wanted, wait)
        if got < wanted:
            raise ReplicasNotReached(
                f"the write is committed at revision {revision} on the primary, but only {got}"
                f" of the {wanted} replicas asked for acknowledged it within {wait * 1000:.0f} ms"
            )

    @connect_errors
    async def scan(self, request: ScanRequest, ctx: RequestContext[Any, Any]) -> ScanResponse:
        if request.min_revision > self.node.store.revision:
            await self._wait_for(request.min_revision, ctx)
        # The first Scan builds the key index, in steps (other requests run between).
        while not (store := self.node.store).key_index.built:
            await store.key_index.ready()  # (again if a snapshot install replaced it)
        # No await from here on: the whole page is read at one revision.
        return read_page(store, request, self.scan_limits)

    async def watch(
        self, request: WatchRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncGenerator[WatchResponse, None]:
        """Server streaming (kvservice/watch.py): ends with an error saying where to resume."""
        try:
            async with contextlib.aclosing(self.watches.stream(request)) as responses:
                async for response in responses:
                    yield response
        except KVError as exc:
            raise to_connect_error(exc) from None
        except Exception:
            log.exception("unexpected error", extra={"method": "Watch"})
            raise ConnectError(
                Code.INTERNAL, "internal error; the server log has the details"
            ) from None
