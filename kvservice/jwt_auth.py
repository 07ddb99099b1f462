"""JWTs for browser and mobile clients: verify, then map claims to a confined Principal.

Only three algorithms are accepted, each bound to one kind of key, so a token
cannot choose how it is checked: HS256 with the secret of
`jwt_hs256_secret_file`, RS256 with an RSA key and ES256 with a P-256 key of
`jwt_jwks_file`. `alg: none`, any other algorithm, an HS256 token when no
secret is configured (the classic RSA-public-key-as-HMAC-secret confusion) and
oct keys in the JWKS are refused.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jwt
from jwt import PyJWK

from kvservice.auth import ROLES, Grant, Principal, parse_roles, parse_shared_prefixes
from kvservice.config import ConfigError, Settings
from kvservice.errors import Unauthenticated

log = logging.getLogger("kvservice.auth")

_JWKS_ALGORITHMS = {"RSA": "RS256", "EC": "ES256"}


def looks_like_jwt(token: bytes) -> bool:
    return token.count(b".") == 2 and token.startswith(b"eyJ")


class JwtVerifier:
    """Verifies bearer JWTs per the `jwt_*` settings; `reload()` re-reads key files."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway_seconds
        self.roles_claim = settings.jwt_roles_claim
        self.default_roles = parse_roles(settings.jwt_default_roles, "jwt_default_roles")
        self.shared = parse_shared_prefixes(settings.jwt_shared_prefixes or "")
        self.template = settings.jwt_prefix_template
        if self.template and self.template.count("{sub}") != 1:
            raise ConfigError("jwt_prefix_template must contain {sub} once, e.g. user:{sub}:")
        # A subject holding the character after {sub} could reach into another
        # user's keys (sub "bob:x" → "user:bob:x:" lies inside "user:bob:").
        after = self.template.partition("{sub}")[2]
        self.sub_forbidden = after[:1]
        self.required = ["exp", "sub"]
        if self.issuer:
            self.required.append("iss")
        if self.audience:
            self.required.append("aud")
        self.secret: bytes | None = None
        self.keys: list[PyJWK] = []
        self.reload()

    @property
    def configured(self) -> bool:
        return bool(self.settings.jwt_hs256_secret_file or self.settings.jwt_jwks_file)

    def reload(self) -> None:
        """Read the secret and JWKS files; a ConfigError leaves the old keys in place."""
        secret, keys = self.secret, self.keys
        path = self.settings.jwt_hs256_secret_file
        if path is not None:
            try:
                secret = path.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read jwt_hs256_secret_file {path}: {exc}") from exc
            if len(secret) < 32:
                raise ConfigError(f"jwt_hs256_secret_file {path}: use at least 32 bytes")
        path = self.settings.jwt_jwks_file
        if path is not None:
            keys = _load_jwks(path)
        self.secret, self.keys = secret, keys

    def verify(self, token: bytes, now: float | None = None) -> Principal:
        """The principal of a valid token, with its validity window (exp and nbf with the
        leeway) for whoever remembers it (`credentials.py`); Unauthenticated saying what is
        wrong otherwise. `now` (default: the clock) must lie in that window too."""
        now = time.time() if now is None else now
        claims = self._decode(token)
        not_after = float(claims["exp"]) + self.leeway
        not_before = float(claims.get("nbf", 0)) - self.leeway
        if now > not_after:
            raise Unauthenticated("the JWT has expired")
        if now < not_before:
            raise Unauthenticated("the JWT is not valid yet (nbf)")
        return self._principal(claims, not_before, not_after)

    def _decode(self, token: bytes) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the bearer token is not a valid JWT: {exc}") from None
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and self.secret is not None:
            key = self.secret
        elif alg in ("RS256", "ES256") and self.keys:
            key = self._jwks_key(str(alg), header.get("kid"))
        else:
            raise Unauthenticated(f"JWT algorithm {alg!r} is not accepted by this node")
        try:
            return jwt.decode(
                token, key, algorithms=[str(alg)], audience=self.audience, issuer=self.issuer,
                leeway=self.leeway, options={"require": self.required},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the JWT is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"the JWT audience is not {self.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"the JWT issuer is not {self.issuer!r}") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the JWT signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the JWT is invalid: {exc}") from None

    def _jwks_key(self, alg: str, kid: object) -> PyJWK:
        candidates = [k for k in self.keys if k.algorithm_name == alg]
        if kid is not None:
            candidates = [k for k in candidates if k.key_id == kid]
        if len(candidates) != 1:
            raise Unauthenticated(f"no single {alg} key in the JWKS matches kid {kid!r}")
        return candidates[0]

    def _principal(self, claims: dict[str, Any], not_before: float, not_after: float) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("the JWT has no subject (sub)")
        if self.sub_forbidden and self.sub_forbidden in sub:
            raise Unauthenticated(f"the JWT subject must not contain {self.sub_forbidden!r}")
        raw = claims.get(self.roles_claim)
        if raw is None:
            roles = self.default_roles
        else:
            if isinstance(raw, str):
                raw = raw.replace(",", " ").split()
            if not isinstance(raw, list):
                raise Unauthenticated(f"the JWT claim {self.roles_claim!r} is not a list")
            # Roles this node does not know are ignored: an issuer may serve other services.
            roles = frozenset(r for r in raw if isinstance(r, str)) & ROLES
        grants: tuple[Grant, ...] | None = None
        if self.template:
            own = Grant(self.template.replace("{sub}", sub), roles)
            shared = tuple(Grant(g.prefix, g.roles & roles) for g in self.shared)
            grants = (own, *(g for g in shared if g.roles))
        return Principal(
            name=sub, kind="jwt", roles=roles, grants=grants, not_before=not_before,
            not_after=not_after,
        )  # fmt: skip


def _load_jwks(path: Any) -> list[PyJWK]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read jwt_jwks_file {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"jwt_jwks_file {path} is not JSON: {exc}") from exc
    raw_keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(raw_keys, list):
        raise ConfigError(f"jwt_jwks_file {path} must be a JWK set: {{'keys': [...]}}")
    keys = []
    for i, raw in enumerate(raw_keys):
        kty = raw.get("kty") if isinstance(raw, dict) else None
        alg = _JWKS_ALGORITHMS.get(str(kty))
        if alg is None or (kty == "EC" and raw.get("crv") != "P-256"):
            raise ConfigError(
                f"jwt_jwks_file {path}, key {i + 1}: only RSA (RS256) and EC P-256 (ES256)"
                " public keys are accepted"
            )
        if raw.get("alg") not in (None, alg):
            raise ConfigError(f"jwt_jwks_file {path}, key {i + 1}: alg must be {alg}")
        if "d" in raw:
            raise ConfigError(f"jwt_jwks_file {path}, key {i + 1}: holds a private key")
        try:
            keys.append(PyJWK(raw, alg))
        except jwt.PyJWTError as exc:
            raise ConfigError(f"jwt_jwks_file {path}, key {i + 1}: {exc}") from exc
    if not keys:
        raise ConfigError(f"jwt_jwks_file {path} holds no keys")
    return keys
