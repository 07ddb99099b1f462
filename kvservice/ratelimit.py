"""Token buckets per identity, with per-role overrides.

In-house rather than the `limits` package: `limits` has no token bucket (its
moving and sliding windows refuse differently from `rate + burst`), and its
in-memory strategies cost several times more per request than this dict of
two floats (`python -m bench.ratelimit_micro`; figures in
bench/results/security.md). Everything runs on the event-loop thread, so
there are no locks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvservice.auth import Principal, parse_roles
from kvservice.config import ConfigError

# Past this many identities, buckets that have refilled completely (idle
# callers) are dropped, so a scan of client addresses cannot grow memory
# without bound; a full bucket carries no state worth keeping.
MAX_BUCKETS = 100_000


@dataclass(frozen=True, slots=True)
class Limit:
    rate: float  # tokens per second; 0 = unlimited
    burst: float


def parse_role_limits(text: str) -> dict[str, Limit]:
    """`admin=0,read=200:400` → per-role limits (setting rate_limit_roles)."""
    limits: dict[str, Limit] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        role, sep, spec = item.strip().partition("=")
        rps, _, burst = spec.partition(":")
        try:
            rate = float(rps)
            size = float(burst) if burst else 0.0
        except ValueError:
            rate = size = -1.0
        if not sep or rate < 0 or size < 0:
            raise ConfigError(f"rate_limit_roles: {item.strip()!r} is not role=rps[:burst]")
        roles = parse_roles(role, "rate_limit_roles")
        if len(roles) != 1:
            raise ConfigError(f"rate_limit_roles: {item.strip()!r} must name one role")
        limits[next(iter(roles))] = Limit(rate, size or max(1.0, math.ceil(rate)))
    return limits


class RateLimiter:
    """`take(principal)` → 0.0 when allowed, else the seconds until a token is there."""

    def __init__(
        self,
        rate: float,
        burst: int,
        role_limits: dict[str, Limit] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = Limit(rate, float(burst) if burst else max(1.0, math.ceil(rate)))
        self.role_limits = role_limits or {}
        self.clock = clock
        # identity -> [tokens, last refill time]
        self.buckets: dict[str, list[float]] = {}

    @property
    def enabled(self) -> bool:
        return self.default.rate > 0 or any(lim.rate > 0 for lim in self.role_limits.values())

    def limit_for(self, principal: Principal) -> Limit:
        """The most generous override among the caller's roles, else the default."""
        if principal.kind == "anonymous" or not self.role_limits:
            return self.default
        best: Limit | None = None
        for role in principal.roles:
            lim = self.role_limits.get(role)
            if lim is not None and (
                best is None or lim.rate == 0 or (best.rate != 0 and lim.rate > best.rate)
            ):
                best = lim
        return best or self.default

    def take(self, identity: str, limit: Limit) -> float:
        if limit.rate == 0:
            return 0.0
        now = self.clock()
        bucket = self.buckets.get(identity)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._drop_idle(now)
            self.buckets[identity] = [limit.burst - 1.0, now]
            return 0.0
        # (Comparisons rather than min() and max(): this runs on every request, and
        # those builtins' argument parsing costs more than the arithmetic.)
        tokens = bucket[0] + (now - bucket[1]) * limit.rate
        if tokens > limit.burst:  # noqa: PLR1730 (see above)
            tokens = limit.burst
        bucket[1] = now
        if tokens > 0.999_999:  # float error must not refuse a token that is due
            tokens -= 1.0
            bucket[0] = tokens if tokens > 0.0 else 0.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / limit.rate

    def _drop_idle(self, now: float) -> None:
        rate = self.default.rate or 1.0
        burst = self.default.burst
        idle = [k for k, (tokens, t) in self.buckets.items() if tokens + (now - t) * rate >= burst]
        for key in idle:
            del self.buckets[key]
        if len(self.buckets) >= MAX_BUCKETS:
            self.buckets.clear()  # a flood of distinct busy callers: start over rather than grow


class ConcurrencyLimit:
    """At most `limit` RPCs in flight (0 = unlimited)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.limit and self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
