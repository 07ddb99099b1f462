"""Client operations -> log entries, decided against the current state.

Pure: nothing here writes, awaits or reads a clock (the node passes `now_ms`),
so the node can plan an operation and append its entry in one step with no
await between, and a test can plan against any store. Entries are built with
revision 0; the node numbers them as it appends.

Semantics (DESIGN.md, "Data model"):
- A key whose expiry has passed is absent to every operation (and to CAS).
- `if_revision`: apply only if the key's revision equals it; 0 = only if absent.
- Increment keeps a counter as decimal text; the result must fit in an int64.
- A Txn writes each key at most once (as etcd requires), so every operation
  is decided against the state before the Txn, and their order cannot matter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from kvservice import values
from kvservice.engine import DELETE, ENCODING_ZSTD, SET, TOUCH, Store
from kvservice.errors import ConditionFailed, InvalidArgument, KeyNotFound, NotACounter
from kvservice.v1.kv_pb2 import (
    Condition,
    DeleteResponse,
    IncrementResponse,
    Op,
    OpResult,
    SetResponse,
    TouchResponse,
)
from kvservice.v1.log_pb2 import LogEntry

# 100 years: far enough for any session, near enough that now + ttl stays a
# sane timestamp (and an int64).
MAX_TTL_MS: Final = 100 * 365 * 24 * 3600 * 1000
INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1
# What Redis INCR accepts: an optional minus sign and digits, no spaces, no "+",
# no leading zeros and no "-0" (so the text round-trips).
_COUNTER: Final = re.compile(rb"0|-?[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int
    max_value_bytes: int
    max_batch_ops: int = 1000
    # Values at least this long are stored as zstd frames; None = compression off.
    compress_min_bytes: int | None = None

    def check_key(self, key: str) -> None:
        if not key:
            raise InvalidArgument("key must not be empty")
        # A str of n characters is at most 4n UTF-8 bytes: encode only when it matters.
        if len(key) * 4 > self.max_key_bytes and len(key.encode()) > self.max_key_bytes:
            raise InvalidArgument(
                f"key is {len(key.encode())} bytes; the limit is {self.max_key_bytes}"
                " (setting max_key_bytes)"
            )

    def check_value(self, value: bytes) -> None:
        if len(value) > self.max_value_bytes:
            raise InvalidArgument(
                f"value is {len(value)} bytes; the limit is {self.max_value_bytes}"
                " (setting max_value_bytes)"
            )

    def check_batch(self, count: int, what: str) -> None:
        if count > self.max_batch_ops:
            raise InvalidArgument(
                f"{what} is {count}; the limit is {self.max_batch_ops} (setting max_batch_ops)"
            )


def check_ttl(ttl_ms: int) -> None:
    if ttl_ms < 0:
        raise InvalidArgument(f"ttl_ms must not be negative (got {ttl_ms})")
    if ttl_ms > MAX_TTL_MS:
        raise InvalidArgument(f"ttl_ms is at most {MAX_TTL_MS} (100 years; got {ttl_ms})")


def expires_at(now_ms: int, ttl_ms: int) -> int:
    """The absolute expiry for a TTL; 0 (never) for ttl_ms 0."""
    check_ttl(ttl_ms)
    return now_ms + ttl_ms if ttl_ms else 0


def check_revision(store: Store, key: str, if_revision: int | None) -> None:
    """Compare-and-set: `aborted` unless the key's revision is `if_revision` (None: no check)."""
    if if_revision is None:
        return
    item = store.item(key)
    current = 0 if item is None else item.revision
    if current != if_revision:
        state = "absent" if item is None else f"at revision {current}"
        raise ConditionFailed(f"if_revision {if_revision} does not hold: key {key!r} is {state}")


def set_entry(key: str, value: bytes, expires: int, limits: Limits) -> LogEntry:
    entry = LogEntry(operation=SET, key=key, expires_at_ms=expires)
    frame = None
    if limits.compress_min_bytes is not None:
        frame = values.compress(value, limits.compress_min_bytes)
    if frame is None:
        entry.value = value
    else:
        entry.value = frame
        entry.value_encoding = ENCODING_ZSTD
    return entry


def delete_entry(key: str, expired: bool = False) -> LogEntry:
    return LogEntry(operation=DELETE, key=key, expired=expired)


def touch_entry(store: Store, key: str, ttl_ms: int, now_ms: int) -> LogEntry:
    if store.item(key) is None:
        raise KeyNotFound(f"key {key!r} does not exist (or has expired)")
    return LogEntry(operation=TOUCH, key=key, expires_at_ms=expires_at(now_ms, ttl_ms))


