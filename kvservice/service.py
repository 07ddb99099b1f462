"""KVStore handlers: call the node, and turn domain errors into Connect errors.

This is the one place where kvservice errors become Connect codes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from kvservice.errors import (
    InvalidArgument,
    KVError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from kvservice.node import Node
from kvservice.v1.admin_pb2 import SnapshotRequest, SnapshotResponse
from kvservice.v1.kv_pb2 import (
    DeleteRequest,
    DeleteResponse,
    GetRequest,
    GetResponse,
    SetRequest,
    SetResponse,
)

log = logging.getLogger("kvservice.service")
S = TypeVar("S")
Req = TypeVar("Req")
R = TypeVar("R")
Handler = Callable[[S, Req, RequestContext[Any, Any]], Coroutine[Any, Any, R]]
CODES: dict[type[KVError], Code] = {
    InvalidArgument: Code.INVALID_ARGUMENT,
    ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    Unavailable: Code.UNAVAILABLE,
    Unauthenticated: Code.UNAUTHENTICATED,
    PermissionDenied: Code.PERMISSION_DENIED,
}


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

    def __init__(self, node: Node) -> None:
        self.node = node

    @connect_errors
    async def snapshot(
        self, request: SnapshotRequest, ctx: RequestContext[Any, Any]
    ) -> SnapshotResponse:
        info = await self.node.snapshot()
        if info is None:
            raise Unavailable("the snapshot failed; the server log has the reason")
        return SnapshotResponse(
            revision=info.revision, path=str(info.path), key_count=info.key_count
        )


class KVStoreService:
    """Implements the generated `KVStore` protocol on top of a Node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    @connect_errors
    async def get(self, request: GetRequest, ctx: RequestContext[Any, Any]) -> GetResponse:
        found = self.node.get(request.key)
        if found is None:
            return GetResponse()
        value, revision = found
        return GetResponse(found=True, value=value, revision=revision)

    @connect_errors
    async def set(self, request: SetRequest, ctx: RequestContext[Any, Any]) -> SetResponse:
        return SetResponse(revision=await self.node.set(request.key, request.value))

    @connect_errors
    async def delete(self, request: DeleteRequest, ctx: RequestContext[Any, Any]) -> DeleteResponse:
        deleted, revision = await self.node.delete(request.key)
        return DeleteResponse(deleted=deleted, revision=revision)
