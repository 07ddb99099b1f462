"""uvicorn's httptools protocol with limits against hostile or slow clients.

- Headers must arrive within `header_timeout_seconds` and fit in
  `max_header_bytes` (uvicorn has neither with httptools: a client trickling a
  header byte by byte holds its connection forever).
- A body must arrive within `body_timeout_seconds` of its headers.
- Lingering close: when the reply is sent before the body was read (refused:
  too large, unauthenticated, rate limited) and the client asked for
  `Connection: close`, closing at once makes the kernel answer the unread
  bytes with a reset, and a client that sends its whole body before reading
  (Python's urllib) sees `Connection reset by peer` instead of the reply. So
  the write side is shut, the rest of the body is read and dropped (at most
  `linger_seconds` and `LINGER_MAX_BYTES`), then the socket is closed, as
  nginx's lingering_close and Go's net/http do.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvservice.config import MiB, Settings

log = logging.getLogger("kvservice.transport")

LINGER_MAX_BYTES = 64 * MiB


def protocol_class(settings: Settings) -> type[HardenedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http` option, carrying these settings."""
    return type(
        "KVServiceHttpProtocol",
        (HardenedHttpToolsProtocol,),
        {
            "header_timeout": settings.header_timeout_seconds,
            "body_timeout": settings.body_timeout_seconds,
            "max_header_bytes": settings.max_header_bytes,
            "linger_seconds": settings.linger_seconds,
        },
    )


class HardenedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout = 10.0
    body_timeout = 60.0
    max_header_bytes = 32 * 1024
    linger_seconds = 5.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = False
        self._header_bytes = 0
        self._request_complete = True
        self._close_after_response = False
        self._lingering = False
        self._discarding = False
        self._linger_bytes = 0
        super().connection_made(transport)
        # A connection that never sends a byte is cut like a slow header.
        self._arm(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._discarding:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_MAX_BYTES:
                self.transport.close()
                return
            if self._discarding:
                return
        super().data_received(data)
        if self.transport.is_closing() or self._lingering:
            return
        if self._in_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                limit = self.max_header_bytes
                message = f"request headers exceed max_header_bytes ({limit})"
                self._refuse(431, "Request Header Fields Too Large", message)
            elif self._deadline is None:
                self._arm(self.header_timeout, self._headers_too_slow)
        elif not self._request_complete and self._deadline is None:
            # Timers only for requests not complete in one read: the common small
            # request never pays for call_later and cancel.
            self._arm(self.body_timeout, self._body_too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._request_complete = False
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and not cycle.keep_alive and self.scope["http_version"] == "1.1":
            # The client will close after our reply; we close ourselves once its
            # body is in (see on_response_complete), not while it is still sending.
            cycle.keep_alive = True
            self._close_after_response = True

    def on_message_complete(self) -> None:
        self._request_complete = True
        self._disarm()
        if self._lingering:
            self.transport.close()
            return
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._close_after_response and not self.transport.is_closing():
            self.server_state.total_requests += 1
            if self._request_complete:
                self.transport.close()
            else:
                self._linger()
            return
        super().on_response_complete()

    def _linger(self) -> None:
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._disarm()
        self._arm(self.linger_seconds, self.transport.close)

    def _arm(self, seconds: float, callback: object) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)  # type: ignore[arg-type]

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.cycle is None or self._in_headers:
            # Idle or trickling before any request: close without a word.
            if self._header_bytes or self._in_headers:
                self._refuse(408, "Request Timeout", "request headers took too long")
            else:
                self.transport.close()

    def _body_too_slow(self) -> None:
        self._deadline = None
        if self._request_complete or self.transport.is_closing():
            return
        if self.flow.read_paused:
            # The application is not reading: that is not the client's fault.
            self._arm(self.body_timeout, self._body_too_slow)
            return
        log.info("cutting a slow request body", extra={"client": _peer(self.client)})
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        code = "deadline_exceeded" if status == 408 else "resource_exhausted"
        body = json.dumps({"code": code, "message": message}).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self._disarm()
        self._in_headers = False
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(min(self.linger_seconds, 1.0), self.transport.close)


def _peer(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None
