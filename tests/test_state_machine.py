"""A node must always equal a plain dict: set / delete / restart / crash / snapshot."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvservice.storage import record
from tests.nodes import LoopNode

keys = st.sampled_from(["a", "b", "c", "user:1:session", "ключ", "k" * 40])
values = st.binary(max_size=64)


class NodeMatchesDict(RuleBasedStateMachine):
    policy = "always"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.data_dir = Path(self.tmp.name) / "data"
        # Tiny segments and snapshot threshold so rotation, snapshots and purges happen.
        self.node = LoopNode(
            self.data_dir, fsync=self.policy, wal_segment_bytes=4096, snapshot_threshold_bytes=8192
        )
        self.model: dict[str, bytes] = {}
        self.revisions: dict[str, int] = {}
        self.revision = 0

    def teardown(self) -> None:
        self.node.close()
        self.tmp.cleanup()

    @rule(key=keys, value=values)
    def set(self, key: str, value: bytes) -> None:
        revision = self.node.run(self.node.node.set(key, value))
        assert revision == self.revision + 1
        self.revision = revision
        self.model[key] = value
        self.revisions[key] = revision

    @rule(key=keys)
    def delete(self, key: str) -> None:
        deleted, revision = self.node.run(self.node.node.delete(key))
        assert deleted == (key in self.model)
        if deleted:
            assert revision == self.revision + 1
            self.revision = revision
            del self.model[key]
            del self.revisions[key]
        else:
            assert revision == self.revision

    @rule()
    def restart(self) -> None:
        self.node.restart()

    @rule(key=keys, value=values, data=st.data())
    def crash_mid_write(self, key: str, value: bytes, data: st.DataObject) -> None:
        """Crash while an unacknowledged write is partly on disk: it must vanish or be whole."""
        node = self.node.node
        entry = node.store.next_set(key, value)
        framed = record.encode(entry.SerializeToString())
        written = data.draw(st.integers(min_value=0, max_value=len(framed)), label="bytes written")
        segment = node.wal.active_segment
        self.node.abandon()
        with open(segment, "ab") as f:
            f.write(framed[:written])
        self.node.reopen()
        if written == len(framed):  # the whole record reached the disk: it is a committed write
            self.revision = entry.revision
            self.model[key] = value
            self.revisions[key] = entry.revision

    @precondition(lambda self: self.revision > 0)
    @rule()
    def snapshot(self) -> None:
        info = self.node.run(self.node.node.snapshot())
        assert info is not None
        assert info.path.exists()
        assert (info.revision, info.key_count) == (self.revision, len(self.model))

    @invariant()
    def equals_model(self) -> None:
        store = self.node.node.store
        assert store.revision == self.revision
        assert {k: v for k, (v, _) in ((k, store.get(k)) for k in store.data)} == self.model
        for key, revision in self.revisions.items():
            assert store.get(key) == (self.model[key], revision)


NodeMatchesDict.TestCase.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
test_node_matches_dict = NodeMatchesDict.TestCase


class NodeAtFsyncNoMatchesDict(NodeMatchesDict):
    """The same at fsync=no: a process crash keeps what was written to the OS."""

    policy = "no"


NodeAtFsyncNoMatchesDict.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None
)
test_node_at_fsync_no_matches_dict = NodeAtFsyncNoMatchesDict.TestCase
