"""The KVStore API of a real node, over HTTP, with the real Connect client and plain httpx."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.v1.kv_pb2 import DeleteRequest, GetRequest, SetRequest
from tests.integration.conftest import ServerProcess

pytestmark = pytest.mark.integration

KV = "/kvservice.v1.KVStore"
MiB = 1024 * 1024


def revision(server: ServerProcess) -> int:
    """The node's current revision, as /readyz reports it."""
    body = httpx.get(f"{server.url}/readyz", timeout=5).json()
    return int(body["revision"])


@pytest.mark.parametrize("proto_json", [True, False], ids=["json", "proto"])
def test_set_get_delete_round_trip(server: ServerProcess, proto_json: bool) -> None:
    """Set, Get and Delete work end to end with the Connect client, in JSON and in protobuf."""
    with server.client(proto_json=proto_json) as kv:
        first = kv.set(SetRequest(key="user:1", value=b"\x00alice\xff")).revision
        got = kv.get(GetRequest(key="user:1"))
        assert (got.found, got.value, got.revision) == (True, b"\x00alice\xff", first)

        second = kv.set(SetRequest(key="user:1", value=b"bob")).revision
        assert second == first + 1
        got = kv.get(GetRequest(key="user:1"))
        assert (got.found, got.value, got.revision) == (True, b"bob", second)

        deleted = kv.delete(DeleteRequest(key="user:1"))
        assert (deleted.deleted, deleted.revision) == (True, second + 1)
        got = kv.get(GetRequest(key="user:1"))
        assert (got.found, got.value, got.revision) == (False, b"", 0)


def test_revisions_are_global_and_monotonic(server: ServerProcess) -> None:
    """Every write takes the next global revision; Get returns the key's last-change revision."""
    with server.client() as kv_json, server.client(proto_json=False) as kv_proto:
        assert kv_json.set(SetRequest(key="a", value=b"1")).revision == 1
        assert kv_proto.set(SetRequest(key="b", value=b"2")).revision == 2
        assert kv_json.set(SetRequest(key="a", value=b"3")).revision == 3
        assert kv_proto.delete(DeleteRequest(key="b")).revision == 4
        assert kv_json.set(SetRequest(key="c", value=b"5")).revision == 5

        # Each key remembers its own last change, not the node's current revision.
        assert kv_proto.get(GetRequest(key="a")).revision == 3
        assert kv_json.get(GetRequest(key="c")).revision == 5
        assert not kv_json.get(GetRequest(key="b")).found
        assert revision(server) == 5


def test_delete_of_missing_key_returns_current_revision(server: ServerProcess) -> None:
    """Deleting a missing key answers deleted=false with the current revision and uses none."""
    with server.client(proto_json=False) as kv:
        kv.set(SetRequest(key="present", value=b"v"))
        kv.set(SetRequest(key="other", value=b"v"))
        missing = kv.delete(DeleteRequest(key="never-set"))
        assert (missing.deleted, missing.revision) == (False, 2)
        again = kv.delete(DeleteRequest(key="never-set"))
        assert (again.deleted, again.revision) == (False, 2)
        assert kv.set(SetRequest(key="next", value=b"v")).revision == 3
    # The JSON form omits deleted=false (proto3 default) but carries the revision.
    reply = httpx.post(
        f"{server.url}{KV}/Delete", json={"key": "never-set"}, timeout=5
    ).raise_for_status()
    assert reply.json() == {"revision": "3"}


def test_get_with_http_get_from_the_connect_client(make_server) -> None:  # type: ignore[no-untyped-def]
    """The Connect client's use_get=True sends Get as an HTTP GET and gets the same answer."""
    server = make_server("--access-log").start()
    with server.client() as kv:
        written = kv.set(SetRequest(key="greeting", value=b"hello")).revision
        got = kv.get(GetRequest(key="greeting"), use_get=True)
        assert (got.found, got.value, got.revision) == (True, b"hello", written)
        assert not kv.get(GetRequest(key="missing"), use_get=True).found
    with server.client(proto_json=False) as kv:
        assert kv.get(GetRequest(key="greeting"), use_get=True).value == b"hello"
    assert server.stop() == 0
    access = [
        json.loads(line) for line in server.log().splitlines() if '"kvservice.access"' in line
    ]
    gets = [(e["http_method"], e["code"]) for e in access if e["method"] == "Get"]
    assert gets == [("GET", "ok")] * 3


