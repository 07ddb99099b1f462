"""A loopback TCP proxy for fault tests: cut, black-hole, stall and delay a link; replay,
hold and reorder HTTP/1.1 requests.

The proxy runs its own asyncio loop in a daemon thread, so synchronous test code (and
other processes, through its port) can use it. Every control is a blocking call that
returns once the loop has applied it.

Modes (one at a time; `delay` is independent of them):

- forward (the start, and after `heal()`): bytes flow both ways.
- `cut()`: every open connection is reset (RST, both the client and the upstream side)
  and every new connection is accepted and reset at once, until `heal()`. A reset
  rather than a FIN, because it is unambiguous: the peer's next read or write fails
  with ECONNRESET instead of looking like an orderly end of stream. New connections
  see connect() succeed and then a reset; refusing them at connect() would need the
  listening socket closed, and its port could be lost to another socket meanwhile.
- `blackhole()`: connections stay open and new ones are accepted, but bytes in both
  directions (and a client's FIN) are read and thrown away; nobody gets an answer or
  a close, so a peer only notices by its own timeout. Leaving the blackhole (by
  `heal()`, `stall()` or `cut()`) resets every open connection, since each one lost
  bytes mid-stream and can never be trusted again.
- `stall()`: connections stay open and new ones are accepted (and connected
  upstream), but nothing is delivered; bytes are kept, in order, up to a bounded
  buffer per direction, after which TCP flow control pushes back on the sender.
  `heal()` delivers everything kept, in order: a long pause, not a loss.
- `delay(seconds)`: each chunk is delivered no earlier than `seconds` after the proxy
  read it, in order, both directions; chunks are pipelined (a one-way latency, not a
  per-chunk pause). `delay(0)` or `heal()` removes it.

HTTP awareness (on by default): the client->upstream stream is cut into whole
HTTP/1.x requests (request line, headers, Content-Length body; keep-alive and
pipelining work) and each request is forwarded whole once it is complete. That is
what `replay_last_request()`, `hold_next_request()`/`release_held()` and the
`requests` counter work on. Not supported: chunked request bodies
(Transfer-Encoding), `Expect: 100-continue`, `Upgrade` and anything that is not
HTTP/1.x. A connection that sends one of these switches to plain byte forwarding
from that point on, and its later requests are neither counted nor recorded.
Responses are never framed, except the one `replay_last_request()` reads back
(Content-Length, chunked, or until close).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import ipaddress
import re
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
CHUNK_SIZE = 64 * 1024
# Chunks buffered per direction while stalled or delayed before reads stop (flow control).
QUEUE_CHUNKS = 256
# An HTTP head larger than this is taken for something that is not HTTP.
MAX_HEAD = 64 * 1024
# How long a control call waits for the loop thread before giving up.
CONTROL_TIMEOUT = 10.0

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") [^ \r\n]+ HTTP/1\.[01]")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*")
# Headers after which a stream cannot be framed by Content-Length alone.
_UNFRAMEABLE = (b"transfer-encoding", b"expect", b"upgrade")


class NotPlainHttp(Exception):
    """The bytes are not an HTTP/1.x message framed by Content-Length alone."""


def parse_head(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """Split a message head (without its blank line) into start line and lower-cased headers.

    Repeated headers are joined with ", " as RFC 9110 allows.
    """
    start, *lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            raise NotPlainHttp(f"malformed header line {line[:80]!r}")
        name, value = match.group(1).lower(), match.group(2)
        headers[name] = headers[name] + b", " + value if name in headers else value
    return start, headers


def content_length(headers: dict[bytes, bytes]) -> int:
    """The body length a Content-Length header gives (0 without one); repeats must agree."""
    raw = headers.get(b"content-length")
    if raw is None:
        return 0
    values = {value.strip() for value in raw.split(b",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise NotPlainHttp(f"bad Content-Length {raw[:80]!r}")
    return int(next(iter(values)))


class HttpRequestSplitter:
    """Cuts one connection's client byte stream into whole HTTP/1.x requests."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append bytes read from the client."""
        self._buffer += data

    def next_request(self) -> bytes | None:
        """Remove and return the next whole request, or None until one is complete.

        Raises NotPlainHttp when the next request cannot be framed (see the module
        docstring); the unframed bytes stay in the buffer for `take_rest()`.
        """
        # RFC 9112 2.2: a server should ignore empty lines before a request line.
        while self._buffer.startswith(b"\r\n"):
            del self._buffer[:2]
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise NotPlainHttp(f"no end of headers within {MAX_HEAD} bytes")
            return None
        start, headers = parse_head(bytes(self._buffer[:end]))
        if _REQUEST_LINE.fullmatch(start) is None:
            raise NotPlainHttp(f"not an HTTP/1.x request line: {start[:80]!r}")
        for name in _UNFRAMEABLE:
            if name in headers:
                raise NotPlainHttp(f"{name.decode()} is not supported")
        total = end + 4 + content_length(headers)
        if len(self._buffer) < total:
            return None
        request = bytes(self._buffer[:total])
        del self._buffer[:total]
        return request

    def take_rest(self) -> bytes:
        """Remove and return every buffered byte not yet returned as a request."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


async def read_response(reader: asyncio.StreamReader, method: bytes = b"GET") -> bytes:
    """Read one whole HTTP/1.x response (after any 1xx) and return its raw bytes."""
    out = bytearray()
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        out += head
        status_line, headers = parse_head(head[:-4])
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise NotPlainHttp(f"not an HTTP status line: {status_line[:80]!r}")
        status = int(parts[1])
        if not 100 <= status < 200 or status == 101:
            break
    if method == b"HEAD" or status in (101, 204, 304):
        return bytes(out)
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            out += await reader.readexactly(size + 2)
        while True:  # trailers, then the blank line
            line = await reader.readuntil(b"\r\n")
            out += line
            if line == b"\r\n":
                break
    elif b"content-length" in headers:
        out += await reader.readexactly(content_length(headers))
    else:
        out += await reader.read()  # the body runs until the server closes
    return bytes(out)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with RST instead of FIN (SO_LINGER with a zero timeout)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Mode(enum.Enum):
    FORWARD = "forward"
    CUT = "cut"
    BLACKHOLE = "blackhole"
    STALL = "stall"


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started; bytes are those delivered, not those read."""

    connections: int = 0  # accepted from clients, including those reset by a cut
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    requests: int = 0  # whole HTTP requests forwarded or held (not replays)


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    splitter: HttpRequestSplitter | None
    upstream: asyncio.StreamWriter | None = None
    # Our own task, not the one asyncio.start_server runs the callback in: Python 3.11
    # logs a spurious error when that one is cancelled.
    task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        """RST both sides and end the task serving them (unless it is the caller)."""
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


