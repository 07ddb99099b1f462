"""Tokens file, principals, prefix rules and the key-bearing fields of requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from kvservice.access import key_plan, keys_of, rule_for
from kvservice.auth import Grant, Principal, TokenTable, bearer_token, parse_shared_prefixes
from kvservice.config import ConfigError, load
from kvservice.errors import PermissionDenied, Unauthenticated
from kvservice.security import check_settings, protected_mode_refusal
from kvservice.v1 import admin_pb2, kv_pb2
from tests.securitykit import write_tokens


def test_tokens_match_by_hash_and_never_by_prefix(tmp_path: Path) -> None:
    path = write_tokens(
        tmp_path / "t.yaml",
        {"s3cret": {"name": "app", "roles": ["read"], "prefixes": ["room:"]}},
    )
    assert "s3cret" not in path.read_text()
    table = TokenTable.load(path)
    found = table.match(b"s3cret")
    assert found is not None
    assert (found.name, found.roles) == ("app", frozenset({"read"}))
    assert found.grants == (Grant("room:", frozenset({"read"})),)
    assert table.match(b"s3cre") is None
    assert table.match(b"s3cret ") is None


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({"name": "a", "sha256": "zz", "roles": ["read"]}, "64 hex digits"),
        ({"name": "a", "sha256": "0" * 64, "roles": ["root"]}, "unknown role"),
        ({"name": "a", "sha256": "0" * 64, "roles": []}, "non-empty list"),
        ({"name": "a", "sha256": "0" * 64, "roles": ["read"], "token": "x"}, "unknown field"),
        ({"sha256": "0" * 64, "roles": ["read"]}, "`name`"),
    ],
)
def test_bad_tokens_file_entries_are_named(
    tmp_path: Path, entry: dict[str, object], complaint: str
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"tokens": [entry]}))
    with pytest.raises(ConfigError, match=complaint) as refused:
        TokenTable.load(path)
    assert "entry 1" in str(refused.value)


def test_bearer_header_forms() -> None:
    assert bearer_token(b"Bearer abc") == b"abc"
    assert bearer_token(b"bearer  abc ") == b"abc"
    for bad in (None, b"", b"Basic abc", b"Bearer", b"Bearer  "):
        with pytest.raises(Unauthenticated):
            bearer_token(bad)


def test_prefix_rules_name_what_is_missing() -> None:
    alice = Principal(
        "alice", "jwt", frozenset({"read", "write"}),
        (Grant("user:alice:", frozenset({"read", "write"})), *parse_shared_prefixes("room:=read")),
    )  # fmt: skip
    alice.require_key("user:alice:x", "write")
    alice.require_key("room:1", "read")
    with pytest.raises(PermissionDenied, match="'room:' \\(read\\)"):
        alice.require_key("room:1", "write")
    with pytest.raises(PermissionDenied, match="outside"):
        alice.require_key("user:bob:x", "read")
    with pytest.raises(PermissionDenied, match="prefix ''"):
        alice.require_key("", "read", is_prefix=True)  # a scan of everything
    with pytest.raises(PermissionDenied, match="lacks the 'admin' role"):
        alice.require_role("admin", "kvservice.v1.Admin/Snapshot")


def test_every_rpc_has_an_access_rule() -> None:
    """A new RPC without a declared role is refused, never open by accident."""
    for file in (kv_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                rule = rule_for(f"/{service.full_name}/{method.name}")
                assert rule in {"read", "write", "admin", "replication"}, method.full_name
    assert rule_for("/kvservice.v1.KVStore/Invented") == "undeclared"
    assert rule_for("/grpc.health.v1.Health/Check") == "open"
    assert rule_for("/metrics") is None


def _txn_like_messages() -> tuple[type, type]:
    """A Txn-shaped request (nested ops with keys, a oneof target) built at run time."""
    file = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    op = file.message_type.add(name="Op")
    op.field.add(name="key", number=1, type=9, label=1)
    txn = file.message_type.add(name="Txn")
    txn.field.add(name="keys", number=1, type=9, label=3)
    txn.field.add(name="ops", number=2, type=11, label=3, type_name=".t.Op")
    txn.oneof_decl.add(name="target")
    txn.field.add(name="key", number=3, type=9, label=1, oneof_index=0)
    txn.field.add(name="prefix", number=4, type=9, label=1, oneof_index=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Txn")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Op")),
    )


def test_keys_are_found_in_batches_nested_ops_and_oneofs() -> None:
    txn_cls, _ = _txn_like_messages()
    msg = txn_cls(keys=["a", "b"], ops=[{"key": "c"}, {"key": "d"}], prefix="p:")
    found = list(keys_of(msg, key_plan(msg.DESCRIPTOR)))
    assert found == [("a", False), ("b", False), ("c", False), ("d", False), ("p:", True)]
    msg = txn_cls(key="only")
    assert list(keys_of(msg, key_plan(msg.DESCRIPTOR))) == [("only", False)]
    get = kv_pb2.GetRequest(key="k")
    assert list(keys_of(get, key_plan(get.DESCRIPTOR))) == [("k", False)]


def test_protected_mode() -> None:
    assert protected_mode_refusal(load({"host": "127.0.0.1"})) is None
    assert protected_mode_refusal(load({"host": "::1"})) is None
    refusal = protected_mode_refusal(load({"host": "0.0.0.0"}))
    assert refusal is not None
    assert "--insecure" in refusal
    assert "auth: token" in refusal
    assert protected_mode_refusal(load({"host": "0.0.0.0", "insecure": True})) is None
    assert protected_mode_refusal(load({"host": "db.internal"})) is not None
    tokens = {"host": "0.0.0.0", "auth": "token", "tokens_file": "/x"}
    assert protected_mode_refusal(load(tokens)) is None


def test_inconsistent_security_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth: token needs"):
        check_settings(load({"auth": "token"}))
    with pytest.raises(ConfigError, match="only take effect with auth: token"):
        check_settings(load({"tokens_file": str(tmp_path / "t.yaml")}))
    with pytest.raises(ConfigError, match="go together"):
        check_settings(load({"tls_cert_file": str(tmp_path / "c.pem")}))
    with pytest.raises(ConfigError, match="cannot read tokens_file"):
        check_settings(load({"auth": "token", "tokens_file": str(tmp_path / "missing.yaml")}))
