"""FaultProxy against a small real HTTP/1.1 server on loopback: every control does what it says."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest

from tests.faults.proxy import (
    LOOPBACK,
    FaultProxy,
    HttpRequestSplitter,
    NotPlainHttp,
    ProxyStats,
    content_length,
    parse_head,
)
from tests.integration.conftest import free_port


class Upstream(ThreadingHTTPServer):
    """Keep-alive HTTP/1.1 server that records each POST body and answers `<n>:<body>`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((LOOPBACK, 0), _Recorder)
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about connections the proxy reset on purpose."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = cast(Upstream, self.server)
        with server.lock:
            server.bodies.append(body)
            reply = b"%d:%s" % (len(server.bodies), body)
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.server_port) as proxy:
        yield proxy


def post(body: bytes, *, extra: bytes = b"") -> bytes:
    """Raw bytes of a keep-alive POST carrying `body`."""
    head = b"POST /echo HTTP/1.1\r\nHost: test\r\n%sContent-Length: %d\r\n\r\n"
    return head % (extra, len(body)) + body


def connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((LOOPBACK, proxy.port), timeout=timeout)


def recv_response(sock: socket.socket) -> bytes:
    """Read exactly one Content-Length response; EOFError on an orderly close (FIN) before its end.

    The head is read a byte at a time so that a pipelined second response stays unread.
    """
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise EOFError("connection closed before a whole response head")
        head += byte
    need = content_length(parse_head(head[:-4])[1])
    body = b""
    while len(body) < need:
        chunk = sock.recv(need - len(body))
        if not chunk:
            raise EOFError("connection closed before a whole response body")
        body += chunk
    return head + body


