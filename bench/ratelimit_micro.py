"""Hot-path cost of one rate-limit check: kvservice's token bucket vs the `limits` package.

    python -m bench.ratelimit_micro

Each figure is the best of 5 timeit repeats of 200,000 checks (limit never
reached) spread over 1,000 identities, in nanoseconds per check.
"""

from __future__ import annotations

import timeit

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

from kvservice.ratelimit import RateLimiter

CHECKS = 200_000
IDENTITIES = [f"token:client-{i}" for i in range(1000)]
RATE = 1_000_000  # never reached: only the bookkeeping is measured


def _best_ns(fn: object) -> float:
    times = timeit.repeat(fn, number=1, repeat=5)  # type: ignore[arg-type]
    return min(times) / CHECKS * 1e9


def inhouse() -> float:
    limiter = RateLimiter(RATE, RATE)
    limit = limiter.default
    take = limiter.take
    ids = IDENTITIES

    def run() -> None:
        for i in range(CHECKS):
            take(ids[i % 1000], limit)

    return _best_ns(run)


def with_limits(strategy: type) -> float:
    limiter = strategy(MemoryStorage())
    item = RateLimitItemPerSecond(RATE)
    hit = limiter.hit
    ids = IDENTITIES

    def run() -> None:
        for i in range(CHECKS):
            hit(item, ids[i % 1000])

    return _best_ns(run)


def main() -> None:
    rows = [("kvservice.ratelimit token bucket", inhouse())]
    for strategy in (
        FixedWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
        MovingWindowRateLimiter,
    ):
        rows.append((f"limits {strategy.__name__} + MemoryStorage", with_limits(strategy)))
    base = rows[0][1]
    print("| limiter | ns per check | x token bucket |")
    print("|---|---|---|")
    for name, ns in rows:
        print(f"| {name} | {ns:,.0f} | {ns / base:.1f} |")


if __name__ == "__main__":
    main()
