"""The Starlette application: the KVStore Connect service, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvservice import codec
from kvservice.compression import BoundedGzip
from kvservice.health.v1 import health_pb2
from kvservice.health.v1.health_connect import HealthASGIApplication
from kvservice.healthcheck import HealthService
from kvservice.metrics import RpcMetricsMiddleware
from kvservice.replication.service import ReplicationService
from kvservice.security import Security
from kvservice.service import AdminService, KVStoreService
from kvservice.v1 import admin_pb2, kv_pb2
from kvservice.v1.admin_connect import AdminASGIApplication
from kvservice.v1.kv_connect import KVStoreASGIApplication
from kvservice.v1.replication_connect import ReplicationASGIApplication
from kvservice.watch import WatchHub

if TYPE_CHECKING:
    from kvservice.config import Settings
    from kvservice.metrics import ASGIApp, Metrics, Receive, Scope, Send
    from kvservice.node import Node
    from kvservice.replication.manager import ReplicationManager

# Room for the key, the protobuf/JSON framing and base64 (4/3) around a value.
REQUEST_OVERHEAD_BYTES = 16 * 1024


def _method_names(service: str) -> frozenset[str]:
    return frozenset(m.name for m in kv_pb2.DESCRIPTOR.services_by_name[service].methods)


def _streaming_method_names(service: str) -> frozenset[str]:
    methods = kv_pb2.DESCRIPTOR.services_by_name[service].methods
    return frozenset(m.name for m in methods if m.server_streaming or m.client_streaming)


def _get_paths() -> frozenset[str]:
    """Paths of the methods marked NO_SIDE_EFFECTS: only these may be sent as HTTP GET.

    connect-python serves GET for any unary method; without this a plain link
    (an <img> on any web page) could call Set or Admin/Snapshot.
    """
    return frozenset(
        f"/{service.full_name}/{m.name}"
        for file in (kv_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR)
        for service in file.services_by_name.values()
        for m in service.methods
        if m.GetOptions().idempotency_level == m.GetOptions().NO_SIDE_EFFECTS
    )


class RequestGuard:
    """Refuses what connect-python would accept unchecked: bodies over the limit
    (before they are read into memory) and HTTP GET of methods with side effects."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.get_paths = _get_paths()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "GET" and scope["path"] not in self.get_paths:
                await _connect_error(send, 405, "unimplemented", "this method needs HTTP POST")
                return
            for name, value in scope["headers"]:
                # httptools has already rejected a non-numeric Content-Length.
                if name == b"content-length" and value.isdigit():
                    size = int(value)
                    if size > self.max_body_bytes:
                        await _connect_error(
                            send, 429, "resource_exhausted",
                            f"request body is {size} bytes; the limit is {self.max_body_bytes}"
                            f" (max_value_bytes x 4/3 + {REQUEST_OVERHEAD_BYTES})",
                        )  # fmt: skip
                        return
        await self.app(scope, receive, send)


