"""The ASGI middleware that decides, before a body is read, who may call what.

Order per RPC: authenticate (static token or JWT) → method role → rate limit
→ concurrency limit → the Connect app, with the caller in `access.CALLER` so
the key check (`access.AccessInterceptor`) can see it. Nothing below runs for
a refused request, so a refusal has no side effect.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from kvservice.access import CALLER, Caller, rule_for
from kvservice.auth import Principal, anonymous
from kvservice.errors import PermissionDenied

if TYPE_CHECKING:
    from kvservice.metrics import ASGIApp, Receive, Scope, Send
    from kvservice.security import Security

_STATUS = {
    "unauthenticated": 401, "permission_denied": 403, "resource_exhausted": 429,
    "unimplemented": 415,
}  # fmt: skip


class SecurityMiddleware:
    """Authentication, method roles, rate and concurrency limits for RPCs and /metrics."""

    def __init__(self, app: ASGIApp, security: Security) -> None:
        self.app = app
        self.security = security
        self._anonymous: dict[str, Principal] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        rule = rule_for(path)
        if rule is None or rule == "open":
            if path == "/metrics" and self.security.metrics_auth:
                await self._metrics(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        host = client[0] if client else "unknown"
        admitted = await self._admit(scope, send, rule, host)
        if admitted is None:
            return
        principal, identity = admitted
        sec = self.security
        limiter = sec.limiter
        if limiter is not None:
            wait = limiter.take(identity, limiter.limit_for(principal))
            if wait:
                sec.stats.limited("rate")
                await _error(
                    send, "resource_exhausted",
                    f"rate limit of {identity} reached; retry in {wait:.3f}s",
                    retry_after=wait,
                )  # fmt: skip
                return
        concurrency = sec.concurrency
        if concurrency is not None and not concurrency.try_enter():
            sec.stats.limited("concurrency")
            await _error(
                send, "resource_exhausted",
                f"the node serves {concurrency.limit} requests at once; retry shortly",
                retry_after=1.0,
            )  # fmt: skip
            return
        # Only the key check (auth on) reads the caller: skip the context var otherwise.
        token = CALLER.set(Caller(principal, host)) if sec.auth_on else None
        try:
            await self.app(scope, receive, send)
        finally:
            if token is not None:
                CALLER.reset(token)
            if concurrency is not None:
                concurrency.leave()

    async def _admit(
        self, scope: Scope, send: Send, rule: str, host: str
    ) -> tuple[Principal, str] | None:
        """The caller and its rate-limit identity, or None when refused (reply sent)."""
        if not self.security.auth_on:
            principal = self._anonymous.get(host)
            if principal is None:
                if len(self._anonymous) >= 10_000:
                    self._anonymous.clear()
                principal = self._anonymous[host] = anonymous(host)
            return principal, host
        method = scope["path"][1:]
        principal = await self._authenticate(scope, send, method, host)
        if principal is None:
            return None
        try:
            if rule == "undeclared":
                raise PermissionDenied(f"{method} has no access rule on this node")
            principal.require_role(rule, method)
        except PermissionDenied as exc:
            self.security.stats.refused(
                "missing_role", identity=principal.name, method=method, client=host,
                message=str(exc),
            )  # fmt: skip
            await _error(send, "permission_denied", str(exc))
            return None
        return principal, f"{principal.kind}:{principal.name}"

    async def _authenticate(
        self, scope: Scope, send: Send, method: str, host: str
    ) -> Principal | None:
        sec = self.security
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
                break
        failure = sec.authenticate(authorization)
        if isinstance(failure, Principal):
            return failure
        reason, message = failure
        sec.stats.refused(reason, identity=None, method=method, client=host, message=message)
        # Guessing tokens costs the guesser's address its rate budget.
        limiter = sec.limiter
        if limiter is not None:
            wait = limiter.take(host, limiter.default)
            if wait:
                sec.stats.limited("rate")
                await _error(
                    send, "resource_exhausted", f"rate limit of {host} reached",
                    retry_after=wait,
                )  # fmt: skip
                return None
        await _error(send, "unauthenticated", message)
        return None

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = scope["client"][0] if scope.get("client") else "unknown"
        principal = await self._authenticate(scope, send, "/metrics", host)
        if principal is None:
            return
        if "admin" not in principal.roles:
            message = f"{principal.kind} '{principal.name}' lacks the 'admin' role /metrics needs"
            self.security.stats.refused(
                "metrics", identity=principal.name, method="/metrics", client=host, message=message
            )
            await _error(send, "permission_denied", message)
            return
        await self.app(scope, receive, send)


class GrpcGuard:
    """Answers the gRPC protocol (HTTP/2 trailers, which uvicorn cannot send) with a clear
    415 instead of connect-python's 500; Connect and gRPC-Web are unaffected."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-type":
                    if value.startswith(b"application/grpc") and not value.startswith(
                        b"application/grpc-web"
                    ):
                        await _error(
                            send, "unimplemented",
                            "the gRPC protocol needs HTTP/2 trailers, which this server does"
                            " not send; use the Connect protocol or gRPC-Web",
                        )  # fmt: skip
                        return
                    break
        await self.app(scope, receive, send)


async def _error(send: Send, code: str, message: str, *, retry_after: float = 0.0) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if code == "unauthenticated":
        headers.append((b"www-authenticate", b'Bearer realm="kvservice"'))
    if retry_after:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    await send({"type": "http.response.start", "status": _STATUS[code], "headers": headers})
    await send({"type": "http.response.body", "body": body})
