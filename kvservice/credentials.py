"""Verified credentials, remembered per `Authorization` header value.

Verifying a credential costs a SHA-256 (static token) or a signature check
(JWT), and turning it into a rate-limit identity and limit costs more Python
again; a client sends the same header on every request. So the first request
with a header verifies it and later ones find it here with one dict lookup.
A JWT's validity window is still checked on every use, and `Security.reload`
starts a new cache, so a revoked token or a rotated key takes effect at once.

Keyed by the raw header, which holds the secret, and that is safe: a dict
compares a lookup's keyed 64-bit hash (SipHash with a random per-process key)
before it compares any bytes, so a presented value that is not a cached one
is turned away without its bytes being compared with a stored credential (bar
a 2^-64 hash match), and only verified credentials are ever stored, so failed
guesses cannot fill it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from kvservice.access import Caller
from kvservice.auth import Principal
from kvservice.ratelimit import Limit

# Enough for every active caller of one node; past it the least recently used goes.
CACHE_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class Credential:
    """An authenticated caller, with what every request of it needs precomputed."""

    principal: Principal
    identity: str  # its rate-limit bucket: "token:name", "jwt:sub", or the client address
    limit: Limit | None  # its rate limit (None: rate limiting is off)
    # Unix times between which it may be used (a JWT's nbf and exp, with leeway).
    not_before: float = -math.inf
    not_after: float = math.inf
    # What the key check sees (`access.CALLER`), per role the caller has used.
    callers: dict[str, Caller] = field(default_factory=dict, compare=False, repr=False)

    def caller(self, role: str) -> Caller:
        """The caller in `role`, made on first use."""
        found = self.callers.get(role)
        if found is None:
            found = self.callers[role] = Caller(self.principal, role)
        return found


class CredentialCache:
    """A bounded LRU map from an `Authorization` header value to its `Credential`."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.max_entries = entries
        self._entries: OrderedDict[bytes, Credential] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, authorization: bytes, now: float) -> Credential | None:
        """The credential of this exact header value if verified before and valid at `now`;
        None means: verify it (which also says why an expired one is refused)."""
        entries = self._entries  # (clear() may swap it from a SIGHUP handler meanwhile)
        found = entries.get(authorization)
        if found is None:
            return None
        if not found.not_before <= now <= found.not_after:
            entries.pop(authorization, None)  # expired (or the clock went back): verify again
            return None
        entries.move_to_end(authorization)
        return found

    def put(self, authorization: bytes, credential: Credential) -> None:
        entries = self._entries
        entries[authorization] = credential
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        # A new map rather than OrderedDict.clear(): a reload runs in a signal handler,
        # which may interrupt get() between its lookup and its move_to_end.
        self._entries = OrderedDict()
