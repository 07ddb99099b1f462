"""Hostile clients: slow headers and bodies, header floods, idle connections, bodies sent
before the reply is read, and a fuzzer against every endpoint of a real node."""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import ServerProcess, free_port
from tests.securitykit import write_tokens

pytestmark = pytest.mark.integration

SET = "/kvservice.v1.KVStore/Set"
FAST = ("--header-timeout-seconds", "1", "--body-timeout-seconds", "1", "--linger-seconds", "2")


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    data = b""
    while time.monotonic() - started < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def _served(server: ServerProcess) -> bool:
    reply = httpx.post(f"{server.url}/kvservice.v1.KVStore/Get", json={"key": "k"}, timeout=2)
    return reply.status_code == 200


def test_slowloris_headers_are_cut_and_others_are_served(make_server) -> None:  # type: ignore[no-untyped-def]
    """Headers trickled byte by byte are cut after header_timeout_seconds; others get answers."""
    server = make_server(*FAST).start()
    slow = [_connect(server) for _ in range(20)]
    for sock in slow:
        sock.sendall(b"POST /kvservice.v1.KVStore/Get HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    cut = set()
    while len(cut) < len(slow) and time.monotonic() - started < 8:
        for i, sock in enumerate(slow):
            if i in cut:
                continue
            try:
                sock.sendall(b"X")  # one more header byte
            except OSError:
                cut.add(i)
        assert _served(server)
        time.sleep(0.2)
    assert len(cut) == len(slow), "slow header senders were not cut"
    assert time.monotonic() - started < 6
    for sock in slow:
        sock.close()


def test_slow_body_and_idle_connections_are_cut(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(*FAST).start()
    with _connect(server) as idle, _connect(server) as slow_body:
        slow_body.sendall(
            b"POST /kvservice.v1.KVStore/Set HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        _, idle_seconds = _read_until_closed(idle)
        data, body_seconds = _read_until_closed(slow_body)
    assert idle_seconds < 5
    assert body_seconds < 5
    assert b"HTTP/1.1 200" not in data
    assert _served(server)
    assert server.proc is not None
    assert server.proc.poll() is None


def test_header_flood_gets_431(make_server) -> None:  # type: ignore[no-untyped-def]
    """Headers over max_header_bytes are answered 431 resource_exhausted, not buffered."""
    server = make_server("--max-header-bytes", "8192").start()
    with _connect(server) as sock:
        sock.sendall(b"POST /kvservice.v1.KVStore/Get HTTP/1.1\r\nHost: x\r\n")
        try:
            for i in range(2000):
                sock.sendall(f"X-Flood-{i}: {'a' * 40}\r\n".encode())
        except OSError:
            pass  # the server closed while we were still sending: also fine
        data, _ = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 431"), data[:100]
    assert b"resource_exhausted" in data
    # Below the limit, many headers are fine.
    headers = {f"x-h{i}": "v" for i in range(50)}
    reply = httpx.post(f"{server.url}/kvservice.v1.KVStore/Get", json={"key": "k"},
                       headers=headers, timeout=5)  # fmt: skip
    assert reply.status_code == 200


def test_connection_limit(make_server) -> None:  # type: ignore[no-untyped-def]
    """Past max_connections new requests get 503; idle ones are cut and service resumes."""
    server = make_server("--max-connections", "4", "--header-timeout-seconds", "1").start()
    idle = [_connect(server) for _ in range(4)]
    time.sleep(0.2)
    reply = httpx.post(f"{server.url}/kvservice.v1.KVStore/Get", json={"key": "k"}, timeout=5)
    assert reply.status_code == 503
    for sock in idle:
        _read_until_closed(sock)
        sock.close()
    assert _served(server)


def _urllib_set(
    server: ServerProcess, size: int, headers: dict[str, str]
) -> tuple[int, dict[str, str]]:
    value = base64.b64encode(b"x" * size).decode()
    body = json.dumps({"key": "big", "value": value}).encode()
    request = urllib.request.Request(
        f"{server.url}{SET}", data=body,
        headers={"content-type": "application/json", **headers},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_early_refusals_reach_a_client_that_sends_its_whole_body_first(
    tmp_path: Path, make_server
) -> None:  # type: ignore[no-untyped-def]
    """A 3 MiB Set from urllib gets resource_exhausted (and 401 without a token), not a reset."""
    tokens = write_tokens(tmp_path / "t.yaml", {"w": {"name": "w", "roles": ["read", "write"]}})
    server = make_server("--auth", "token", "--tokens-file", str(tokens)).start()
    for _ in range(3):
        status, body = _urllib_set(server, 3 * 1024 * 1024, {"authorization": "Bearer w"})
        assert (status, body["code"]) == (429, "resource_exhausted"), body
        status, body = _urllib_set(server, 3 * 1024 * 1024, {})
        assert (status, body["code"]) == (401, "unauthenticated"), body
    status, body = _urllib_set(server, 1000, {"authorization": "Bearer w"})
    assert status == 200
    assert body["revision"] == "1"  # the refused writes left nothing behind


# --- fuzzing -------------------------------------------------------------------------------

PATHS = [
    "/kvservice.v1.KVStore/Get", "/kvservice.v1.KVStore/Set", "/kvservice.v1.KVStore/Delete",
    "/kvservice.v1.KVStore/Nope", "/kvservice.v1.Admin/Snapshot", "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch", "/healthz", "/readyz", "/metrics", "/", "/kvservice.v1.KVStore",
    "/kvservice.v1.KVStore/Get/../Set", "/%2e%2e/metrics",
]  # fmt: skip
CONTENT_TYPES = [
    "application/json", "application/proto", "application/connect+json",
    "application/connect+proto", "application/grpc", "application/grpc-web+proto", "text/plain",
    "application/json; charset=utf-16", "", "multipart/form-data; boundary=x",
]  # fmt: skip
HEADER_NAMES = st.sampled_from([
    "connect-protocol-version", "connect-timeout-ms", "x-any", "te", "connect-accept-encoding",
    "accept-encoding", "grpc-timeout",
])  # fmt: skip
ENCODINGS = ["", "gzip", "identity", "br", "zstd", "gzip, gzip", "x"]
TOKENS = ["", "Bearer reader-token", "Bearer nope", "Basic abc", "Bearer eyJhbGciOiJub25lIn0.e30."]
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
    str.strip
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"key": st.text(max_size=30), "value": st.text(max_size=30)},
        optional={"extra": json_values},
    ).map(lambda v: json.dumps(v).encode()),
)


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("fuzz")
    tokens = write_tokens(tmp / "t.yaml", {"reader-token": {"name": "reader", "roles": ["read"]}})
    server = ServerProcess(
        data_dir=tmp / "data", port=free_port(),
        args=["--auth", "token", "--tokens-file", str(tokens), "--max-value-bytes", "1024"],
    )  # fmt: skip
    server.start()
    yield server
    server.kill()


requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "OPTIONS", "DELETE"]),
        "path": st.sampled_from(PATHS),
        "query": st.sampled_from(
            ["", "?encoding=json&message=%7B%7D", "?message=%ZZ", "?base64=1&message=!!"]
        ),
        "content_type": st.sampled_from(CONTENT_TYPES) | header_text,
        "encoding": st.sampled_from(ENCODINGS),
        "token": st.sampled_from(TOKENS),
        "extra": st.dictionaries(HEADER_NAMES, header_text, max_size=3),
        "body": bodies,
    }
)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(req=requests)
def test_fuzz_never_breaks_the_node(fuzz_node: ServerProcess, req: dict[str, Any]) -> None:
    """No 5xx (other than a deliberate unavailable), no crash, no write by a read-only caller."""
    headers = {"content-type": req["content_type"], **req["extra"]}
    if req["encoding"]:
        headers["content-encoding"] = req["encoding"]
    if req["token"]:
        headers["authorization"] = req["token"]
    url = f"{fuzz_node.url}{req['path']}{req['query']}"
    reply = httpx.request(req["method"], url, content=req["body"], headers=headers, timeout=10)
    # Deliberate 5xx answers only: `unavailable` (503), and `unimplemented` (501), which
    # the Connect protocol gives e.g. a Content-Encoding the server does not speak.
    deliberate = (reply.status_code == 503 and "unavailable" in reply.text) or (
        reply.status_code == 501 and '"unimplemented"' in reply.text
    )
    assert reply.status_code < 500 or deliberate, (reply.status_code, reply.text[:300])
    assert "Traceback" not in reply.text


def test_after_fuzzing_nothing_was_written_and_nothing_crashed(fuzz_node: ServerProcess) -> None:
    """Runs after the fuzzer: its read-only and unauthenticated callers wrote nothing."""
    assert fuzz_node.proc is not None
    assert fuzz_node.proc.poll() is None
    metrics = httpx.get(f"{fuzz_node.url}/metrics", timeout=5).text
    assert "\nkvservice_revision 0.0\n" in metrics
    assert not list((fuzz_node.data_dir / "snap").glob("*.snap"))
    assert '"level": "error"' not in fuzz_node.log()
    assert "Traceback" not in fuzz_node.log()
