"""Who is calling and what they may touch: roles, principals and the tokens file.

A request is authenticated once (static token or JWT, see `jwt_auth.py`) into a
`Principal`: a name for logs and rate limits, its roles, and optionally the key
prefixes it is confined to (`grants`). Method roles are checked before the body
is read (`middleware.py`); keys are checked against the grants before the
handler runs (`access.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from kvservice.config import ConfigError
from kvservice.errors import PermissionDenied, Unauthenticated

log = logging.getLogger("kvservice.auth")

Role = Literal["read", "write", "admin", "replication"]
ROLES: frozenset[str] = frozenset({"read", "write", "admin", "replication"})


@dataclass(frozen=True, slots=True)
class Grant:
    """Keys starting with `prefix` may be used with these roles."""

    prefix: str
    roles: frozenset[str]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `grants` None means every key (within its roles)."""

    name: str
    kind: Literal["token", "jwt", "anonymous"]
    roles: frozenset[str]
    grants: tuple[Grant, ...] | None = None
    # JWTs only: the Unix times between which the caller is authenticated (nbf and exp,
    # widened by the leeway).
    not_before: float | None = None
    not_after: float | None = None
    # Per role, the prefixes granted with it: one str.startswith(tuple) per key
    # instead of a loop over the grants on every request.
    prefixes: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_role = {
            role: tuple(g.prefix for g in self.grants or () if role in g.roles) for role in ROLES
        }
        object.__setattr__(self, "prefixes", by_role)

    def require_role(self, role: str, method: str) -> None:
        if role not in self.roles:
            have = ", ".join(sorted(self.roles)) or "none"
            raise PermissionDenied(
                f"{self.kind} '{self.name}' lacks the '{role}' role that {method} needs"
                f" (it has: {have})"
            )

    def require_key(self, key: str, role: str, *, is_prefix: bool = False) -> None:
        """Refuse a key (or a scan/watch prefix) outside the grants for `role`."""
        if self.grants is None or key.startswith(self.prefixes[role]):
            return
        raise self.key_refusal(key, role, is_prefix=is_prefix)

    def key_refusal(self, key: str, role: str, *, is_prefix: bool = False) -> PermissionDenied:
        """The error refusing `key` (or a prefix) for `role`, naming what is allowed."""
        what = "prefix" if is_prefix else "key"
        allowed = ", ".join(
            f"'{g.prefix}' ({'+'.join(sorted(g.roles))})" for g in self.grants or ()
        )  # fmt: skip
        return PermissionDenied(
            f"{what} {_shown_key(key)} is outside what {self.kind} '{self.name}' may {role};"
            f" allowed prefixes: {allowed or 'none'}"
        )


ANONYMOUS_ROLES = ROLES


def anonymous(client: str) -> Principal:
    """Who calls a node with `auth: none`: every role, identified by its address."""
    return Principal(name=client, kind="anonymous", roles=ANONYMOUS_ROLES)


def _shown_key(key: str, limit: int = 64) -> str:
    return repr(key if len(key) <= limit else key[:limit] + "…")


def parse_roles(text: Iterable[str] | str, where: str) -> frozenset[str]:
    """Roles from a list or a comma/plus-separated string; unknown names are a ConfigError."""
    items = text.replace("+", ",").split(",") if isinstance(text, str) else list(text)
    roles = frozenset(str(r).strip() for r in items if str(r).strip())
    unknown = roles - ROLES
    if unknown:
        raise ConfigError(
            f"{where}: unknown role(s) {', '.join(sorted(unknown))};"
            f" roles are {', '.join(sorted(ROLES))}"
        )
    return roles


def parse_shared_prefixes(text: str) -> tuple[Grant, ...]:
    """`room:=read,lobby:=read+write` → grants (setting jwt_shared_prefixes)."""
    grants = []
    for item in text.split(","):
        if not item.strip():
            continue
        prefix, sep, roles = item.strip().rpartition("=")
        if not sep or not prefix:
            raise ConfigError(
                f"jwt_shared_prefixes: {item.strip()!r} is not prefix=role[+role] (e.g. room:=read)"
            )
        grants.append(Grant(prefix, parse_roles(roles, "jwt_shared_prefixes")))
    return tuple(grants)


@dataclass(frozen=True, slots=True)
class _TokenEntry:
    digest: bytes
    principal: Principal


class TokenTable:
    """The static tokens of `tokens_file`, found by the SHA-256 of the presented token."""

    def __init__(self, entries: list[_TokenEntry]) -> None:
        self.entries = entries
        # (Two entries with one token: the later one wins, as the file reads.)
        self._by_digest = {entry.digest: entry for entry in entries}

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Read and validate the file; any problem is a ConfigError naming file and entry."""
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read tokens_file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"tokens_file {path} is not valid YAML: {exc}") from exc
        if not isinstance(doc, Mapping) or not isinstance(doc.get("tokens"), list):
            raise ConfigError(f"tokens_file {path} must hold `tokens:` with a list of entries")
        entries: list[_TokenEntry] = []
        names: set[str] = set()
        for i, raw in enumerate(doc["tokens"]):
            where = f"tokens_file {path}, entry {i + 1}"
            entries.append(_entry(raw, where))
            name = entries[-1].principal.name
            if name in names:
                raise ConfigError(f"{where}: the name {name!r} is used twice")
            names.add(name)
        return cls(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, token: bytes) -> Principal | None:
        """The principal of `token`, looked up by its SHA-256.

        The lookup is keyed by the SHA-256 of the presented token, so its timing
        depends only on that hash: what it could reveal is how a guess's hash relates
        to the stored hashes, and turning that into a token takes a SHA-256 preimage.
        The one candidate is still compared in constant time, as the scan over every
        entry that this replaced did.
        """
        digest = hashlib.sha256(token).digest()
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        return entry.principal


_ENTRY_KEYS = {"name", "sha256", "roles", "prefixes"}


def _entry(raw: object, where: str) -> _TokenEntry:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with name, sha256, roles")
    extra = set(raw) - _ENTRY_KEYS
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, extra)))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: `name` must be a non-empty string")
    hexdigest = raw.get("sha256")
    try:
        digest = bytes.fromhex(str(hexdigest))
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ConfigError(f"{where} ({name}): `sha256` must be 64 hex digits (sha256sum)")
    roles_raw = raw.get("roles")
    if not isinstance(roles_raw, list) or not roles_raw:
        raise ConfigError(f"{where} ({name}): `roles` must be a non-empty list")
    roles = parse_roles([str(r) for r in roles_raw], f"{where} ({name})")
    prefixes = raw.get("prefixes")
    grants: tuple[Grant, ...] | None = None
    if prefixes is not None:
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise ConfigError(f"{where} ({name}): `prefixes` must be a list of strings")
        grants = tuple(Grant(p, roles) for p in prefixes)
    return _TokenEntry(digest, Principal(name=name, kind="token", roles=roles, grants=grants))


def bearer_token(authorization: bytes | None) -> bytes:
    """The credential of an `Authorization: Bearer …` header; Unauthenticated otherwise."""
    if not authorization:
        raise Unauthenticated("no credential: send the header `Authorization: Bearer <token>`")
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be `Bearer <token>`")
    return token.strip()
