"""Bad requests over plain HTTP: the right Connect error, no traceback, crash or partial write."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.integration.conftest import ServerProcess, free_port

pytestmark = pytest.mark.integration

KV = "/kvservice.v1.KVStore"
MAX_KEY = 16
MAX_VALUE = 64
# What the node accepts as a request body at MAX_VALUE (see kvservice/app.py): anything far
# above it must be refused before it is read.
FAR_OVER_LIMIT = 4 * 1024 * 1024
JSON = {"content-type": "application/json"}
PROTO = {"content-type": "application/proto"}
TRACEBACK_MARKERS = ("Traceback", 'File "', "kvservice/", "site-packages", "Error:")


@dataclass
class Bad:
    """One bad request and the answer it must get."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    status: int = 400
    code: str | None = "invalid_argument"
    words: tuple[str, ...] = ()


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


BAD_REQUESTS: dict[str, Bad] = {
    "empty key": Bad(f"{KV}/Set", _json({"key": "", "value": "dg=="}), words=("key", "empty")),
    "empty key on get": Bad(f"{KV}/Get", _json({"key": ""}), words=("key", "empty")),
    "missing key field": Bad(f"{KV}/Delete", b"{}", words=("key", "empty")),
    "oversized key": Bad(
        f"{KV}/Set",
        _json({"key": "k" * (MAX_KEY + 1), "value": ""}),
        words=(str(MAX_KEY + 1), str(MAX_KEY), "max_key_bytes"),
    ),
    "oversized multibyte key": Bad(
        f"{KV}/Get",
        _json({"key": "é" * (MAX_KEY // 2 + 1)}),
        words=(str(MAX_KEY + 2), str(MAX_KEY), "max_key_bytes"),
    ),
    "oversized value": Bad(
        f"{KV}/Set",
        _json({"key": "k", "value": _b64(b"v" * (MAX_VALUE + 1))}),
        words=(str(MAX_VALUE + 1), str(MAX_VALUE), "max_value_bytes"),
    ),
    "oversized value in protobuf": Bad(
        f"{KV}/Set",
        # SetRequest{key: "k", value: 65 bytes}
        b"\x0a\x01k\x12" + bytes([MAX_VALUE + 1]) + b"v" * (MAX_VALUE + 1),
        headers=dict(PROTO),
        words=("max_value_bytes",),
    ),
    "body far over the limit": Bad(
        f"{KV}/Set",
        _json({"key": "k", "value": _b64(b"v" * FAR_OVER_LIMIT)}),
        status=429,
        code="resource_exhausted",
        words=("limit",),
    ),
    "malformed JSON": Bad(f"{KV}/Set", b'{"key": "k", "value":', words=("JSON",)),
    "JSON that is not an object": Bad(f"{KV}/Get", b"[1, 2]", words=("JSON",)),
    "wrong JSON field type": Bad(f"{KV}/Set", b'{"key": 5}', words=("key",)),
    "value that is not base64": Bad(
        f"{KV}/Set", b'{"key": "k", "value": "not base64!"}', words=("value", "base64")
    ),
    "invalid UTF-8 in JSON": Bad(f"{KV}/Get", b'{"key": "\xff\xfe"}', words=("JSON",)),
    "malformed protobuf": Bad(f"{KV}/Set", b"\x0a\xff\xff\xff", headers=dict(PROTO)),
    "protobuf string that is not UTF-8": Bad(
        f"{KV}/Get", b"\x0a\x02\xff\xfe", headers=dict(PROTO), words=("UTF-8",)
    ),
    "malformed GET message": Bad(
        f"{KV}/Get?encoding=json&message=%7Bkey", b"", headers={}, words=("JSON",)
    ),
    "wrong content type": Bad(
        f"{KV}/Set", b"key=k", headers={"content-type": "text/plain"}, status=415, code=None
    ),
    "no content type": Bad(f"{KV}/Set", b'{"key":"k"}', headers={}, status=415, code=None),
    "unknown method": Bad(f"{KV}/Frobnicate", b'{"key":"k"}', status=404, code=None),
    "unknown service": Bad("/kvservice.v9.Other/Set", b'{"key":"k"}', status=404, code=None),
    "unsupported Connect protocol version": Bad(
        f"{KV}/Set",
        b'{"key":"k","value":"dg=="}',
        headers={**JSON, "connect-protocol-version": "2"},
        words=("connect-protocol-version",),
    ),
}


LIMITS = ("--max-key-bytes", str(MAX_KEY), "--max-value-bytes", str(MAX_VALUE))


def seed(server: ServerProcess) -> ServerProcess:
    """Write one key, `seed`, at revision 1."""
    reply = httpx.post(f"{server.url}{KV}/Set", json={"key": "seed", "value": "c2VlZA=="})
    assert reply.json() == {"revision": "1"}
    return server


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One small-limit node for the table of bad requests (read-only checks between them)."""
    data_dir = tmp_path_factory.mktemp("errors") / "data"
    server = ServerProcess(data_dir=data_dir, port=free_port(), args=list(LIMITS))
    try:
        yield seed(server.start())
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


@pytest.fixture
def node(make_server) -> ServerProcess:  # type: ignore[no-untyped-def]
    """A fresh small-limit node with `seed` written at revision 1."""
    return seed(make_server(*LIMITS).start())


def send(server: ServerProcess, bad: Bad) -> httpx.Response:
    method = "GET" if "?" in bad.path else "POST"
    return httpx.request(
        method, server.url + bad.path, content=bad.body or None, headers=bad.headers, timeout=10
    )


def assert_unchanged(server: ServerProcess) -> None:
    """The process lives, still serves, and holds exactly what it held before."""
    assert server.proc is not None
    assert server.proc.poll() is None, server.log()
    ready = httpx.get(f"{server.url}/readyz", timeout=5)
    assert (ready.status_code, ready.json()) == (
        200,
        {"ready": True, "role": "primary", "revision": "1"},
    )
    got = httpx.post(f"{server.url}{KV}/Get", json={"key": "seed"}, timeout=5)
    assert got.json() == {"found": True, "value": "c2VlZA==", "revision": "1"}


def assert_unharmed(server: ServerProcess) -> None:
    """Unchanged, and still takes writes."""
    assert_unchanged(server)
    # A good write still works afterwards, and takes the next revision.
    put = httpx.post(f"{server.url}{KV}/Set", json={"key": "after", "value": ""}, timeout=5)
    assert put.json() == {"revision": "2"}


def assert_no_traceback(text: str) -> None:
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, text


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_the_right_error(shared_node: ServerProcess, name: str) -> None:
    """Each bad request gets its Connect error and a readable message, and changes nothing."""
    bad = BAD_REQUESTS[name]
    reply = send(shared_node, bad)
    assert reply.status_code == bad.status, reply.text
    assert_no_traceback(reply.text)
    if bad.code is not None:
        assert reply.headers["content-type"].startswith("application/json")
        body = reply.json()
        assert body["code"] == bad.code
        message = body["message"]
        assert isinstance(message, str)
        assert 10 <= len(message) <= 500, message
        for word in bad.words:
            assert word in message, message
    assert_unchanged(shared_node)


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_streamed_body_far_over_the_limit_is_resource_exhausted(node: ServerProcess) -> None:
    """A chunked body with no Content-Length is cut off at the limit too."""
    body = _json({"key": "k", "value": _b64(b"v" * FAR_OVER_LIMIT)})
    reply = httpx.post(f"{node.url}{KV}/Set", content=_chunks(body), headers=JSON, timeout=10)
    assert reply.status_code == 429, reply.text
    assert reply.json()["code"] == "resource_exhausted"
    assert_no_traceback(reply.text)
    assert_unharmed(node)


def test_node_survives_every_bad_request_in_a_row(node: ServerProcess) -> None:
    """All the bad requests one after another: no crash, no write, no traceback in the log."""
    for bad in BAD_REQUESTS.values():
        for _ in range(3):
            assert send(node, bad).status_code == bad.status
    assert_unharmed(node)
    assert node.stop() == 0
    log = node.log()
    assert "Traceback" not in log
    assert '"level": "error"' not in log
    assert '"level": "critical"' not in log
