"""Every RPC x every kind of credential: the expected code, and no side effect on refusal."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.health.v1.health_connect import HealthClientSync
from kvservice.health.v1.health_pb2 import HealthCheckRequest
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import SnapshotRequest
from kvservice.v1.kv_pb2 import (
    Condition,
    DeleteRequest,
    GetRequest,
    IncrementRequest,
    MGetRequest,
    Op,
    ScanRequest,
    SetRequest,
    TouchRequest,
    TxnRequest,
    WatchRequest,
)
from tests.integration.conftest import ServerProcess, free_port
from tests.securitykit import AUDIENCE, ISSUER, JwtKeys, tampered, write_tokens

OK = None
UNAUTH = Code.UNAUTHENTICATED
DENIED = Code.PERMISSION_DENIED
KEY_ALICE = "user:alice:profile"
KEY_BOB = "user:bob:profile"
ROOT = "root-token"


@dataclass
class Node:
    server: ServerProcess
    keys: JwtKeys


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("matrix")
    keys = JwtKeys.make(tmp)
    tokens = write_tokens(
        tmp / "tokens.yaml",
        {
            "read-token": {"name": "reader", "roles": ["read"]},
            "write-token": {"name": "writer", "roles": ["write"]},
            "admin-token": {"name": "operator", "roles": ["admin"]},
            "replication-token": {"name": "replica-1", "roles": ["replication"]},
            ROOT: {"name": "root", "roles": ["read", "write", "admin"]},
        },
    )
    server = ServerProcess(
        data_dir=tmp / "data", port=free_port(),
        args=[
            "--auth", "token", "--tokens-file", str(tokens),
            "--jwt-hs256-secret-file", str(keys.secret_file),
            "--jwt-jwks-file", str(keys.jwks_file),
            "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE,
            "--jwt-shared-prefixes", "room:=read",
        ],
    )  # fmt: skip
    server.start()
    yield Node(server, keys)
    server.kill()


def credential(node: Node, kind: str) -> str | None:
    keys = node.keys
    return {
        "none": None,
        "read": "read-token",
        "write": "write-token",
        "admin": "admin-token",
        "replication": "replication-token",
        "jwt_in_scope": keys.token("alice"),
        "jwt_out_of_scope": keys.token("bob"),
        "jwt_rs256_in_scope": keys.token("alice", alg="RS256"),
        "jwt_es256_in_scope": keys.token("alice", alg="ES256"),
        "jwt_expired": keys.token("alice", exp=1_000_000, iat=999_000),
        "jwt_not_yet_valid": keys.token("alice", nbf=4_000_000_000),
        "jwt_wrong_audience": keys.token("alice", aud="another-service"),
        "jwt_wrong_issuer": keys.token("alice", iss="https://evil.test"),
        "jwt_tampered": tampered(keys.token("bob")),
        "jwt_alg_none": keys.alg_none_token("alice"),
        "jwt_alg_confusion": keys.confused_token("alice"),
        "unknown_token": "not-a-token-anyone-issued",
    }[kind]


# Expected code per credential for Get, Set, Delete, Admin/Snapshot, Health/Check.
# "jwt_out_of_scope" is Bob's token used on Alice's key.
MATRIX: dict[str, tuple[Code | None, ...]] = {
    "none":               (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
    "unknown_token":      (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
    "read":               (OK, DENIED, DENIED, DENIED, OK),
    "write":              (DENIED, OK, OK, DENIED, OK),
    "admin":              (DENIED, DENIED, DENIED, OK, OK),
    "replication":        (DENIED, DENIED, DENIED, DENIED, OK),
    "jwt_in_scope":       (OK, OK, OK, DENIED, OK),
    "jwt_rs256_in_scope": (OK, OK, OK, DENIED, OK),
    "jwt_es256_in_scope": (OK, OK, OK, DENIED, OK),
    "jwt_out_of_scope":   (DENIED, DENIED, DENIED, DENIED, OK),
    "jwt_expired":        (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
    "jwt_not_yet_valid":  (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
    "jwt_wrong_audience": (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
    "jwt_wrong_issuer":   (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
    "jwt_tampered":       (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
    "jwt_alg_none":       (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
    "jwt_alg_confusion":  (UNAUTH, UNAUTH, UNAUTH, UNAUTH, OK),
}  # fmt: skip
RPCS = ("Get", "Set", "Delete", "Snapshot", "Health")
# The data-model RPCs need the role of the column named: reads as Get, writes as Set.
LIKE = {"MGet": "Get", "Scan": "Get", "Watch": "Get", "Touch": "Set", "Increment": "Set",
        "Txn": "Set"}  # fmt: skip
CELLS = [(cred, rpc, codes[i]) for cred, codes in MATRIX.items() for i, rpc in enumerate(RPCS)]
CELLS += [
    (cred, rpc, codes[RPCS.index(like)])
    for cred, codes in MATRIX.items()
    for rpc, like in LIKE.items()
]
COUNTER_ALICE = "user:alice:unread"


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def _root_get(server: ServerProcess, key: str) -> bytes | None:
    with server.client() as kv:
        reply = kv.get(GetRequest(key=key), headers=_headers(ROOT))
    return reply.value if reply.found else None


def _root_set(server: ServerProcess, key: str, value: bytes) -> None:
    with server.client() as kv:
        kv.set(SetRequest(key=key, value=value), headers=_headers(ROOT))


def _state(server: ServerProcess) -> list[tuple[bool, bytes, int, int]]:
    """What a refused request must leave alone: Alice's keys, expiries included."""
    with server.client() as kv:
        items = kv.m_get(MGetRequest(keys=[KEY_ALICE, COUNTER_ALICE]), headers=_headers(ROOT))
    return [(i.found, i.value, i.revision, i.expires_at_ms) for i in items.items]