def exchange(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    return recv_response(sock)


def one_shot(proxy: FaultProxy, request: bytes) -> bytes:
    """Connect, send `request`, read the response (a reset may already fail the connect)."""
    with connect(proxy) as sock:
        return exchange(sock, request)


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


def test_forwards_keep_alive_and_pipelined_requests_with_exact_counts(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """Requests on one connection, also two in one segment, reach upstream and are counted."""
    requests = [post(b"a"), post(b"b"), post(b"c") + post(b"d")]
    with connect(proxy) as sock:
        responses = [exchange(sock, requests[0]), exchange(sock, requests[1])]
        sock.sendall(requests[2])
        responses += [recv_response(sock), recv_response(sock)]
    assert [body_of(r) for r in responses] == [b"1:a", b"2:b", b"3:c", b"4:d"]
    assert upstream.bodies == [b"a", b"b", b"c", b"d"]
    assert proxy.stats() == ProxyStats(
        connections=1,
        bytes_up=sum(map(len, requests)),
        bytes_down=sum(map(len, responses)),
        requests=4,
    )
    assert proxy.last_request() == post(b"d")


def test_cut_resets_live_connections_and_new_ones_until_heal(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """After cut() an open connection reads a reset, and so does a new one, until heal()."""
    with connect(proxy) as live:
        assert body_of(exchange(live, post(b"before"))) == b"1:before"
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            live.recv(1)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        one_shot(proxy, post(b"during"))
    assert upstream.bodies == [b"before"]
    proxy.heal()
    assert body_of(one_shot(proxy, post(b"after"))) == b"2:after"
    assert proxy.stats().connections == 3


def test_blackhole_times_a_client_out_and_heal_resets_it_and_restores_service(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """Black-holed traffic gets no answer and no close; heal() resets those links and forwards."""
    with connect(proxy) as old:
        exchange(old, post(b"before"))
        proxy.blackhole()
        with connect(proxy, timeout=0.5) as new:
            old.settimeout(0.5)
            for sock in (old, new):
                with pytest.raises(TimeoutError):
                    exchange(sock, post(b"lost"))
            assert upstream.bodies == [b"before"]
            proxy.heal()
            for sock in (old, new):
                sock.settimeout(5.0)
                with pytest.raises(ConnectionResetError):
                    sock.recv(1)
    assert body_of(one_shot(proxy, post(b"after"))) == b"2:after"


def test_stall_keeps_traffic_and_heal_delivers_it_in_order(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """Nothing reaches upstream while stalled; heal() delivers what was sent, in order."""
    with connect(proxy) as sock:
        proxy.stall()
        sock.sendall(post(b"x") + post(b"y"))
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert upstream.bodies == []
        proxy.heal()
        sock.settimeout(5.0)
        assert [body_of(recv_response(sock)), body_of(recv_response(sock))] == [b"1:x", b"2:y"]


def test_delay_adds_at_least_the_delay_each_way_and_keeps_order(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """With delay(d) a round trip takes at least 2d, and a body sent in pieces arrives whole."""
    proxy.delay(0.25)
    request = post(b"0123456789")
    with connect(proxy) as sock:
        started = time.monotonic()
        for piece in (request[:10], request[10:-4], request[-4:]):
            sock.sendall(piece)
        response = recv_response(sock)
        assert time.monotonic() - started >= 0.5
        assert body_of(response) == b"1:0123456789"
        proxy.delay(0)
        assert body_of(exchange(sock, post(b"fast"))) == b"2:fast"


def test_replay_sends_the_last_request_again(proxy: FaultProxy, upstream: Upstream) -> None:
    """replay_last_request() makes upstream see the same request twice and returns its reply."""
    with pytest.raises(LookupError):
        proxy.replay_last_request()
    with connect(proxy) as sock:
        assert body_of(exchange(sock, post(b"batch-7"))) == b"1:batch-7"
    response = proxy.replay_last_request()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert body_of(response) == b"2:batch-7"
    assert upstream.bodies == [b"batch-7", b"batch-7"]
    assert proxy.stats().requests == 1


def test_hold_and_release_reorder_requests(proxy: FaultProxy, upstream: Upstream) -> None:
    """A held request reaches upstream after one sent later on another connection."""
    proxy.hold_next_request()
    with connect(proxy) as first, connect(proxy) as second:
        first.sendall(post(b"first"))
        assert proxy.wait_held() == post(b"first")
        assert body_of(exchange(second, post(b"second"))) == b"1:second"
        assert proxy.release_held() == 1
        assert body_of(recv_response(first)) == b"2:first"
    assert upstream.bodies == [b"second", b"first"]
    assert proxy.stats().requests == 2


def test_unframeable_request_falls_back_to_plain_forwarding(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """Expect: 100-continue cannot wait for a whole request, so its bytes pass through as is."""
    request = post(b"body", extra=b"Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    with connect(proxy) as sock:
        sock.sendall(head + b"\r\n\r\n")
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        assert body_of(recv_response(sock)) == b"1:body"
    assert proxy.stats().requests == 0


def test_dead_upstream_resets_the_client() -> None:
    """With nothing listening upstream the client's connection is reset, like a dead node's."""
    with FaultProxy(free_port()) as proxy:
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            one_shot(proxy, post(b"x"))
        assert proxy.stats() == ProxyStats(connections=1)


def test_splitter_frames_pipelined_and_partial_requests() -> None:
    """Whole requests come out one by one; a partial one waits for the rest of its body."""
    splitter = HttpRequestSplitter()
    splitter.feed(post(b"one") + post(b"two")[:-1])
    assert splitter.next_request() == post(b"one")
    assert splitter.next_request() is None
    splitter.feed(b"o")
    assert splitter.next_request() == post(b"two")
    assert splitter.take_rest() == b""


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ],
)
def test_splitter_refuses_what_it_cannot_frame_and_keeps_the_bytes(data: bytes) -> None:
    """Chunked bodies, non-HTTP bytes and conflicting lengths raise and leave the bytes intact."""
    splitter = HttpRequestSplitter()
    splitter.feed(data)
    with pytest.raises(NotPlainHttp):
        splitter.next_request()
    assert splitter.take_rest() == data


def test_upstream_must_be_loopback() -> None:
    """The proxy never forwards off the machine."""
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(80, "192.0.2.1")
