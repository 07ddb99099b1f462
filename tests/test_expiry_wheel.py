"""The expiry wheel against a plain model: every key is due exactly when its 100 ms slot
is over, once, whatever the spread of expiries, rewrites and touches; and its slot
count stays small however widely expiries spread (its memory per key)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvservice.engine import LEVEL_WIDTHS_MS, SLOT_MS, SLOTS_PER_LEVEL, ExpiryWheel

START = 1_800_000_000_000
DAY = 24 * 3600 * 1000


def fine_end(expires: int) -> int:
    return (expires // SLOT_MS + 1) * SLOT_MS


steps = st.lists(
    st.one_of(
        st.tuples(st.just("file"), st.integers(0, 9), st.integers(1, 3 * DAY)),
        st.tuples(st.just("tick"), st.just(0), st.sampled_from([1, 99, 100, 5_000, 600_000, DAY])),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_keys_are_due_when_their_slot_is_over_and_only_once(
    plan: list[tuple[str, int, int]],
) -> None:
    now = START
    wheel = ExpiryWheel()
    expiry: dict[str, int] = {}  # the store: key -> current expiry
    for kind, n, amount in plan:
        if kind == "file":  # a Set or Touch with a TTL (a rewrite leaves the old entry)
            key = f"k{n}"
            expiry[key] = now + amount
            wheel.add(key, expiry[key], now)
            continue
        now += amount
        expected = sorted(k for k, e in expiry.items() if fine_end(e) <= now)
        assert sorted(remove_due(wheel, expiry, now)) == expected
    now += 4 * DAY
    left = sorted(expiry)
    assert sorted(remove_due(wheel, expiry, now)) == left
    assert not wheel.slots


def remove_due(wheel: ExpiryWheel, expiry: dict[str, int], now: int) -> list[str]:
    """What the primary's cycle does: remove each key as the wheel yields it."""
    removed = []
    for key in wheel.due(now, 10**6, lambda k: expiry.get(k, 0)):
        removed.append(key)
        del expiry[key]
    return removed


def test_widely_spread_expiries_use_few_slots() -> None:
    """100,000 keys over a day: slots stay in the hundreds (levels x 100), not one per key."""
    wheel = ExpiryWheel()
    for i in range(100_000):
        wheel.add(f"k{i}", START + (i * 7919) % DAY + 1, START)
    assert len(wheel) == 100_000
    assert len(wheel.slots) <= len(LEVEL_WIDTHS_MS) * SLOTS_PER_LEVEL + 1


def test_a_limit_leaves_the_rest_for_the_next_cycle() -> None:
    wheel = ExpiryWheel()
    for i in range(250):
        wheel.add(f"k{i}", START + 50, START)
    expiry = dict.fromkeys((f"k{i}" for i in range(250)), START + 50)
    first = []
    for key in wheel.due(START + 200, 100, lambda k: expiry.get(k, 0)):
        first.append(key)
        del expiry[key]
    rest = remove_due(wheel, expiry, START + 200)
    assert len(first) == 100
    assert sorted(first + rest) == sorted(f"k{i}" for i in range(250))