@dataclass(eq=False)
class _Held:
    request: bytes
    released: asyncio.Event = field(default_factory=asyncio.Event)


# A queued chunk: (loop time it was read, bytes); b"" stands for the sender's EOF.
_Chunk = tuple[float, bytes]


class FaultProxy:
    """A TCP proxy from 127.0.0.1:`port` to a loopback upstream, with faults on demand."""

    def __init__(self, upstream_port: int, upstream_host: str = LOOPBACK, *,
                 http: bool = True, connect_timeout: float = 5.0) -> None:  # fmt: skip
        """Configure; nothing listens until start() (or `with`)."""
        if not ipaddress.ip_address(upstream_host).is_loopback:
            raise ValueError(f"upstream must be a loopback address, not {upstream_host}")
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._http = http
        self._connect_timeout = connect_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._mode = _Mode.FORWARD
        self._delay = 0.0
        self._links: set[_Link] = set()
        self._stats = ProxyStats()
        self._last_request: bytes | None = None
        self._hold_armed = False
        self._held: list[_Held] = []
        # Created on the loop thread by _start().
        self._flowing: asyncio.Event
        self._held_changed: asyncio.Event

    @property
    def url(self) -> str:
        """Base HTTP URL of the proxy's listening side."""
        return f"http://{LOOPBACK}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start the loop thread and listen on a free loopback port (kernel-chosen)."""
        if self._loop is not None:
            raise RuntimeError("proxy already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        self._run(self._start())
        return self

    def close(self) -> None:
        """Reset every connection, stop listening and stop the loop thread."""
        if self._loop is None or self._thread is None:
            return
        try:
            self._run(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT)
            if not self._thread.is_alive():
                self._loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    # -- controls (any thread but the proxy's own) -------------------------------------

    def cut(self) -> None:
        """Reset every open connection (RST) and reset each new one until heal()."""
        self._run(self._set_mode(_Mode.CUT))

    def blackhole(self) -> None:
        """Swallow all traffic both ways, closing nothing, until heal() resets those links."""
        self._run(self._set_mode(_Mode.BLACKHOLE))

    def stall(self) -> None:
        """Keep all traffic, delivering none, until heal() delivers it in order."""
        self._run(self._set_mode(_Mode.STALL))

    def delay(self, seconds: float) -> None:
        """Deliver each chunk no earlier than `seconds` after it was read, in order."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, not {seconds}")
        self._run(self._apply(lambda: self._set_delay(seconds)))

    def heal(self) -> None:
        """Forward normally again: no cut/blackhole/stall, no delay, no hold, held ones released."""
        self._run(self._heal())

    def hold_next_request(self) -> None:
        """Keep the next whole request back (its connection waits) until release_held()."""
        self._run(self._apply(self._arm_hold))

    def wait_held(self, timeout: float = 5.0) -> bytes:
        """Block until a request is held and return the first one held; TimeoutError if none."""
        return self._run(self._wait_held(timeout), timeout + CONTROL_TIMEOUT)

    def release_held(self) -> int:
        """Let every held request go on upstream over the connection it came on; return how many."""
        return self._run(self._apply(self._release_held))

    def replay_last_request(self, timeout: float = 5.0) -> bytes:
        """Send the last whole request again on a fresh upstream connection; return the response.

        The replay goes straight to upstream, whatever the mode, and is not counted in
        `stats()`. Raises LookupError when no whole request has been seen yet.
        """
        return self._run(self._replay(timeout), timeout + CONTROL_TIMEOUT)

    def last_request(self) -> bytes | None:
        """The last whole request seen from any client (forwarded or held), if any."""
        return self._run(self._apply(lambda: self._last_request))

    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        return self._run(self._apply(lambda: self._stats))

    # -- loop side ---------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = CONTROL_TIMEOUT) -> T:
        """Run `coro` on the proxy loop and wait for its result."""
        if self._loop is None or self._thread is None:
            coro.close()
            raise RuntimeError("proxy is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("proxy controls cannot be called from the proxy's loop")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _apply(self, fn: Callable[[], T]) -> T:
        return fn()

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._held_changed = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        if self._server is not None:
            await self._server.wait_closed()

    async def _set_mode(self, mode: _Mode) -> None:
        left_blackhole = self._mode is _Mode.BLACKHOLE and mode is not _Mode.BLACKHOLE
        self._mode = mode
        if mode is _Mode.FORWARD:
            self._flowing.set()
        else:
            self._flowing.clear()
        if mode is _Mode.CUT or left_blackhole:
            await self._reset_all()

    async def _heal(self) -> None:
        self._delay = 0.0
        self._hold_armed = False
        self._release_held()
        await self._set_mode(_Mode.FORWARD)

    async def _reset_all(self) -> None:
        """Reset every link and wait (bounded) until their tasks have ended."""
        links = list(self._links)
        for link in links:
            link.reset()
        if links:
            tasks = [link.task for link in links if link.task is not None]
            await asyncio.wait(tasks, timeout=CONTROL_TIMEOUT)

    def _set_delay(self, seconds: float) -> None:
        self._delay = float(seconds)

    def _arm_hold(self) -> None:
        self._hold_armed = True

    def _release_held(self) -> int:
        for held in self._held:
            held.released.set()
        count = len(self._held)
        self._held.clear()
        self._held_changed.clear()
        return count

    async def _wait_held(self, limit: float) -> bytes:
        async with asyncio.timeout(limit):
            while not self._held:
                await self._held_changed.wait()
        return self._held[0].request

    async def _replay(self, limit: float) -> bytes:
        request = self._last_request
        if request is None:
            raise LookupError("no whole request has been seen yet")
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(*self.upstream)
            try:
                writer.write(request)
                await writer.drain()
                return await read_response(reader, request.split(b" ", 1)[0])
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    def _count(self, **increments: int) -> None:
        totals = {name: getattr(self._stats, name) + n for name, n in increments.items()}
        self._stats = dataclasses.replace(self._stats, **totals)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Count a new client connection and start serving it, or reset it while cut."""
        self._count(connections=1)
        if self._mode is _Mode.CUT:
            _reset(writer)
            return
        link = _Link(writer, HttpRequestSplitter() if self._http else None)
        link.task = asyncio.create_task(self._serve(link, reader))
        self._links.add(link)

    async def _serve(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Serve one client connection for as long as it lives."""
        try:
            if self._mode is _Mode.BLACKHOLE:
                # Never connected upstream; leaving the blackhole resets it like the others.
                while await reader.read(CHUNK_SIZE):
                    pass
                await asyncio.Event().wait()
            else:
                await self._forward(link, reader)
        except OSError:
            link.reset()
        finally:
            self._links.discard(link)

    async def _forward(self, link: _Link, client: asyncio.StreamReader) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout):
                upstream, link.upstream = await asyncio.open_connection(*self.upstream)
        except (OSError, TimeoutError):
            _reset(link.client)  # upstream is down: the client sees what a dead node gives
            return
        up: asyncio.Queue[_Chunk] = asyncio.Queue(QUEUE_CHUNKS)
        down: asyncio.Queue[_Chunk] = asyncio.Queue(QUEUE_CHUNKS)
        broken = False
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read(client, up))
                group.create_task(self._deliver(up, link.upstream, link, up=True))
                group.create_task(self._read(upstream, down))
                group.create_task(self._deliver(down, link.client, link, up=False))
        except* OSError:
            broken = True
        if broken:
            link.reset()
        else:  # both directions ended with an EOF that was passed on: an orderly close
            link.client.close()
            link.upstream.close()

    async def _read(self, source: asyncio.StreamReader, queue: asyncio.Queue[_Chunk]) -> None:
        """Queue what `source` sends, stamped with when it was read, up to and with EOF."""
        loop = asyncio.get_running_loop()
        while True:
            data = await source.read(CHUNK_SIZE)
            if self._mode is _Mode.BLACKHOLE:
                if not data:
                    return  # a swallowed FIN: the other side is never told
                continue
            await queue.put((loop.time(), data))
            if not data:
                return

    async def _deliver(self, queue: asyncio.Queue[_Chunk], target: asyncio.StreamWriter,
                       link: _Link, *, up: bool) -> None:  # fmt: skip
        """Write queued chunks to `target` in order, once the mode and the delay allow."""
        while True:
            read_at, data = await queue.get()
            await self._gate(read_at)
            if up and link.splitter is not None:
                if not data:  # an unfinished request goes on as it is before the EOF
                    await self._write(target, link.splitter.take_rest(), up=True)
                else:
                    await self._deliver_requests(target, link, data)
                    continue
            if not data:
                if target.can_write_eof():
                    target.write_eof()
                return
            await self._write(target, data, up=up)

    async def _deliver_requests(self, target: asyncio.StreamWriter, link: _Link,
                                data: bytes) -> None:  # fmt: skip
        """Forward each request `data` completes, holding one back if a hold is armed."""
        splitter = link.splitter
        assert splitter is not None
        splitter.feed(data)
        while True:
            try:
                request = splitter.next_request()
            except NotPlainHttp:
                link.splitter = None  # plain bytes from here on
                await self._write(target, splitter.take_rest(), up=True)
                return
            if request is None:
                return
            self._count(requests=1)
            self._last_request = request
            if self._hold_armed:
                self._hold_armed = False
                held = _Held(request)
                self._held.append(held)
                self._held_changed.set()
                await held.released.wait()
                await self._flowing.wait()
            await self._write(target, request, up=True)

    async def _gate(self, read_at: float) -> None:
        """Return once forwarding is on and the chunk read at `read_at` has aged `delay`."""
        loop = asyncio.get_running_loop()
        while True:
            await self._flowing.wait()
            wait = read_at + self._delay - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _write(self, target: asyncio.StreamWriter, data: bytes, *, up: bool) -> None:
        if not data:
            return
        target.write(data)
        # Counted as soon as the transport has the bytes, so a peer that has read them
        # never sees a stale count.
        self._count(**{"bytes_up" if up else "bytes_down": len(data)})
        await target.drain()
