"""The data model against a plain model: Set / Delete / Touch / Increment / Txn with
compare-and-set conditions, TTLs on a simulated clock, expiry cycles, snapshots,
restarts and crashes. State, revisions and expiries must always be equal."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvservice.engine import SLOT_MS, unpack
from kvservice.errors import ConditionFailed, KeyNotFound, NotACounter
from kvservice.ops import INT64_MAX, INT64_MIN, parse_counter
from kvservice.storage import record
from kvservice.v1.kv_pb2 import (
    Condition,
    DeleteRequest,
    IncrementRequest,
    Op,
    SetRequest,
    TouchRequest,
)
from tests.nodes import LoopNode

KEYS = ["a", "b", "c", "room:1", "ключ"]
keys = st.sampled_from(KEYS)
values = st.one_of(
    st.sampled_from([b"0", b"7", b"-5", b"-0", b"abc", b"", b"007", str(INT64_MAX).encode()]),
    st.binary(max_size=32),
)
ttls = st.sampled_from([0, 0, 1, 150, 500, 3000])
if_revisions = st.one_of(st.none(), st.integers(min_value=0, max_value=12))
deltas = st.one_of(st.integers(-3, 3), st.sampled_from([INT64_MAX, INT64_MIN]))


@dataclass
class Entry:
    value: bytes
    revision: int
    expires: int  # 0 = never


class Rejected(Exception):
    """The model's prediction that the node refuses the operation (as `kind`)."""

    def __init__(self, kind: type[Exception]) -> None:
        self.kind = kind


class DataModelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.now = 1_000_000_000
        self.node = LoopNode(
            Path(self.tmp.name) / "data",
            clock=lambda: self.now,
            wal_segment_bytes=4096,
            snapshot_threshold_bytes=8192,
        )
        self.model: dict[str, Entry] = {}
        self.revision = 0

    def teardown(self) -> None:
        self.node.close()
        self.tmp.cleanup()

    # -- the model --------------------------------------------------------------

    def live(self, key: str) -> Entry | None:
        entry = self.model.get(key)
        if entry is None or (entry.expires and entry.expires <= self.now):
            return None
        return entry

    def expire_due(self, key: str) -> None:
        """A write to an expired key first commits its removal (one revision)."""
        if key in self.model and self.live(key) is None:
            del self.model[key]
            self.revision += 1

    def cas(self, key: str, if_revision: int | None) -> None:
        entry = self.live(key)
        if if_revision is not None and (0 if entry is None else entry.revision) != if_revision:
            raise Rejected(ConditionFailed)

    def expiry(self, ttl: int) -> int:
        return self.now + ttl if ttl else 0

    def counter(self, key: str, delta: int, ttl: int) -> tuple[bytes, int]:
        entry = self.live(key)
        current = 0
        if entry is not None:
            text = entry.value
            ok = text == b"0" or (
                text.lstrip(b"-")[:1] not in (b"", b"0") and text.count(b"-") <= 1
            )
            if not ok or not text.lstrip(b"-").isdigit() or text[1:].count(b"-"):
                raise Rejected(NotACounter)
            current = int(text)
            if not INT64_MIN <= current <= INT64_MAX:
                raise Rejected(NotACounter)
        result = current + delta
        if not INT64_MIN <= result <= INT64_MAX:
            raise Rejected(NotACounter)
        kept = 0 if entry is None else entry.expires
        return str(result).encode(), self.expiry(ttl) if ttl else kept

    def expect(self, call: object, predicted: Rejected | None) -> object:
        """Run a node call; it must fail exactly as predicted, else succeed."""
        if predicted is not None:
            with pytest.raises(predicted.kind):
                self.node.run(call)
            return None
        return self.node.run(call)

    # -- rules --------------------------------------------------------------------

    @rule(ms=st.sampled_from([0, 1, 99, 100, 149, 600, 5000]))
    def advance_time(self, ms: int) -> None:
        self.now += ms

    @rule(key=keys, value=values, ttl=ttls, if_revision=if_revisions)
    def set(self, key: str, value: bytes, ttl: int, if_revision: int | None) -> None:
        call = self.node.node.set(key, value, ttl, if_revision)
        self.expire_due(key)
        try:
            self.cas(key, if_revision)
        except Rejected as rejected:
            self.expect(call, rejected)
            return
        self.revision += 1
        self.model[key] = Entry(value, self.revision, self.expiry(ttl))
        assert self.expect(call, None) == self.revision

    @rule(key=keys, if_revision=if_revisions)
    def delete(self, key: str, if_revision: int | None) -> None:
        call = self.node.node.delete(key, if_revision)
        self.expire_due(key)
        try:
            self.cas(key, if_revision)
        except Rejected as rejected:
            self.expect(call, rejected)
            return
        if self.live(key) is None:
            assert self.expect(call, None) == (False, self.revision)
            return
        self.revision += 1
        del self.model[key]
        assert self.expect(call, None) == (True, self.revision)

    @rule(key=keys, ttl=ttls, if_revision=if_revisions)
    def touch(self, key: str, ttl: int, if_revision: int | None) -> None:
        call = self.node.node.touch(key, ttl, if_revision)
        self.expire_due(key)
        try:
            self.cas(key, if_revision)
            entry = self.live(key)
            if entry is None:
                raise Rejected(KeyNotFound)
        except Rejected as rejected:
            self.expect(call, rejected)
            return
        self.revision += 1
        self.model[key] = Entry(entry.value, self.revision, self.expiry(ttl))
        assert self.expect(call, None) == (self.revision, self.expiry(ttl))

    @rule(key=keys, delta=deltas, ttl=ttls)
    def increment(self, key: str, delta: int, ttl: int) -> None:
        call = self.node.node.increment(key, delta, ttl)
        self.expire_due(key)
        try:
            value, expires = self.counter(key, delta, ttl)
        except Rejected as rejected:
            self.expect(call, rejected)
            return
        self.revision += 1
        self.model[key] = Entry(value, self.revision, expires)
        assert self.expect(call, None) == (int(value), self.revision)

    @rule(data=st.data())
    def txn(self, data: st.DataObject) -> None:
        conditions = data.draw(
            st.lists(
                st.builds(self._condition, keys, st.integers(0, 4), st.integers(0, 12)), max_size=3
            )
        )
        success = self._ops(data, "success")
        failure = self._ops(data, "failure")
        call = self.node.node.txn(conditions, success, failure)
        touched = {c.key for c in conditions} | {self._key(op) for op in success + failure}
        for key in sorted(touched):
            self.expire_due(key)
        succeeded = all(self._holds(c) for c in conditions)
        try:
            changes = [self._op_change(op) for op in (success if succeeded else failure)]
        except Rejected as rejected:
            self.expect(call, rejected)
            return
        writes = [change for change in changes if change is not None]
        if writes:
            self.revision += 1
        for key, entry in writes:
            if entry is None:
                del self.model[key]
            else:
                entry.revision = self.revision
                self.model[key] = entry
        got = self.expect(call, None)
        assert isinstance(got, tuple)
        assert got[:2] == (succeeded, self.revision)

    @staticmethod
    def _condition(key: str, kind: int, revision: int) -> Condition:
        if kind == 0:
            return Condition(key=key, revision=revision)
        if kind == 1:
            return Condition(key=key, absent=True)
        return Condition(key=key, present=True)

    def _ops(self, data: st.DataObject, label: str) -> list[Op]:
        chosen = data.draw(st.lists(keys, unique=True, max_size=3), label=f"{label} keys")
        ops = []
        for key in chosen:
            kind = data.draw(st.sampled_from(["set", "delete", "increment", "touch"]))
            ttl = data.draw(ttls)
            if kind == "set":
                ops.append(Op(set=SetRequest(key=key, value=data.draw(values), ttl_ms=ttl)))
            elif kind == "delete":
                ops.append(Op(delete=DeleteRequest(key=key)))
            elif kind == "increment":
                ops.append(
                    Op(increment=IncrementRequest(key=key, delta=data.draw(deltas), ttl_ms=ttl))
                )
            else:
                ops.append(Op(touch=TouchRequest(key=key, ttl_ms=ttl)))
        return ops

    @staticmethod
    def _key(op: Op) -> str:
        key: str = getattr(op, str(op.WhichOneof("op"))).key
        return key

    def _holds(self, condition: Condition) -> bool:
        entry = self.live(condition.key)
        test = condition.WhichOneof("test")
        if test == "revision":
            return entry is not None and entry.revision == condition.revision
        return (entry is None) == (test == "absent")

    def _op_change(self, op: Op) -> tuple[str, Entry | None] | None:
        """(key, new entry or None for a delete), or None when the op writes nothing."""
        kind = op.WhichOneof("op")
        key = self._key(op)
        entry = self.live(key)
        if kind == "set":
            return key, Entry(op.set.value, 0, self.expiry(op.set.ttl_ms))
        if kind == "delete":
            return None if entry is None else (key, None)
        if kind == "touch":
            if entry is None:
                raise Rejected(KeyNotFound)
            return key, Entry(entry.value, 0, self.expiry(op.touch.ttl_ms))
        value, expires = self.counter(key, op.increment.delta, op.increment.ttl_ms)
        return key, Entry(value, 0, expires)

    @rule()
    def expire_cycle(self) -> None:
        node = self.node.node
        removed = node.expire_cycle(10_000)
        self.node.run(node.wal.sync())
        due = [
            k
            for k, e in self.model.items()
            if e.expires and (e.expires // SLOT_MS + 1) * SLOT_MS <= self.now
        ]
        assert removed == len(due)
        for key in due:
            del self.model[key]
        self.revision += removed

    @rule()
    def snapshot(self) -> None:
        if self.revision:
            # A removal committed by a write that then failed is made durable in
            # the background; a snapshot covers what is durable.
            self.node.run(self.node.node.wal.sync())
            info = self.node.run(self.node.node.snapshot())
            assert (info.revision, info.key_count) == (self.revision, len(self.model))

    @rule()
    def restart(self) -> None:
        self.node.restart()

    @rule(key=keys, value=values, data=st.data())
    def crash_mid_write(self, key: str, value: bytes, data: st.DataObject) -> None:
        """Crash while an unacknowledged write is partly on disk: it vanishes or is whole."""
        node = self.node.node
        self.node.run(node.wal.sync())  # (as in snapshot(): the crash is of this write only)
        entry = node.store.next_set(key, value)
        framed = record.encode(entry.SerializeToString())
        written = data.draw(st.integers(min_value=0, max_value=len(framed)), label="bytes")
        segment = node.wal.active_segment
        self.node.abandon()
        with open(segment, "ab") as f:
            f.write(framed[:written])
        self.node.reopen()
        if written == len(framed):
            self.revision = entry.revision
            self.model[key] = Entry(value, entry.revision, 0)

    @invariant()
    def equals_model(self) -> None:
        store = self.node.node.store
        assert store.revision == self.revision
        stored = {key: unpack(raw) for key, raw in store.data.items()}
        assert {k: (i.value, i.revision, i.expires_at_ms) for k, i in stored.items()} == {
            k: (e.value, e.revision, e.expires) for k, e in self.model.items()
        }
        for key in KEYS:  # what clients see hides the expired
            item = store.item(key)
            entry = self.live(key)
            assert (item is None) == (entry is None)


DataModelMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
test_data_model_matches_model = DataModelMachine.TestCase


@pytest.mark.parametrize(
    "text", [b"-0", b"007", b"+1", b" 1", b"1 ", b"", b"-", b"1e3", b"9223372036854775808"]
)
def test_not_a_counter(text: bytes) -> None:
    """What Redis's INCR refuses: the text must round-trip through int64."""
    with pytest.raises(NotACounter):
        parse_counter("k", text)


@pytest.mark.parametrize(
    "text", [b"0", b"7", b"-5", b"9223372036854775807", b"-9223372036854775808"]
)
def test_a_counter(text: bytes) -> None:
    assert str(parse_counter("k", text)).encode() == text