def increment_entry(
    store: Store, key: str, delta: int, ttl_ms: int, *, now_ms: int, limits: Limits
) -> tuple[LogEntry, int]:
    """The SET of the counter's new value, and that value."""
    item = store.item(key)
    current = 0 if item is None else parse_counter(key, item.value)
    result = current + delta
    if not INT64_MIN <= result <= INT64_MAX:
        raise NotACounter(f"incrementing key {key!r} ({current}) by {delta} overflows an int64")
    # ttl_ms 0 keeps the counter's expiry (a new counter has none).
    kept = 0 if item is None else item.expires_at_ms
    expires = expires_at(now_ms, ttl_ms) if ttl_ms else kept
    return set_entry(key, str(result).encode(), expires, limits), result


def parse_counter(key: str, value: bytes) -> int:
    if _COUNTER.fullmatch(value) is None or not INT64_MIN <= int(value) <= INT64_MAX:
        shown = value[:40].decode(errors="replace")
        raise NotACounter(f"key {key!r} holds {shown!r}, not a decimal int64")
    return int(value)


# -- Txn ----------------------------------------------------------------------


def holds(store: Store, condition: Condition) -> bool:
    item = store.item(condition.key)
    test = condition.WhichOneof("test")
    if test == "revision":
        return item is not None and item.revision == condition.revision
    if test == "absent":
        return item is None
    if test == "present":
        return item is not None
    raise InvalidArgument(f"condition on key {condition.key!r} has no test")


@dataclass
class TxnPlan:
    succeeded: bool
    entries: list[LogEntry]
    # Filled once the revision is known (the Txn's one revision).
    results: list[OpResult]


def validate_txn(
    conditions: Sequence[Condition], success: Sequence[Op], failure: Sequence[Op], limits: Limits
) -> None:
    """Check a Txn's shape before looking at any state."""
    limits.check_batch(len(conditions) + len(success) + len(failure), "conditions + operations")
    for condition in conditions:
        limits.check_key(condition.key)
        if condition.WhichOneof("test") is None:
            raise InvalidArgument(f"condition on key {condition.key!r} has no test")
    for branch in (success, failure):
        seen: set[str] = set()
        for op in branch:
            key = _check_op(op, limits)
            if key in seen:
                raise InvalidArgument(f"key {key!r} is written twice in one Txn branch")
            seen.add(key)


def _check_op(op: Op, limits: Limits) -> str:
    kind = op.WhichOneof("op")
    if kind is None:
        raise InvalidArgument("a Txn operation has none of set, delete, increment, touch")
    request = getattr(op, kind)
    limits.check_key(request.key)
    if request.wait_replicas:
        raise InvalidArgument("wait_replicas goes on the TxnRequest, not on its operations")
    if kind != "increment" and request.HasField("if_revision"):
        raise InvalidArgument("if_revision is not allowed inside a Txn: use its conditions")
    if kind == "set":
        limits.check_value(request.value)
    if kind in ("set", "touch", "increment"):
        check_ttl(request.ttl_ms)
    key: str = request.key
    return key


def plan_txn(
    store: Store,
    conditions: Sequence[Condition],
    success: Sequence[Op],
    failure: Sequence[Op],
    *,
    now_ms: int,
    limits: Limits,
) -> TxnPlan:
    succeeded = all(holds(store, condition) for condition in conditions)
    plan = TxnPlan(succeeded, [], [])
    for op in success if succeeded else failure:
        plan.results.append(_plan_op(store, op, now_ms, limits, plan.entries))
    return plan


def _plan_op(
    store: Store, op: Op, now_ms: int, limits: Limits, entries: list[LogEntry]
) -> OpResult:
    kind = op.WhichOneof("op")
    if kind == "set":
        set_op = op.set
        expires = expires_at(now_ms, set_op.ttl_ms)
        entries.append(set_entry(set_op.key, set_op.value, expires, limits))
        return OpResult(set=SetResponse())
    if kind == "delete":
        if store.item(op.delete.key) is None:
            return OpResult(delete=DeleteResponse(deleted=False))
        entries.append(delete_entry(op.delete.key))
        return OpResult(delete=DeleteResponse(deleted=True))
    if kind == "touch":
        entry = touch_entry(store, op.touch.key, op.touch.ttl_ms, now_ms)
        entries.append(entry)
        return OpResult(touch=TouchResponse(expires_at_ms=entry.expires_at_ms))
    inc = op.increment
    entry, value = increment_entry(
        store, inc.key, inc.delta, inc.ttl_ms, now_ms=now_ms, limits=limits
    )
    entries.append(entry)
    return OpResult(increment=IncrementResponse(value=value))


def stamp_results(results: list[OpResult], revision: int) -> None:
    """Give every result the Txn's revision (the node's revision if nothing was written)."""
    for result in results:
        response = getattr(result, str(result.WhichOneof("result")))
        response.revision = revision
