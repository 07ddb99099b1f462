"""The ASGI middleware that decides, before a body is read, who may call what.

Order per RPC: authenticate (static token or JWT; a header verified before is
one lookup in `credentials.CredentialCache`) → method role → rate limit →
concurrency limit → the Connect app, with the caller in `access.CALLER` so the
key check (`access.AccessInterceptor`) can see it. Nothing below runs for a
refused request, so a refusal has no side effect.

A client over a limit gets its `resource_exhausted` after a short pause
(LIMIT_REFUSAL_DELAY_SECONDS, or less when its next token is due sooner), as
nginx's limit_req delays: a client that retries at once on one connection then
sends a few hundred requests a second instead of thousands, and stops taking
the cores the callers within their limits need.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvservice.access import CALLER, PATH_ROLES, rule_for
from kvservice.auth import anonymous
from kvservice.credentials import Credential
from kvservice.errors import PermissionDenied

if TYPE_CHECKING:
    from kvservice.metrics import ASGIApp, Receive, Scope, Send
    from kvservice.security import Security

# The pause before a limit's refusal (see the module's docstring).
LIMIT_REFUSAL_DELAY_SECONDS = 0.005
_STATUS = {
    "unauthenticated": 401, "permission_denied": 403, "resource_exhausted": 429,
    "unimplemented": 415,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why a request is refused: the reply's code, message and Retry-After."""

    code: str
    message: str
    retry_after: float = 0.0


class SecurityMiddleware:
    """Authentication, method roles, rate and concurrency limits for RPCs and /metrics.

    Admission is synchronous on purpose: an admitted request (the common case)
    pays for no coroutine of its own beyond this one; only a refusal awaits.
    """

    def __init__(self, app: ASGIApp, security: Security) -> None:
        self.app = app
        self.security = security
        self._anonymous: dict[str, Credential] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        rule = PATH_ROLES.get(path) or rule_for(path)
        if rule is None or rule == "open":
            await self._unguarded(scope, receive, send)
            return
        sec = self.security
        if sec.auth_on:
            admitted = self._known(scope["headers"], rule) or self._admit(scope, rule)
        else:
            host = _host(scope)
            admitted = self._anonymous.get(host) or self._anonymous_caller(host)
        if isinstance(admitted, _Refusal):
            await _refuse(send, admitted)
            return
        if sec.limiter is not None or sec.concurrency is not None:
            refusal = self._limit(admitted)
            if refusal is not None:
                await _refuse(send, refusal)
                return
        # Only the key check (auth on) reads the caller: skip the context var otherwise.
        token = (
            CALLER.set(admitted.callers.get(rule) or admitted.caller(rule)) if sec.auth_on else None
        )
        try:
            await self.app(scope, receive, send)
        finally:
            if token is not None:
                CALLER.reset(token)
            if sec.concurrency is not None:
                sec.concurrency.leave()

    async def _unguarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A path that is no protected RPC: passed on, but /metrics may need `admin`."""
        if scope["path"] == "/metrics" and self.security.metrics_auth:
            await self._metrics(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _limit(self, admitted: Credential) -> _Refusal | None:
        """Take a token from the caller's rate limit and a place in the concurrency limit
        (which the caller of this must leave), or say which limit refuses."""
        sec = self.security
        if sec.limiter is not None and admitted.limit is not None:
            wait = sec.limiter.take(admitted.identity, admitted.limit)
            if wait:
                sec.stats.limited("rate")
                return _Refusal(
                    "resource_exhausted",
                    f"rate limit of {admitted.identity} reached; retry in {wait:.3f}s",
                    wait,
                )
        concurrency = sec.concurrency
        if concurrency is not None and not concurrency.try_enter():
            sec.stats.limited("concurrency")
            return _Refusal(
                "resource_exhausted",
                f"the node serves {concurrency.limit} requests at once; retry shortly",
                1.0,
            )
        return None

    def _known(self, headers: list[tuple[bytes, bytes]], rule: str) -> Credential | None:
        """The caller if its credential was verified before and it has the role `rule`
        names: what nearly every request takes, so it does as little as it can."""
        for name, value in headers:
            if name == b"authorization":
                found = self.security.verified.get(value, time.time())
                if found is not None and rule in found.principal.roles:
                    return found
                return None
        return None

    def _anonymous_caller(self, host: str) -> Credential:
        """With auth off: the caller is its address (one credential per address, kept)."""
        if len(self._anonymous) >= 10_000:
            self._anonymous.clear()
        credential = self._anonymous[host] = self.security.credential(anonymous(host), host)
        return credential

    def _admit(self, scope: Scope, rule: str) -> Credential | _Refusal:
        """The authenticated caller if it has the role `rule` names, else why not
        (verifying a credential not seen before)."""
        method = scope["path"][1:]
        host = _host(scope)
        found = self._authenticate(scope, method, host)
        if isinstance(found, _Refusal) or rule in found.principal.roles:
            return found
        principal = found.principal
        try:
            if rule == "undeclared":
                raise PermissionDenied(f"{method} has no access rule on this node")
            principal.require_role(rule, method)
        except PermissionDenied as exc:
            self.security.stats.refused(
                "missing_role", identity=principal.name, method=method, client=host,
                message=str(exc),
            )  # fmt: skip
            return _Refusal("permission_denied", str(exc))
        return found  # (not reached: "undeclared" is no role, and a missing one raised)

    def _authenticate(self, scope: Scope, method: str, host: str) -> Credential | _Refusal:
        sec = self.security
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
                break
        found = sec.authenticate(authorization)
        if isinstance(found, Credential):
            return found
        reason, message = found
        sec.stats.refused(reason, identity=None, method=method, client=host, message=message)
        # Guessing tokens costs the guesser's address its rate budget.
        limiter = sec.limiter
        if limiter is not None:
            wait = limiter.take(host, limiter.default)
            if wait:
                sec.stats.limited("rate")
                return _Refusal("resource_exhausted", f"rate limit of {host} reached", wait)
        return _Refusal("unauthenticated", message)

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = _host(scope)
        found = self._authenticate(scope, "/metrics", host)
        if isinstance(found, _Refusal):
            await _refuse(send, found)
            return
        principal = found.principal
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


def _host(scope: Scope) -> str:
    """The client's address: the identity of an anonymous caller, and in the audit log."""
    client = scope.get("client")
    return client[0] if client else "unknown"


async def _refuse(send: Send, refusal: _Refusal) -> None:
    if refusal.code == "resource_exhausted":
        await asyncio.sleep(min(refusal.retry_after, LIMIT_REFUSAL_DELAY_SECONDS))
    await _error(send, refusal.code, refusal.message, retry_after=refusal.retry_after)


async def _error(send: Send, code: str, message: str, *, retry_after: float = 0.0) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if code == "unauthenticated":
        headers.append((b"www-authenticate", b'Bearer realm="kvservice"'))
    if retry_after:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    await send({"type": "http.response.start", "status": _STATUS[code], "headers": headers})
    await send({"type": "http.response.body", "body": body})
