"""JWT verification: algorithms bound to key types, claims to roles and prefixes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kvservice.auth import Grant
from kvservice.config import ConfigError, load
from kvservice.errors import Unauthenticated
from kvservice.jwt_auth import JwtVerifier
from tests.securitykit import AUDIENCE, ISSUER, JwtKeys, tampered


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> JwtKeys:
    return JwtKeys.make(tmp_path_factory.mktemp("jwt"))


def verifier(keys: JwtKeys, **settings: object) -> JwtVerifier:
    base: dict[str, object] = {
        "jwt_hs256_secret_file": str(keys.secret_file), "jwt_jwks_file": str(keys.jwks_file),
        "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE, "jwt_shared_prefixes": "room:=read",
    }  # fmt: skip
    base.update(settings)
    return JwtVerifier(load({k: v for k, v in base.items() if v is not None}))


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
def test_valid_tokens_map_to_a_confined_principal(keys: JwtKeys, alg: str) -> None:
    principal = verifier(keys).verify(keys.token("alice", alg=alg).encode())
    assert (principal.name, principal.kind) == ("alice", "jwt")
    assert principal.roles == frozenset({"read", "write"})  # jwt_default_roles
    assert principal.grants == (
        Grant("user:alice:", frozenset({"read", "write"})),
        Grant("room:", frozenset({"read"})),
    )


def test_roles_claim_limits_roles_and_shared_prefixes(keys: JwtKeys) -> None:
    principal = verifier(keys).verify(keys.token("carol", roles=["read", "unknown"]).encode())
    assert principal.roles == frozenset({"read"})
    assert principal.grants == (
        Grant("user:carol:", frozenset({"read"})),
        Grant("room:", frozenset({"read"})),
    )


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (lambda k: k.token(exp=1000, iat=900), "expired"),
        (lambda k: k.token(nbf=4_000_000_000), "not valid yet"),
        (lambda k: k.token(aud="other"), "audience"),
        (lambda k: k.token(iss="https://evil"), "issuer"),
        (lambda k: k.token(exp=None), "exp"),
        (lambda k: tampered(k.token()), "signature"),
        (lambda k: tampered(k.token(alg="RS256")), "signature"),
        (lambda k: k.alg_none_token(), "'none' is not accepted"),
        (lambda k: k.token(sub="bob:x"), "must not contain ':'"),
        (lambda k: "eyJhbGciOi.garbage.x", "not a valid JWT"),
    ],
)
def test_bad_tokens_are_unauthenticated(keys: JwtKeys, make: object, complaint: str) -> None:
    token = make(keys)  # type: ignore[operator]
    with pytest.raises(Unauthenticated, match=complaint):
        verifier(keys).verify(token.encode())


def test_algorithm_confusion_is_refused_without_a_secret(keys: JwtKeys) -> None:
    """An HS256 token keyed with the RSA public key fails on a JWKS-only node."""
    only_jwks = verifier(keys, jwt_hs256_secret_file=None)
    with pytest.raises(Unauthenticated, match="'HS256' is not accepted"):
        only_jwks.verify(keys.confused_token().encode())
    with pytest.raises(Unauthenticated, match="signature"):
        verifier(keys).verify(keys.confused_token().encode())


def test_leeway_applies_to_expiry(keys: JwtKeys) -> None:
    token = keys.token(exp=int(time.time()) - 10).encode()
    assert verifier(keys).verify(token).name == "alice"  # 10 s late, leeway 30 s
    with pytest.raises(Unauthenticated, match="expired"):
        verifier(keys, jwt_leeway_seconds=1).verify(token)


def test_cached_tokens_still_expire(keys: JwtKeys) -> None:
    v = verifier(keys, jwt_leeway_seconds=0)
    token = keys.token(exp=int(time.time()) + 60).encode()
    v.verify(token)
    with pytest.raises(Unauthenticated, match="expired"):
        v.verify(token, now=time.time() + 120)


def test_jwks_with_symmetric_or_private_keys_is_refused(tmp_path: Path, keys: JwtKeys) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ConfigError, match="only RSA"):
        verifier(keys, jwt_jwks_file=str(path))
    doc = json.loads(keys.jwks_file.read_text())
    doc["keys"][0]["d"] = "AAAA"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="private key"):
        verifier(keys, jwt_jwks_file=str(path))


def test_reload_picks_up_a_rotated_jwks(tmp_path: Path) -> None:
    keys = JwtKeys.make(tmp_path)
    v = verifier(keys, jwt_hs256_secret_file=None)
    old = keys.token(alg="ES256")
    assert v.verify(old.encode()).name == "alice"
    rotated = JwtKeys.make(tmp_path)  # new keys written over the same files
    with pytest.raises(Unauthenticated):
        v.verify(rotated.token(alg="ES256").encode())
    v.reload()
    assert v.verify(rotated.token(alg="ES256").encode()).name == "alice"
    with pytest.raises(Unauthenticated):
        v.verify(old.encode())  # the cache was cleared with the old key
