"""Scan through real servers: Connect JSON, binary protobuf, HTTP GET, bad input,
replicas, and access control confining a scan to the caller's prefixes."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.v1.kv_connect import KVStoreClientSync
from kvservice.v1.kv_pb2 import ScanRequest, ScanResponse, SetRequest
from tests.integration.cluster import Cluster, wait_streaming
from tests.integration.conftest import ServerProcess
from tests.integration.test_buf_curl import buf_curl
from tests.securitykit import AUDIENCE, ISSUER, JwtKeys, write_tokens

pytestmark = pytest.mark.integration
SCAN = "/kvservice.v1.KVStore/Scan"
# Byte order of the UTF-8 keys: ASCII, then é (2 bytes), 中 (3), 😀 (4).
ROOM_KEYS = ["room:1:name", "room:1:topic", "room:2:name", "room:é", "room:中", "room:😀"]


def fill(client: KVStoreClientSync, keys: list[str], headers: dict[str, str] | None = None) -> int:
    revision = 0
    for key in keys:
        revision = client.set(SetRequest(key=key, value=key.encode()), headers=headers).revision
    return revision


def post_json(url: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        url + SCAN, content=json.dumps(body),
        headers={"content-type": "application/json", **(headers or {})}, timeout=10,
    )  # fmt: skip


def walk(client: KVStoreClientSync, request: ScanRequest) -> list[ScanResponse]:
    pages = [client.scan(request)]
    while pages[-1].next_start_after:
        request.start_after = pages[-1].next_start_after
        pages.append(client.scan(request))
    return pages


@pytest.fixture
def node(make_server) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    """A node holding ROOM_KEYS and two other keys, with a small scan_max_bytes."""
    server = make_server("--scan-max-bytes", "1024").start()
    with server.client() as client:
        fill(client, [*reversed(ROOM_KEYS), "user:1:session", "roomy"])
    yield server
    server.stop()


def test_connect_json_pages_in_byte_order(node: ServerProcess) -> None:
    first = post_json(node.url, {"prefix": "room:", "limit": 4})
    assert first.status_code == 200, first.text
    page = first.json()
    assert [item["key"] for item in page["items"]] == ROOM_KEYS[:4]
    assert page["items"][0]["value"] == "cm9vbToxOm5hbWU="  # base64 of "room:1:name"
    assert page["nextStartAfter"] == "room:é"
    assert page["revision"] == "8"  # a 64-bit revision is a JSON string
    rest = post_json(
        node.url, {"prefix": "room:", "startAfter": page["nextStartAfter"], "keysOnly": True}
    ).json()
    assert [item["key"] for item in rest["items"]] == ROOM_KEYS[4:]
    assert all("value" not in item for item in rest["items"])
    assert "nextStartAfter" not in rest  # empty: the last page


def test_binary_protobuf_walk_with_the_client(node: ServerProcess) -> None:
    with node.client(proto_json=False) as client:
        pages = walk(client, ScanRequest(prefix="room:", limit=2))
        every = walk(client, ScanRequest())
    assert [len(p.items) for p in pages] == [2, 2, 2]
    assert [i.key for p in pages for i in p.items] == ROOM_KEYS
    assert [i.value for p in pages for i in p.items] == [k.encode() for k in ROOM_KEYS]
    assert [i.key for p in every for i in p.items] == [*ROOM_KEYS, "roomy", "user:1:session"]


def test_pages_are_bounded_by_scan_max_bytes(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--scan-max-bytes", "1024").start()
    with server.client(proto_json=False) as client:
        for i in range(5):
            client.set(SetRequest(key=f"big:{i}", value=b"x" * 400))
        pages = walk(client, ScanRequest(prefix="big:"))
    assert [len(p.items) for p in pages] == [2, 2, 1]


def test_scan_works_as_an_http_get(node: ServerProcess) -> None:
    message = urllib.parse.quote(json.dumps({"prefix": "room:1:"}))
    reply = httpx.get(f"{node.url}{SCAN}?encoding=json&message={message}", timeout=10)
    assert reply.status_code == 200, reply.text
    assert [item["key"] for item in reply.json()["items"]] == ["room:1:name", "room:1:topic"]


def test_buf_curl_scans(node: ServerProcess) -> None:
    """The operator's tool reads the schema from proto/ and prints a page."""
    done = buf_curl(f"{node.url}{SCAN}", '{"prefix":"room:1:","keysOnly":true}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "revision": "8",
        "items": [
            {"key": "room:1:name", "revision": "6"},
            {"key": "room:1:topic", "revision": "5"},
        ],
    }


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"limit": 1001}, "limit is 1001; a Scan page holds at most 1000 keys"),
        ({"limit": -1}, ""),
        ({"limit": "many"}, ""),
        ({"prefix": 7}, ""),
        ({"prefix": "x" * 1025}, "prefix is 1025 bytes; the limit is 1024"),
        ({"startAfter": "x" * 1025}, "start_after is 1025 bytes"),
    ],
)
def test_bad_input_is_invalid_argument(node: ServerProcess, body: object, words: str) -> None:
    reply = post_json(node.url, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == "invalid_argument"
    assert words in reply.json()["message"]


def test_min_revision_not_reached_is_deadline_exceeded(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--min-revision-max-wait-ms", "200").start()
    with server.client() as client, pytest.raises(ConnectError) as caught:
        client.scan(ScanRequest(min_revision=10))
    assert caught.value.code == Code.DEADLINE_EXCEEDED


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path)
    try:
        yield nodes
    finally:
        print(nodes.logs())
        nodes.close()


def test_a_replica_serves_scan_at_the_revision_asked_for(cluster: Cluster) -> None:
    primary, [replica] = cluster.primary_with_replicas(1)
    wait_streaming(primary, replica)
    with primary.client() as client:
        revision = fill(client, ROOM_KEYS)
    with replica.client() as client:
        page = client.scan(ScanRequest(prefix="room:", min_revision=revision))
    assert page.revision >= revision
    assert [i.key for i in page.items] == ROOM_KEYS


# -- access control: a scan is confined to the caller's prefixes ---------------------------

ROOT = "root-token"
ROOMS_READER = "rooms-reader-token"


@pytest.fixture
def secured(make_server, tmp_path: Path) -> Iterator[tuple[ServerProcess, JwtKeys]]:  # type: ignore[no-untyped-def]
    keys = JwtKeys.make(tmp_path)
    tokens = write_tokens(
        tmp_path / "tokens.yaml",
        {
            ROOT: {"name": "root", "roles": ["read", "write"]},
            ROOMS_READER: {"name": "rooms", "roles": ["read"], "prefixes": ["room:"]},
        },
    )
    server = make_server(
        "--auth", "token", "--tokens-file", str(tokens),
        "--jwt-hs256-secret-file", str(keys.secret_file),
        "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE,
    ).start()  # fmt: skip
    with server.client() as client:
        fill(client, [*ROOM_KEYS, "user:alice:a", "user:alice:b", "user:bob:a"], _bearer(ROOT))
    yield server, keys
    server.stop()


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize("prefix", ["", "r", "roo", "user:", "roomy"])
def test_a_token_confined_to_a_prefix_cannot_scan_outside_it(
    secured: tuple[ServerProcess, JwtKeys], prefix: str
) -> None:
    server, _ = secured
    reply = post_json(server.url, {"prefix": prefix}, _bearer(ROOMS_READER))
    assert reply.status_code == 403, reply.text
    assert reply.json()["code"] == "permission_denied"
    assert f"prefix '{prefix}' is outside" in reply.json()["message"]


def test_a_token_confined_to_a_prefix_scans_inside_it(
    secured: tuple[ServerProcess, JwtKeys],
) -> None:
    server, _ = secured
    inside = post_json(server.url, {"prefix": "room:1:"}, _bearer(ROOMS_READER)).json()
    assert [i["key"] for i in inside["items"]] == ["room:1:name", "room:1:topic"]
    # A cursor past the prefix cannot reach further keys: the page is empty, not "user:...".
    past = post_json(server.url, {"prefix": "room:", "startAfter": "t"}, _bearer(ROOMS_READER))
    assert past.status_code == 200
    assert past.json().get("items", []) == []


def test_a_jwt_scans_only_its_own_prefix(secured: tuple[ServerProcess, JwtKeys]) -> None:
    server, keys = secured
    alice = _bearer(keys.token("alice"))
    own = post_json(server.url, {"prefix": "user:alice:"}, alice)
    assert [i["key"] for i in own.json()["items"]] == ["user:alice:a", "user:alice:b"]
    for prefix in ["user:", "user:bob:", "", "user:alic"]:
        reply = post_json(server.url, {"prefix": prefix}, alice)
        assert reply.json()["code"] == "permission_denied", (prefix, reply.text)
