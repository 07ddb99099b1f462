"""grpc.health.v1.Health over Connect, answering from the same rule as /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from kvservice.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

ServingStatus = HealthCheckResponse.ServingStatus
SERVING = ServingStatus.SERVING
NOT_SERVING = ServingStatus.NOT_SERVING
# "" is the whole server; the KV service is the only one that can be unhealthy.
KNOWN_SERVICES = frozenset({"", "kvservice.v1.KVStore"})
WATCH_POLL_SECONDS = 1.0


class HealthService:
    """SERVING while the node is ready (recovered, accepting writes), else NOT_SERVING."""

    def __init__(self, is_ready: Callable[[], bool], is_stopping: Callable[[], bool]) -> None:
        self.is_ready = is_ready
        self.is_stopping = is_stopping

    def _status(self, request: HealthCheckRequest) -> ServingStatus:
        if request.service not in KNOWN_SERVICES:
            raise ConnectError(Code.NOT_FOUND, f"unknown service {request.service!r}")
        return SERVING if self.is_ready() else NOT_SERVING

    async def check(
        self, request: HealthCheckRequest, ctx: RequestContext[Any, Any]
    ) -> HealthCheckResponse:
        return HealthCheckResponse(status=self._status(request))

    async def watch(
        self, request: HealthCheckRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[HealthCheckResponse]:
        """Stream the status now and on every change (polled).

        Ends with the connection, or with NOT_SERVING once the node starts
        shutting down, so an open Watch never holds up a graceful shutdown.
        """
        last = None
        while True:
            status = self._status(request)
            if status != last:
                last = status
                yield HealthCheckResponse(status=status)
            if self.is_stopping():
                return
            await asyncio.sleep(WATCH_POLL_SECONDS)