def _call_data_model(server: ServerProcess, rpc: str, headers: dict[str, str]) -> None:
    with server.client() as kv:
        if rpc == "MGet":
            kv.m_get(MGetRequest(keys=[KEY_ALICE]), headers=headers)
        elif rpc == "Scan":
            kv.scan(ScanRequest(prefix="user:alice:"), headers=headers)
        elif rpc == "Watch":
            for _ in kv.watch(WatchRequest(key=KEY_ALICE), headers=headers):
                break  # the first (progress) message: the watch is in place
        elif rpc == "Touch":
            kv.touch(TouchRequest(key=KEY_ALICE, ttl_ms=3_600_000), headers=headers)
        elif rpc == "Increment":
            kv.increment(IncrementRequest(key=COUNTER_ALICE, delta=1), headers=headers)
        else:
            txn = TxnRequest(success=[Op(set=SetRequest(key=KEY_ALICE, value=b"txn"))])
            kv.txn(txn, headers=headers)


def _call(server: ServerProcess, rpc: str, token: str | None, key: str, value: bytes) -> None:
    headers = _headers(token)
    if rpc in LIKE:
        _call_data_model(server, rpc, headers)
    elif rpc in ("Get", "Set", "Delete"):
        with server.client() as kv:
            if rpc == "Get":
                kv.get(GetRequest(key=key), headers=headers)
            elif rpc == "Set":
                kv.set(SetRequest(key=key, value=value), headers=headers)
            else:
                kv.delete(DeleteRequest(key=key), headers=headers)
    elif rpc == "Snapshot":
        with AdminClientSync(server.url, proto_json=True, timeout_ms=30_000) as admin:
            admin.snapshot(SnapshotRequest(), headers=headers)
    else:
        with HealthClientSync(server.url, proto_json=True, timeout_ms=10_000) as health:
            health.check(HealthCheckRequest(), headers=headers)


def _snapshots(data_dir: Path) -> int:
    return len(list((data_dir / "snap").glob("*.snap")))


@pytest.mark.parametrize(("cred", "rpc", "expected"), CELLS, ids=[f"{c}-{r}" for c, r, _ in CELLS])
def test_matrix_cell(node: Node, cred: str, rpc: str, expected: Code | None) -> None:
    """The RPC answers the expected code; a refused one changes nothing."""
    server = node.server
    key = KEY_ALICE
    before = f"before-{cred}-{rpc}".encode()
    _root_set(server, key, before)
    state = _state(server)
    snapshots = _snapshots(server.data_dir)
    code, message = None, ""
    try:
        _call(server, rpc, credential(node, cred), key, f"after-{cred}".encode())
    except ConnectError as exc:
        code, message = exc.code, exc.message
    assert code == expected, f"{cred} x {rpc}: {code} (expected {expected})"
    if code is not None:
        assert message, "a refusal says why"
    if code == DENIED:
        assert "lacks" in message or "outside" in message, message
    if expected is not None:
        assert _root_get(server, key) == before, "a refused request changed the key"
        assert _state(server) == state, "a refused request changed a key or an expiry"
        assert _snapshots(server.data_dir) == snapshots, "a refused snapshot ran"


