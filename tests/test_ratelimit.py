"""Token buckets: rate, burst, per-role overrides, bounded memory."""

from __future__ import annotations

import pytest

from kvservice import ratelimit
from kvservice.auth import Principal, anonymous
from kvservice.config import ConfigError
from kvservice.ratelimit import ConcurrencyLimit, Limit, RateLimiter, parse_role_limits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(10, 3, clock=clock)
    lim = limiter.default
    assert [limiter.take("a", lim) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("a", lim)
    assert wait == pytest.approx(0.1)
    assert limiter.take("b", lim) == 0.0  # another identity has its own bucket
    clock.now += 0.1
    assert limiter.take("a", lim) == 0.0
    assert limiter.take("a", lim) > 0
    clock.now += 10  # refills only up to the burst
    assert [limiter.take("a", lim) for _ in range(4)].count(0.0) == 3


def test_role_overrides_pick_the_most_generous() -> None:
    limits = parse_role_limits("admin=0, read=100:200 ,write=50")
    assert limits == {"admin": Limit(0, 1), "read": Limit(100, 200), "write": Limit(50, 50)}
    limiter = RateLimiter(5, 0, limits)

    def who(*roles: str) -> Principal:
        return Principal("x", "token", frozenset(roles))

    assert limiter.limit_for(who("read", "write")) == Limit(100, 200)
    assert limiter.limit_for(who("admin", "read")).rate == 0  # unlimited
    assert limiter.limit_for(who("replication")) == Limit(5, 5)
    assert limiter.limit_for(anonymous("10.0.0.1")) == Limit(5, 5)  # no role overrides


@pytest.mark.parametrize("bad", ["admin", "admin=x", "root=5", "read=-1", "read+write=5"])
def test_bad_role_limits(bad: str) -> None:
    with pytest.raises(ConfigError, match="rate_limit_roles"):
        parse_role_limits(bad)


def test_buckets_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_BUCKETS", 100)
    clock = Clock()
    limiter = RateLimiter(1, 1, clock=clock)
    for i in range(1000):
        limiter.take(f"10.0.{i // 256}.{i % 256}", limiter.default)
        clock.now += 0.01
    assert len(limiter.buckets) <= 100


def test_concurrency_limit() -> None:
    limit = ConcurrencyLimit(2)
    assert limit.try_enter()
    assert limit.try_enter()
    assert not limit.try_enter()
    limit.leave()
    assert limit.try_enter()
