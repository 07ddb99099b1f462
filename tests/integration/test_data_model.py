"""TTL, compare-and-set, counters, Txn and MGet on real nodes over HTTP: Connect JSON
(plain httpx, as curl sends it), binary protobuf (the Connect client), SIGKILL, a
replica, and bad input that must change nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.storage import record
from kvservice.storage.segments import list_segments
from kvservice.v1.kv_pb2 import (
    Condition,
    DeleteRequest,
    GetRequest,
    IncrementRequest,
    MGetRequest,
    Op,
    SetRequest,
    TouchRequest,
    TxnRequest,
)
from kvservice.v1.log_pb2 import LogEntry
from tests.integration.cluster import Cluster, wait_caught_up
from tests.integration.conftest import ServerProcess, wait_for

pytestmark = pytest.mark.integration

KV = "/kvservice.v1.KVStore"


def call(server: ServerProcess, method: str, body: dict[str, Any]) -> httpx.Response:
    """A Connect JSON POST, as `curl -H 'Content-Type: application/json' -d ...` sends it."""
    return httpx.post(f"{server.url}{KV}/{method}", json=body, timeout=10)


def ok(server: ServerProcess, method: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = call(server, method, body)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def refused(server: ServerProcess, method: str, body: dict[str, Any], code: str) -> str:
    reply = call(server, method, body)
    assert reply.json()["code"] == code, reply.text
    message: str = reply.json()["message"]
    return message


def revision(server: ServerProcess) -> int:
    return int(httpx.get(f"{server.url}/readyz", timeout=5).json()["revision"])


def wal_entries(data_dir: Path) -> list[LogEntry]:
    entries = []
    for segment in list_segments(data_dir / "wal"):
        data = segment.read_bytes()
        entries += [LogEntry.FromString(p) for _, p in record.scan(data, str(segment))]
    return entries


def keys_gauge(server: ServerProcess) -> int:
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("kvservice_keys "):
            return int(float(line.split()[1]))
    raise AssertionError("no kvservice_keys metric")


# -- TTL ----------------------------------------------------------------------------------


def test_ttl_in_json_get_touch_and_expiry_in_the_wal(server: ServerProcess) -> None:
    """Set with ttlMs shows expiresAtMs; Touch moves it without the value; once it passes
    the key is gone and the WAL holds a DELETE marked as an expiry."""
    before = time.time() * 1000
    set_rev = int(
        ok(server, "Set", {"key": "typing:room1:alice", "value": "MQ==", "ttlMs": 800})["revision"]
    )
    got = ok(server, "Get", {"key": "typing:room1:alice"})
    expires = int(got["expiresAtMs"])
    assert before + 800 <= expires <= time.time() * 1000 + 800
    touched = ok(server, "Touch", {"key": "typing:room1:alice", "ttlMs": 1500})
    assert int(touched["revision"]) == set_rev + 1
    assert int(touched["expiresAtMs"]) > expires
    got = ok(server, "Get", {"key": "typing:room1:alice"})
    assert got["value"] == "MQ=="
    assert got["revision"] == touched["revision"]
    # ttlMs 0 removes the expiry; a Set without ttlMs does too (as Redis SET).
    ok(server, "Touch", {"key": "typing:room1:alice", "ttlMs": 0})
    assert "expiresAtMs" not in ok(server, "Get", {"key": "typing:room1:alice"})
    ok(server, "Touch", {"key": "typing:room1:alice", "ttlMs": 300})
    wait_for("the key to expire", lambda: not ok(server, "Get", {"key": "typing:room1:alice"}))
    wait_for("the expiry cycle to remove it", lambda: keys_gauge(server) == 0, timeout=5)
    server.stop()
    last = wal_entries(server.data_dir)[-1]
    assert (last.operation, last.key, last.expired) == (
        LogEntry.OPERATION_DELETE, "typing:room1:alice", True,
    )  # fmt: skip


def test_expiry_under_write_load_is_on_time(server: ServerProcess) -> None:
    """200 keys expiring together while a writer keeps the node busy are all removed, each
    within a bounded lateness (measured from the key's expiry to its removal)."""
    with server.client(proto_json=False) as kv:
        for i in range(200):
            kv.set(SetRequest(key=f"presence:{i}", value=b"online", ttl_ms=1000))
        expires = kv.get(GetRequest(key="presence:199")).expires_at_ms
        stop = threading.Event()

        def writer() -> None:
            with server.client(proto_json=False) as busy:
                while not stop.is_set():
                    busy.set(SetRequest(key="load", value=b"x" * 100))

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_for("every presence key removed", lambda: keys_gauge(server) == 1, timeout=10)
            lateness_ms = time.time() * 1000 - expires
        finally:
            stop.set()
            thread.join(10)
    # expiry_cycle_ms (100) + one wheel slot (100) + the poll; generous for a shared machine.
    assert lateness_ms < 1500, f"removed {lateness_ms:.0f} ms after expiry"
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert "kvservice_expired_keys_total 200.0" in metrics
    server.stop()
    expired = [e for e in wal_entries(server.data_dir) if e.expired]
    assert sorted(e.key for e in expired) == sorted(f"presence:{i}" for i in range(200))


def test_no_expired_key_after_sigkill_and_restart(make_server) -> None:  # type: ignore[no-untyped-def]
    """Keys whose TTL passes while the node is down are never visible after restart, and
    the restarted primary removes them."""
    server = make_server().start()
    with server.client(proto_json=False) as kv:
        for i in range(50):
            kv.set(SetRequest(key=f"session:{i}", value=b"token", ttl_ms=700))
        kv.set(SetRequest(key="forever", value=b"1"))
    server.kill()
    time.sleep(1.0)
    server.start()
    with server.client() as kv:
        assert not any(kv.get(GetRequest(key=f"session:{i}")).found for i in range(50))
        assert kv.get(GetRequest(key="forever")).found
    wait_for("expired keys removed after restart", lambda: keys_gauge(server) == 1, timeout=5)


def test_replica_hides_an_expired_key_before_the_primary_deletes_it(tmp_path: Path) -> None:
    """With the primary frozen (SIGSTOP) the replica never receives the DELETE, yet stops
    returning the key once its expiry passes; the key is still in its store."""
    cluster = Cluster(tmp_path)
    try:
        primary, (replica,) = cluster.primary_with_replicas(1)
        with primary.client() as kv:
            kv.set(SetRequest(key="presence:bob", value=b"online", ttl_ms=1500))
        wait_caught_up(primary, [replica])
        os.kill(primary.pid, signal.SIGSTOP)
        try:
            with replica.client() as kv:
                got = kv.get(GetRequest(key="presence:bob"))
                assert got.found
                assert got.expires_at_ms > 0
                wait_for(
                    "the replica to hide it",
                    lambda: not kv.get(GetRequest(key="presence:bob")).found,
                    timeout=5,
                )
                assert replica.metric("kvservice_keys") == 1  # hidden, not deleted
        finally:
            os.kill(primary.pid, signal.SIGCONT)
        wait_for(
            "the primary's DELETE to reach the replica",
            lambda: replica.metric("kvservice_keys") == 0,
        )
    finally:
        cluster.close()


# -- compare-and-set, counters ----------------------------------------------------------


def test_compare_and_set_in_json(server: ServerProcess) -> None:
    """if_revision: 0 = only if absent; a mismatch is aborted naming the current revision."""
    first = int(
        ok(server, "Set", {"key": "session:1", "value": "YQ==", "ifRevision": 0})["revision"]
    )
    message = refused(
        server, "Set", {"key": "session:1", "value": "Yg==", "ifRevision": 0}, "aborted"
    )
    assert f"at revision {first}" in message
    second = int(
        ok(server, "Set", {"key": "session:1", "value": "Yg==", "ifRevision": first})["revision"]
    )
    refused(server, "Touch", {"key": "session:1", "ttlMs": 5000, "ifRevision": first}, "aborted")
    refused(server, "Delete", {"key": "session:1", "ifRevision": first}, "aborted")
    assert ok(server, "Get", {"key": "session:1"})["value"] == "Yg=="
    assert ok(server, "Delete", {"key": "session:1", "ifRevision": second})["deleted"]
    assert revision(server) == second + 1


def test_increment_counts_in_decimal_text(server: ServerProcess) -> None:
    with server.client(proto_json=False) as kv:
        assert kv.increment(IncrementRequest(key="unread:alice:room1", delta=1)).value == 1
        assert kv.increment(IncrementRequest(key="unread:alice:room1", delta=41)).value == 42
        got = kv.get(GetRequest(key="unread:alice:room1"))
        assert got.value == b"42"
        kv.set(SetRequest(key="name", value=b"alice"))
        before = revision(server)
        with pytest.raises(ConnectError) as info:
            kv.increment(IncrementRequest(key="name", delta=1))
        assert info.value.code == Code.FAILED_PRECONDITION
        kv.set(SetRequest(key="big", value=str(2**63 - 1).encode()))
        with pytest.raises(ConnectError) as info:
            kv.increment(IncrementRequest(key="big", delta=1))
        assert info.value.code == Code.FAILED_PRECONDITION
        assert "overflow" in info.value.message
        assert kv.get(GetRequest(key="big")).value == str(2**63 - 1).encode()
        assert revision(server) == before + 1  # only the Set of "big"
        reply = ok(server, "Increment", {"key": "unread:alice:room1", "delta": "-2"})
        assert reply["value"] == "40"


# -- Txn and MGet --------------------------------------------------------------------------


def test_txn_json_success_and_failure_branches(server: ServerProcess) -> None:
    ok(server, "Set", {"key": "room:1:owner", "value": "YWxpY2U="})
    body = {
        "conditions": [{"key": "room:1:owner", "present": True}, {"key": "room:1:x",
                                                                   "absent": True}],
        "success": [{"set": {"key": "room:1:member:bob", "value": "MQ=="}},
                    {"increment": {"key": "room:1:members", "delta": "1"}}],
        "failure": [{"delete": {"key": "room:1:owner"}}],
    }  # fmt: skip
    reply = ok(server, "Txn", body)
    assert reply["succeeded"] is True
    rev = reply["revision"]
    assert reply["results"] == [
        {"set": {"revision": rev}},
        {"increment": {"value": "1", "revision": rev}},
    ]
    many = ok(server, "MGet", {"keys": ["room:1:member:bob", "room:1:members", "nope"]})
    assert many["revision"] == rev
    assert [i.get("revision") for i in many["items"]] == [rev, rev, None]
    body["conditions"] = [{"key": "room:1:owner", "revision": "999"}]
    reply = ok(server, "Txn", body)
    assert "succeeded" not in reply  # false: proto3 JSON leaves defaults out
    assert not ok(server, "Get", {"key": "room:1:owner"}).get("found")
    server.stop()
    batches = [e for e in wal_entries(server.data_dir) if e.operation == LogEntry.OPERATION_BATCH]
    assert [[n.key for n in b.entries] for b in batches] == [
        ["room:1:member:bob", "room:1:members"], ["room:1:owner"],
    ]  # fmt: skip


def _batch(i: int, width: int) -> TxnRequest:
    return TxnRequest(success=[
        Op(set=SetRequest(key=f"k{j}", value=str(i).encode())) for j in range(width)
    ])  # fmt: skip


def test_readers_never_see_half_a_txn(server: ServerProcess) -> None:
    """Concurrent MGet readers during a stream of 10-key batches always see one batch whole."""
    width, stop, seen = 10, threading.Event(), []
    keys = [f"k{j}" for j in range(width)]

    def reader() -> None:
        with server.client(proto_json=False) as kv:
            while not stop.is_set():
                items = kv.m_get(MGetRequest(keys=keys)).items
                seen.append({item.value for item in items})

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        with server.client(proto_json=False) as kv:
            for i in range(300):
                assert kv.txn(_batch(i, width)).succeeded
    finally:
        stop.set()
        for thread in readers:
            thread.join(10)
    assert len(seen) > 50
    torn = [values for values in seen if len(values) != 1]
    assert not torn, f"{len(torn)} reads saw parts of different batches: {torn[:3]}"


def test_a_txn_is_whole_or_absent_after_sigkill(make_server) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL while 20-key batches are being written: after restart every key holds the
    same batch number (the last one that reached the disk whole)."""
    server = make_server("--fsync", "no").start()
    stop = threading.Event()
    done: list[int] = []

    def writer() -> None:
        with server.client(proto_json=False) as kv:
            for i in range(100_000):
                if stop.is_set():
                    return
                try:
                    kv.txn(_batch(i, 20))
                except (ConnectError, OSError, httpx.HTTPError):
                    return
                done.append(i)

    thread = threading.Thread(target=writer)
    thread.start()
    wait_for("some batches written", lambda: len(done) > 100)
    server.kill()
    stop.set()
    thread.join(10)
    server.start()
    with server.client(proto_json=False) as kv:
        items = kv.m_get(MGetRequest(keys=[f"k{j}" for j in range(20)])).items
    values = {item.value for item in items}
    assert len(values) == 1, values
    assert int(values.pop()) >= done[-1] - 1  # fsync=no keeps what reached the OS


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("Set", {"key": "k", "value": "dg==", "ttlMs": -1}),
        ("Set", {"key": "k", "value": "dg==", "ttlMs": "soon"}),
        ("Set", {"key": "k", "value": "dg==", "ifRevision": -3}),
        ("Touch", {"key": "k", "ttlMs": -5}),
        ("Touch", {"key": "", "ttlMs": 5}),
        ("Increment", {"key": "k", "delta": 1.5}),
        ("Increment", {"key": "k", "delta": "9223372036854775808"}),
        ("MGet", {"keys": ["k"] * 1001}),
        ("MGet", {"keys": "k"}),
        ("Txn", {"success": [{"set": {"key": "k", "value": "dg=="}}] * 2}),
        ("Txn", {"success": [{"set": {"key": f"k{i}"}} for i in range(1001)]}),
        ("Txn", {"success": [{}]}),
        ("Txn", {"conditions": [{"key": "k"}]}),
        ("Txn", {"success": [{"set": {"key": "k", "ifRevision": 1}}]}),
        ("Txn", {"success": [{"set": {"key": "k", "waitReplicas": 1}}]}),
        ("Txn", {"success": [{"touch": {"key": "k", "ttlMs": -1}}]}),
    ],
)
def test_bad_input_is_invalid_argument_and_changes_nothing(
    server: ServerProcess, method: str, body: dict[str, Any]
) -> None:
    ok(server, "Set", {"key": "k", "value": "MQ=="})
    before = revision(server)
    refused(server, method, body, "invalid_argument")
    assert revision(server) == before
    assert ok(server, "Get", {"key": "k"})["value"] == "MQ=="


def test_touch_of_a_missing_key_is_not_found(server: ServerProcess) -> None:
    refused(server, "Touch", {"key": "ghost", "ttlMs": 1000}, "not_found")
    ok(server, "Set", {"key": "k", "value": "MQ=="})
    before = revision(server)
    body = {"success": [{"set": {"key": "a", "value": "MQ=="}},
                        {"touch": {"key": "ghost", "ttlMs": 5}}]}  # fmt: skip
    refused(server, "Txn", body, "not_found")
    assert revision(server) == before
    assert not ok(server, "Get", {"key": "a"}).get("found")


@pytest.fixture
def writes_on_a_replica(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    cluster = Cluster(tmp_path)
    try:
        yield cluster.primary_with_replicas(1)
    finally:
        cluster.close()


def test_new_writes_on_a_replica_name_the_primary(writes_on_a_replica: Any) -> None:
    primary, (replica,) = writes_on_a_replica
    with replica.client() as kv:
        for request in (
            lambda: kv.touch(TouchRequest(key="k", ttl_ms=1)),
            lambda: kv.increment(IncrementRequest(key="k", delta=1)),
            lambda: kv.txn(TxnRequest(success=[Op(delete=DeleteRequest(key="k"))])),
        ):
            with pytest.raises(ConnectError) as info:
                request()
            assert info.value.code == Code.FAILED_PRECONDITION
            assert primary.url in info.value.message or "primary" in info.value.message
    with primary.client() as kv:
        kv.txn(TxnRequest(
            conditions=[Condition(key="c", absent=True)],
            success=[Op(increment=IncrementRequest(key="c", delta=5, ttl_ms=60_000))],
        ))  # fmt: skip
    wait_caught_up(primary, [replica])
    with replica.client() as kv:
        got = kv.get(GetRequest(key="c"))
        assert got.value == b"5"
        assert got.expires_at_ms > 0
    assert primary.status().revision == replica.status().revision


# -- compression ----------------------------------------------------------------------------


def _chat_json(i: int) -> bytes:
    text = f"message {i} in room general: see you at the standup, bring the notes " * 8
    return json.dumps({
        "id": f"m{i:06d}", "room": "general", "sender": f"user{i % 7}",
        "ts": 1795000000000 + i, "text": text, "reactions": {"+1": 3, "heart": 1},
        "attachments": [],
    }).encode()  # fmt: skip


def test_compressed_values_round_trip_through_wal_snapshot_and_replica(tmp_path: Path) -> None:
    """compression=zstd: large values are zstd frames in the WAL and on the replication
    stream, clients always get their own bytes back (from the primary after a restart
    through a snapshot, and from a replica that has compression off), small ones stay raw."""
    cluster = Cluster(tmp_path)
    try:
        primary, (replica,) = cluster.primary_with_replicas(
            1, primary_extra=("--compression", "zstd", "--compression-min-bytes", "256")
        )
        with primary.client() as kv:
            for i in range(20):
                kv.set(SetRequest(key=f"msg:{i}", value=_chat_json(i)))
            kv.set(SetRequest(key="small", value=b"tiny"))
            kv.txn(TxnRequest(success=[Op(set=SetRequest(key="msg:txn", value=_chat_json(99)))]))
        wait_caught_up(primary, [replica])
        for node in (primary, replica):
            with node.client() as kv:
                assert kv.get(GetRequest(key="msg:7")).value == _chat_json(7)
                assert kv.get(GetRequest(key="msg:txn")).value == _chat_json(99)
                assert kv.get(GetRequest(key="small")).value == b"tiny"
        entries = wal_entries(primary.data_dir)
        by_key = {e.key: e for e in entries if e.operation == LogEntry.OPERATION_SET}
        assert by_key["msg:7"].value_encoding == LogEntry.VALUE_ENCODING_ZSTD
        assert len(by_key["msg:7"].value) < len(_chat_json(7)) // 3
        assert by_key["small"].value_encoding == LogEntry.VALUE_ENCODING_UNSPECIFIED
        replica_sets = {e.key: e for e in wal_entries(replica.data_dir) if e.key == "msg:7"}
        assert replica_sets["msg:7"].value_encoding == LogEntry.VALUE_ENCODING_ZSTD
        assert primary.status().revision == replica.status().revision
        httpx.post(f"{primary.url}/kvservice.v1.Admin/Snapshot", json={}, timeout=30)
        primary.restart()
        with primary.client() as kv:
            assert kv.get(GetRequest(key="msg:19")).value == _chat_json(19)
    finally:
        cluster.close()
