"""The primary's connection to one replica: Connect unary calls of
`kvservice.v1.Replication` (Push, InstallSnapshot) over pooled keep-alive
HTTP/1.1 connections, parsed by httptools (uvicorn's own parser).

Why not connect-python's client here: a push is the one call a primary makes
hundreds of times a second per replica, and with connect-python's client (on
pyqwest, whose Rust I/O threads wake the event loop through a self-pipe) an
empty push cost the primary 427 us of CPU one at a time (367 with 3 in flight)
and ~5 event-loop passes; over an asyncio protocol it costs 137 us (85) and
resolves in the pass that reads the answer (`python -m bench.pushcost`,
bench/results/replication.md). That cost
is what bounds how often a primary can push, so how long an entry waits to be
shipped. Everything else that calls other nodes (announcements, a
switchover's Admin calls, the CLI) keeps connect-python's client.

The wire format is Connect's unary protocol unchanged (any Connect server
answers it, `buf curl` speaks it): `POST /kvservice.v1.Replication/<Method>`,
`Content-Type: application/proto`, `Connect-Protocol-Version: 1`,
`Connect-Timeout-Ms`; a 200 carries the response message, anything else a
Connect error (JSON `{"code", "message"}`, or a code from the HTTP status when
the body is not one, as the protocol says). Failures raise ConnectError, as
connect-python's client would: `unavailable` for connection failures,
`deadline_exceeded` when no answer came within the call's timeout.

A connection carries one call at a time (the replica works on concurrent
pushes concurrently, which HTTP/1.1 pipelining would serialize); idle ones are
kept for the next call, a failed one is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable
from typing import TypeVar, cast
from urllib.parse import urlsplit

import httptools
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf.message import DecodeError, Message

from kvservice.v1.replication_pb2 import (
    InstallSnapshotRequest,
    InstallSnapshotResponse,
    PushRequest,
    PushResponse,
)

ResponseT = TypeVar("ResponseT", bound=Message)

SERVICE = "/kvservice.v1.Replication/"
# An answer larger than this is not a replication answer (they are a few hundred
# bytes): the connection is dropped instead of buffering it.
MAX_RESPONSE_BYTES = 1 << 20
# Idle connections kept per replica (as many as pushes in flight, plus a heartbeat).
MAX_IDLE = 4
# An idle connection is not reused after this long: servers close idle keep-alive
# connections (uvicorn after 5 s), and a push written as the server closes one would
# fail and cost the session a reconnect.
MAX_IDLE_SECONDS = 2.0
# Connect's code for an HTTP status when the body is not a Connect error.
STATUS_CODES = {
    400: Code.INTERNAL, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED,
    404: Code.UNIMPLEMENTED, 429: Code.UNAVAILABLE, 502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE, 504: Code.UNAVAILABLE,
}  # fmt: skip


Answered = Callable[[tuple[int, bytes] | ConnectError], None]
Done = Callable[[ResponseT | None, ConnectError | None], None]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one call at a time. The call's callback runs in the
    event-loop pass that reads its answer (no task to wake)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.on_answer: Answered | None = None
        self.body = bytearray()
        self.closed = False
        self.keep_alive = True
        self.idle_since = 0.0  # (time.monotonic() when last released to the pool)

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement asyncio.Transport without subclassing it.)
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self.on_answer is None:  # bytes nobody asked for: this connection is unusable
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ConnectError(Code.UNAVAILABLE, f"malformed HTTP answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f"connection closed by the replica{f': {exc}' if exc else ''}"
        self.fail(ConnectError(Code.UNAVAILABLE, reason))

    # -- httptools callbacks -----------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_RESPONSE_BYTES:
            error = f"answer larger than {MAX_RESPONSE_BYTES} bytes"
            self.fail(ConnectError(Code.UNAVAILABLE, error))

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        on_answer, self.on_answer = self.on_answer, None
        answer = (self.parser.get_status_code(), bytes(self.body))
        self.body.clear()
        if on_answer is not None:
            on_answer(answer)

    # -- calls -------------------------------------------------------------------------

    def send(self, data: bytes, on_answer: Answered) -> None:
        assert self.transport is not None, "not connected"
        assert self.on_answer is None, "one call at a time"
        self.on_answer = on_answer
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(data)

    def fail(self, error: ConnectError) -> None:
        """End the call in progress with `error` and drop the connection."""
        on_answer, self.on_answer = self.on_answer, None
        self.close()
        if on_answer is not None:
            on_answer(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class ReplicaChannel:
    """Connect unary calls of the Replication service to one replica."""

    def __init__(
        self,
        url: str,
        *,
        timeout_ms: int,
        headers: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        https = parts.scheme == "https"
        self.ssl = (ssl_context or ssl.create_default_context()) if https else None
        self.timeout_ms = timeout_ms
        authority = parts.netloc.rpartition("@")[2]
        self._base = parts.path.rstrip("/")
        # Every request's fixed header lines; `headers` is read at every call (the
        # node's peer token is reloaded in place on SIGHUP).
        self._fixed = (f"host: {authority}\r\ncontent-type: application/proto\r\n"
                       "connect-protocol-version: 1\r\n"
                       "user-agent: kvservice-replication\r\n")  # fmt: skip
        self._headers = headers if headers is not None else {}
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()

    async def push(self, request: PushRequest, *, timeout_ms: int | None = None) -> PushResponse:
        return await self._call("Push", request, PushResponse, timeout_ms)

    def push_nowait(self, request: PushRequest, done: Done[PushResponse]) -> bool:
        """Send a push now on an idle connection, and call `done(reply, error)` in the
        event-loop pass that reads its answer (or on failure or timeout). False, with
        nothing sent, when no connection is idle (then use `push`, which connects)."""
        connection = self._idle_connection()
        if connection is None:
            return False
        self._start(
            connection, "Push", request, PushResponse, timeout_ms=self.timeout_ms, done=done
        )
        return True

    async def install_snapshot(
        self, request: InstallSnapshotRequest, *, timeout_ms: int | None = None
    ) -> InstallSnapshotResponse:
        return await self._call("InstallSnapshot", request, InstallSnapshotResponse, timeout_ms)

    def abort(self) -> None:
        """End the calls in progress (`unavailable`) and drop their connections."""
        for connection in list(self._busy):
            connection.fail(ConnectError(Code.UNAVAILABLE, "call abandoned"))

    async def close(self) -> None:
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()
        self._busy.clear()

    async def _call(
        self, method: str, request: Message, response_type: type[ResponseT], timeout_ms: int | None
    ) -> ResponseT:
        timeout_ms = timeout_ms or self.timeout_ms
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                connection = self._idle_connection() or await self._connect()
        except TimeoutError:
            raise ConnectError(
                Code.DEADLINE_EXCEEDED, f"no connection to the replica within {timeout_ms} ms"
            ) from None
        except OSError as exc:
            raise ConnectError(Code.UNAVAILABLE, f"cannot reach the replica: {exc}") from exc
        answer: asyncio.Future[tuple[ResponseT | None, ConnectError | None]]
        answer = loop.create_future()

        def done(reply: ResponseT | None, error: ConnectError | None) -> None:
            if not answer.done():
                answer.set_result((reply, error))

        left_ms = max(1, int((deadline - loop.time()) * 1000))
        self._start(connection, method, request, response_type, timeout_ms=left_ms, done=done)
        try:
            reply, error = await answer
        except asyncio.CancelledError:
            connection.close()  # (a call cut short leaves its answer on the wire)
            raise
        if error is not None:
            raise error
        assert reply is not None
        return reply

    def _start(
        self,
        connection: _Connection,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        *,
        timeout_ms: int,
        done: Done[ResponseT],
    ) -> None:
        body = request.SerializeToString()
        extra = "".join(f"{name}: {value}\r\n" for name, value in self._headers.items())
        head = (f"POST {self._base}{SERVICE}{method} HTTP/1.1\r\n{self._fixed}{extra}"
                f"connect-timeout-ms: {timeout_ms}\r\n"
                f"content-length: {len(body)}\r\n\r\n")  # fmt: skip
        self._busy.add(connection)
        timer = asyncio.get_running_loop().call_later(
            timeout_ms / 1000, connection.fail,
            ConnectError(Code.DEADLINE_EXCEEDED, f"no answer to {method} within {timeout_ms} ms"),
        )  # fmt: skip

        def answered(answer: tuple[int, bytes] | ConnectError) -> None:
            timer.cancel()
            self._busy.discard(connection)
            if isinstance(answer, ConnectError):
                done(None, answer)
                return
            self._release(connection)
            status, payload = answer
            try:
                reply = _decode(method, response_type, status, payload)
            except ConnectError as exc:
                done(None, exc)
                return
            done(reply, None)

        connection.send(head.encode("latin-1") + body, answered)

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection still worth reusing (None if none)."""
        fresh_since = time.monotonic() - MAX_IDLE_SECONDS
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and connection.idle_since >= fresh_since:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        _, connection = await asyncio.get_running_loop().create_connection(
            _Connection, self.host, self.port, ssl=self.ssl
        )
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.closed or not connection.keep_alive or len(self._idle) >= MAX_IDLE:
            connection.close()
        else:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)


def _decode(method: str, response_type: type[ResponseT], status: int, payload: bytes) -> ResponseT:
    if status != 200:
        raise _error(status, payload)
    try:
        return response_type.FromString(payload)
    except DecodeError as exc:
        raise ConnectError(Code.INTERNAL, f"undecodable {method} answer: {exc}") from exc


def _error(status: int, payload: bytes) -> ConnectError:
    """The Connect error a non-200 answer carries."""
    with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
        error = json.loads(payload)
        return ConnectError(Code(error["code"]), str(error.get("message", "")))
    code = STATUS_CODES.get(status, Code.UNKNOWN)
    return ConnectError(code, f"HTTP {status}: {payload[:200].decode('utf-8', 'replace')}")
