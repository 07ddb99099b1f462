"""Verified credentials remembered per Authorization header: bounded, expiring, reloadable."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvservice.audit import SecurityStats
from kvservice.auth import Grant, Principal, TokenTable
from kvservice.config import load
from kvservice.credentials import Credential, CredentialCache
from kvservice.security import Security
from tests.securitykit import AUDIENCE, JwtKeys, write_tokens

ALICE = Principal(
    "alice", "token", frozenset({"read"}), (Grant("user:alice:", frozenset({"read"})),)
)


def test_the_cache_keeps_the_most_recently_used() -> None:
    cache = CredentialCache(entries=2)
    a, b, c = (Credential(ALICE, f"token:{n}", None) for n in "abc")
    cache.put(b"a", a)
    cache.put(b"b", b)
    assert cache.get(b"a", 0.0) is a  # a is now the most recently used
    cache.put(b"c", c)
    assert (cache.get(b"a", 0.0), cache.get(b"b", 0.0), cache.get(b"c", 0.0)) == (a, None, c)
    assert len(cache) == 2
    cache.clear()
    assert cache.get(b"a", 0.0) is None


def test_a_cached_credential_is_only_used_inside_its_validity_window() -> None:
    cache = CredentialCache()
    jwt = Credential(ALICE, "jwt:alice", None, not_before=100.0, not_after=200.0)
    cache.put(b"Bearer x", jwt)
    assert cache.get(b"Bearer x", 150.0) is jwt
    assert cache.get(b"Bearer x", 99.0) is None
    assert cache.get(b"Bearer x", 200.5) is None
    assert len(cache) == 0  # one used outside its window is dropped
    assert cache.get(b"Bearer y", 150.0) is None  # only the exact header value


def test_the_caller_of_a_role_carries_the_prefixes_of_that_role() -> None:
    both = Principal(
        "bob", "jwt", frozenset({"read", "write"}),
        (Grant("user:bob:", frozenset({"read", "write"})), Grant("room:", frozenset({"read"}))),
    )  # fmt: skip
    credential = Credential(both, "jwt:bob", None)
    assert credential.caller("read").prefixes == ("user:bob:", "room:")
    assert credential.caller("write").prefixes == ("user:bob:",)
    assert credential.caller("admin").prefixes == ()
    assert credential.caller("read") is credential.caller("read")  # made once
    everything = Credential(Principal("ops", "token", frozenset({"read"})), "token:ops", None)
    assert everything.caller("read").prefixes is None


def _security(tmp_path: Path, **settings: object) -> Security:
    tokens = write_tokens(tmp_path / "t.yaml", {"s3cret": {"name": "app", "roles": ["read"]}})
    base = {"auth": "token", "tokens_file": str(tokens), **settings}
    return Security(load({k: v for k, v in base.items() if v is not None}), SecurityStats())


def test_a_token_is_verified_once_then_found_by_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    security = _security(tmp_path, rate_limit_rps=5)
    first = security.authenticate(b"Bearer s3cret")
    assert isinstance(first, Credential)
    assert (first.identity, first.limit) == ("token:app", security.limiter.default)  # type: ignore[union-attr]

    def no_second_lookup(self: TokenTable, token: bytes) -> None:
        raise AssertionError("verified again")

    monkeypatch.setattr(TokenTable, "match", no_second_lookup)
    assert security.authenticate(b"Bearer s3cret") is first


def test_failures_are_not_remembered_and_a_reload_forgets_everything(tmp_path: Path) -> None:
    security = _security(tmp_path)
    assert security.authenticate(b"Bearer nope")[0] == "unknown_token"  # type: ignore[index]
    assert security.authenticate(None)[0] == "missing_credential"  # type: ignore[index]
    assert len(security.verified) == 0
    assert isinstance(security.authenticate(b"Bearer s3cret"), Credential)
    write_tokens(tmp_path / "t.yaml", {"other": {"name": "app", "roles": ["read"]}})
    security.reload()
    assert security.authenticate(b"Bearer s3cret")[0] == "unknown_token"  # type: ignore[index]


def test_a_remembered_jwt_still_expires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = JwtKeys.make(tmp_path)
    security = _security(
        tmp_path, jwt_hs256_secret_file=str(keys.secret_file), jwt_audience=AUDIENCE,
        jwt_leeway_seconds=0,
    )  # fmt: skip
    header = f"Bearer {keys.token('alice', exp=int(time.time()) + 60)}".encode()
    found = security.authenticate(header)
    assert isinstance(found, Credential)
    assert found.not_after == pytest.approx(time.time() + 60, abs=2)
    later = time.time() + 120
    monkeypatch.setattr(time, "time", lambda: later)
    assert security.authenticate(header) == ("expired_jwt", "the JWT has expired")