def test_jwt_user_reads_a_shared_prefix_but_cannot_write_it(node: Node) -> None:
    """jwt_shared_prefixes room:=read: read allowed, write refused naming the prefix rule."""
    token = node.keys.token("alice")
    _root_set(node.server, "room:lobby:topic", b"hello")
    with node.server.client() as kv:
        assert kv.get(GetRequest(key="room:lobby:topic"), headers=_headers(token)).value == b"hello"
        with pytest.raises(ConnectError) as refused:
            kv.set(SetRequest(key="room:lobby:topic", value=b"x"), headers=_headers(token))
    assert refused.value.code == DENIED
    assert "'room:' (read)" in refused.value.message
    assert _root_get(node.server, "room:lobby:topic") == b"hello"


def test_refusals_are_counted_and_logged_without_the_token(node: Node) -> None:
    """Denials appear in kvservice_auth_failures_total and in the log, never with the token."""
    time.sleep(1.1)  # the audit log is capped per second: start a fresh second
    with pytest.raises(ConnectError):
        _call(node.server, "Get", "leaky-secret-value", KEY_ALICE, b"")
    with pytest.raises(ConnectError):
        _call(node.server, "Set", node.keys.token("bob"), KEY_ALICE, b"x")
    with AdminClientSync(node.server.url, proto_json=True) as admin:
        admin.snapshot(SnapshotRequest(), headers=_headers("admin-token"))
    metrics = httpx.get(f"{node.server.url}/metrics", timeout=5).text
    assert 'kvservice_auth_failures_total{reason="unknown_token"}' in metrics
    assert 'kvservice_auth_failures_total{reason="outside_prefix"}' in metrics
    log = node.server.log()
    assert "leaky-secret-value" not in log
    assert '"reason": "outside_prefix", "identity": "bob"' in log
    assert '"client": "127.0.0.1", "key_prefix": "user:alice:"' in log  # (address, no port)


def test_jwt_scope_covers_every_key_of_a_batch(node: Node) -> None:
    """A browser user confined to user:alice: cannot reach another key by hiding it inside
    a Txn (a condition or an operation) or an MGet; within scope all of them work."""
    alice = node.keys.token("alice")
    bob_key = "user:bob:inbox"
    _root_set(node.server, bob_key, b"private")
    outside = [
        ("MGet", MGetRequest(keys=[KEY_ALICE, bob_key])),
        ("Txn", TxnRequest(conditions=[Condition(key=bob_key, present=True)])),
        (
            "Txn",
            TxnRequest(
                success=[
                    Op(set=SetRequest(key=KEY_ALICE, value=b"a")),
                    Op(delete=DeleteRequest(key=bob_key)),
                ]
            ),
        ),
        ("Txn", TxnRequest(failure=[Op(increment=IncrementRequest(key=bob_key, delta=1))])),
        ("Touch", TouchRequest(key=bob_key, ttl_ms=1)),
        ("Increment", IncrementRequest(key=bob_key, delta=1)),
    ]
    with node.server.client() as kv:
        for method, request in outside:
            with pytest.raises(ConnectError) as refused:
                getattr(kv, {"MGet": "m_get"}.get(method, method.lower()))(
                    request, headers=_headers(alice)
                )
            assert refused.value.code == DENIED, method
            assert "user:bob:inbox" in refused.value.message or "outside" in refused.value.message
        assert _root_get(node.server, bob_key) == b"private"
        reply = kv.txn(
            TxnRequest(success=[Op(increment=IncrementRequest(key="user:alice:n", delta=2))]),
            headers=_headers(alice),
        )
        assert reply.results[0].increment.value == 2
        got = kv.m_get(MGetRequest(keys=["user:alice:n"]), headers=_headers(alice))
        assert got.items[0].value == b"2"