class ConnectMounts:
    """Hands Connect RPC paths (`/<package.Service>/<Method>`) straight to their service.

    It runs as a Starlette middleware, ahead of Starlette's exception
    middleware and router, which do nothing for a Connect app (it answers its
    own errors) but cost a sixth of a small request's time.
    """

    def __init__(self, app: ASGIApp, mounts: dict[str, ASGIApp]) -> None:
        self.app = app
        self.mounts = mounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            end = path.find("/", 1)
            target = self.mounts.get(path[:end]) if end > 0 else None
            if target is not None:
                await target(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _connect_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(
    node: Node, settings: Settings, metrics: Metrics, replication: ReplicationManager
) -> Starlette:
    """Build the ASGI app serving `node`; the lifespan starts and closes the node."""
    codec.install()
    max_body = settings.max_value_bytes * 4 // 3 + REQUEST_OVERHEAD_BYTES
    security = Security(settings, metrics.security)
    watches = WatchHub(node, settings, on_too_slow=metrics.watch_too_slow.inc)
    metrics.watch_streams.set_function(lambda: watches.streams)
    kv = KVStoreASGIApplication(
        KVStoreService(node, replication, watches), read_max_bytes=max_body,
        compressions=[BoundedGzip(max_body)], interceptors=security.interceptors(),
    )  # fmt: skip
    # Small requests only: their messages have no value field.
    small = REQUEST_OVERHEAD_BYTES
    admin = AdminASGIApplication(
        AdminService(node, replication), read_max_bytes=small, compressions=[BoundedGzip(small)]
    )
    # A push carries a batch (or one entry larger than a batch); a snapshot piece a batch.
    repl_body = (
        max(settings.repl_batch_max_bytes, settings.max_value_bytes + settings.max_key_bytes)
        + REQUEST_OVERHEAD_BYTES
    )
    repl = ReplicationASGIApplication(
        ReplicationService(replication), read_max_bytes=repl_body,
        compressions=[BoundedGzip(repl_body)],
    )  # fmt: skip
    health = HealthASGIApplication(
        HealthService(
            lambda: readiness(node, replication)[0], lambda: node.draining or node.closed
        ),
        read_max_bytes=small,
        compressions=[BoundedGzip(small)],
    )
    rpc: ASGIApp = RpcMetricsMiddleware(
        RequestGuard(kv, max_body),
        metrics,
        kv.path + "/",
        methods=_method_names("KVStore"),
        streaming=_streaming_method_names("KVStore"),
        log_access=settings.access_log,
    )

    async def healthz(_: Request) -> Response:
        # The pid tells an operator (and the tests) which process answered.
        return JSONResponse({"status": "ok", "pid": os.getpid()})

    async def readyz(_: Request) -> Response:
        ready, body = readiness(node, replication)
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_endpoint(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        node.start()
        watches.start()
        await replication.start()
        try:
            yield
        except asyncio.CancelledError:
            # A second signal forced the exit and the loop is cancelling what is
            # left: no drain, but still fsync and close the WAL. Not re-raised, so
            # Starlette does not log a forced exit as a crash.
            node.close_sync()
            return
        watches.close()  # (already ended at the first signal: server.py)
        await replication.close()
        await node.close()

    connect_mounts: dict[str, ASGIApp] = {
        kv.path: rpc,
        health.path: RequestGuard(health, small),
        admin.path: RequestGuard(admin, small),
        repl.path: RequestGuard(repl, repl_body),
    }
    app = Starlette(
        middleware=[
            *_cors(settings.cors_origins),
            *security.middleware(),
            Middleware(ConnectMounts, mounts=connect_mounts),
        ],
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
        ],
        lifespan=lifespan,
    )
    app.state.security = security  # reloaded on SIGHUP (security.harden)
    app.state.watches = watches  # ended at the first shutdown signal (server.py)
    return app


def _cors(origins: tuple[str, ...]) -> list[Middleware]:
    """CORS for browser clients, with the headers the Connect protocol uses."""
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=[
                "Content-Type", "Connect-Protocol-Version", "Connect-Timeout-Ms",
                "Connect-Accept-Encoding", "Connect-Content-Encoding", "Authorization",
                "X-User-Agent", "X-Grpc-Web", "Grpc-Timeout",
            ],
            expose_headers=[
                "Grpc-Status", "Grpc-Message", "Grpc-Status-Details-Bin", "Retry-After",
            ],
            max_age=7200,
        )
    ]  # fmt: skip


def readiness(node: Node, replication: ReplicationManager) -> tuple[bool, dict[str, Any]]:
    """Ready = recovered and accepting writes (a replica: linked, not resyncing, not
    lagging); otherwise say why."""
    if node.closed or node.draining:
        return False, {"ready": False, "reason": "shutting down"}
    if node.write_failure:
        return False, {"ready": False, "reason": node.write_failure}
    reason = replication.not_ready()
    if reason is not None:
        return False, {"ready": False, "role": replication.role, "reason": reason}
    return True, {"ready": True, "role": replication.role, "revision": str(node.store.revision)}