def test_get_with_plain_http_get(server: ServerProcess) -> None:
    """A plain HTTP GET with ?encoding=json&message=<JSON> reads a key (curl-friendly)."""
    with server.client() as kv:
        written = kv.set(SetRequest(key="room/42 ключ", value=b"\x01\x02")).revision
    reply = httpx.get(
        f"{server.url}{KV}/Get",
        params={"encoding": "json", "message": json.dumps({"key": "room/42 ключ"})},
        timeout=5,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {
        "found": True,
        "value": base64.b64encode(b"\x01\x02").decode(),
        "revision": str(written),
    }
    missing = httpx.get(
        f"{server.url}{KV}/Get",
        params={"encoding": "json", "message": '{"key":"nope"}'},
        timeout=5,
    )
    assert (missing.status_code, missing.json()) == (200, {})


@pytest.mark.parametrize(
    ("method", "message"),
    [("Set", {"key": "sneaky", "value": "dg=="}), ("Delete", {"key": "keep"})],
)
def test_write_via_http_get_is_refused(
    server: ServerProcess, method: str, message: dict[str, str]
) -> None:
    """Set and Delete have side effects, so an HTTP GET of them is refused and changes nothing."""
    with server.client() as kv:
        kv.set(SetRequest(key="keep", value=b"v"))
    reply = httpx.get(
        f"{server.url}{KV}/{method}",
        params={"encoding": "json", "message": json.dumps(message)},
        timeout=5,
    )
    assert reply.status_code == 405, reply.text
    assert reply.json()["code"] == "unimplemented"
    assert "POST" in reply.json()["message"]
    assert revision(server) == 1
    with server.client() as kv:
        assert not kv.get(GetRequest(key="sneaky")).found
        assert kv.get(GetRequest(key="keep")).found


UNICODE_KEYS = [
    "ключ",
    "键",
    "🔑🗝️",
    "é",  # U+00E9
    "e\u0301",  # e + combining acute: a different key (no normalisation)
    "tab\tnew\nline",
    "nul\x00inside",
    "room:42/typing indicator",
]


@pytest.mark.parametrize("proto_json", [True, False], ids=["json", "proto"])
def test_unicode_keys(server: ServerProcess, proto_json: bool) -> None:
    """Keys are arbitrary UTF-8 strings, stored and compared exactly as sent."""
    with server.client(proto_json=proto_json) as kv:
        for index, key in enumerate(UNICODE_KEYS):
            kv.set(SetRequest(key=key, value=str(index).encode()))
    with server.client(proto_json=not proto_json) as kv:
        for index, key in enumerate(UNICODE_KEYS):
            got = kv.get(GetRequest(key=key))
            assert (got.found, got.value, got.revision) == (True, str(index).encode(), index + 1)


def test_key_limit_counts_utf8_bytes(make_server) -> None:  # type: ignore[no-untyped-def]
    """The key limit counts UTF-8 bytes: exactly max_key_bytes fits, one byte more does not."""
    server = make_server("--max-key-bytes", "8").start()
    with server.client(proto_json=False) as kv:
        assert kv.set(SetRequest(key="éééé", value=b"2-byte chars")).revision == 1
        assert kv.set(SetRequest(key="🔑🔑", value=b"4-byte chars")).revision == 2
        for key in ("éééé1", "🔑🔑a", "123456789"):
            with pytest.raises(ConnectError) as caught:
                kv.set(SetRequest(key=key, value=b"x"))
            assert caught.value.code == Code.INVALID_ARGUMENT
        assert kv.get(GetRequest(key="éééé")).value == b"2-byte chars"


@pytest.mark.parametrize("proto_json", [True, False], ids=["json", "proto"])
def test_empty_value_is_a_value(server: ServerProcess, proto_json: bool) -> None:
    """An empty value is stored and found, and differs from a missing key."""
    with server.client(proto_json=proto_json) as kv:
        written = kv.set(SetRequest(key="empty", value=b"")).revision
        got = kv.get(GetRequest(key="empty"))
        assert (got.found, got.value, got.revision) == (True, b"", written)
        assert not kv.get(GetRequest(key="absent")).found
    reply = httpx.post(f"{server.url}{KV}/Get", json={"key": "empty"}, timeout=5)
    assert reply.json() == {"found": True, "revision": str(written)}


@pytest.mark.parametrize("proto_json", [True, False], ids=["json", "proto"])
def test_value_of_exactly_max_value_bytes_is_accepted(
    server: ServerProcess, proto_json: bool
) -> None:
    """With the default 1 MiB limit, a value of exactly 1 MiB is stored; 1 MiB + 1 is refused."""
    value = os.urandom(MiB)
    with server.client(proto_json=proto_json) as kv:
        written = kv.set(SetRequest(key="blob", value=value)).revision
        got = kv.get(GetRequest(key="blob"))
        assert (got.found, got.value == value, got.revision) == (True, True, written)
        with pytest.raises(ConnectError) as caught:
            kv.set(SetRequest(key="blob", value=value + b"!"))
        assert caught.value.code == Code.INVALID_ARGUMENT
        assert "max_value_bytes" in caught.value.message
        assert kv.get(GetRequest(key="blob")).revision == written


def test_value_of_exactly_max_value_bytes_with_plain_json(server: ServerProcess) -> None:
    """A 1 MiB value with a maximal key also fits through plain uncompressed Connect JSON."""
    value = os.urandom(MiB)
    key = "k" * 1024
    reply = httpx.post(
        f"{server.url}{KV}/Set",
        json={"key": key, "value": base64.b64encode(value).decode()},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text[:500]
    with server.client(proto_json=False) as kv:
        assert kv.get(GetRequest(key=key)).value == value


def test_data_survives_a_graceful_restart(make_server) -> None:  # type: ignore[no-untyped-def]
    """After SIGTERM (exit 0) a node started on the same data dir has every key and revision."""
    first = make_server().start()
    with first.client(proto_json=False) as kv:
        for i in range(50):
            kv.set(SetRequest(key=f"k{i}", value=f"v{i}".encode()))
        kv.set(SetRequest(key="k7", value=b"changed"))
        kv.delete(DeleteRequest(key="k3"))
        kv.set(SetRequest(key="empty", value=b""))
    assert revision(first) == 53
    assert first.stop() == 0

    second = make_server(data_dir=first.data_dir).start()
    assert revision(second) == 53
    with second.client() as kv:
        assert kv.get(GetRequest(key="k0")).value == b"v0"
        got = kv.get(GetRequest(key="k7"))
        assert (got.value, got.revision) == (b"changed", 51)
        assert not kv.get(GetRequest(key="k3")).found
        got = kv.get(GetRequest(key="empty"))
        assert (got.found, got.value, got.revision) == (True, b"", 53)
        assert kv.get(GetRequest(key="k49")).revision == 50
        # Revisions carry on from where the previous process stopped.
        assert kv.set(SetRequest(key="after", value=b"restart")).revision == 54
    assert second.stop() == 0
