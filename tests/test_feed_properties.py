"""Property: whatever the sequence of writes, rotations, snapshots (which purge the
WAL), overflows, restarts and crashes, a consumer that follows the commit feed and
resumes from the backlog after each interruption receives exactly the committed
entries: every revision once, in order, with its content."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvservice.errors import FeedOverflow
from kvservice.feed import Subscription
from kvservice.node import Node
from kvservice.storage.backlog import BacklogReader
from kvservice.v1.log_pb2 import LogEntry
from tests.nodes import LoopNode

keys = st.sampled_from([f"k{i}" for i in range(8)])
SET, DELETE = LogEntry.OPERATION_SET, LogEntry.OPERATION_DELETE


class Consumer:
    """Follows the feed; on overflow or after a restart, fills the gap from the backlog."""

    def __init__(self) -> None:
        self.got: list[LogEntry] = []
        self.subscription: Subscription | None = None
        self.resumes = 0

    @property
    def last(self) -> int:
        return self.got[-1].revision if self.got else 0

    def attach(self, node: Node) -> None:
        # Held in the retention registry, so snapshots never purge what it still needs.
        node.snapshotter.retention.hold("consumer", lambda: self.last)
        self.subscription = node.feed.subscribe(max_entries=25)
        with BacklogReader(node.wal.dir, self.last) as reader:
            while batch := reader.read(self.subscription.start, max_entries=10):
                self.got += [item.entry for item in batch]
        self.resumes += 1

    def drain(self, node: Node) -> None:
        assert self.subscription is not None
        try:
            self.got += [item.entry for item in self.subscription.get_nowait(10_000)]
        except FeedOverflow:
            self.attach(node)


class FeedAndBacklogAreTheLog(RuleBasedStateMachine):
    policy = "always"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.node = LoopNode(
            Path(self.tmp.name) / "data", fsync=self.policy, wal_segment_bytes=4096,
            snapshot_threshold_bytes=1 << 30,  # snapshots only when the rule says so
        )  # fmt: skip
        self.committed: list[LogEntry] = []
        self.consumer = Consumer()
        self.consumer.attach(self.node.node)

    def teardown(self) -> None:
        self.node.close()
        self.tmp.cleanup()

    @rule(key=keys, size=st.integers(min_value=0, max_value=300), repeat=st.integers(1, 40))
    def write(self, key: str, size: int, repeat: int) -> None:
        for i in range(repeat):
            value = bytes([i % 256]) * size
            revision = self.node.run(self.node.node.set(key, value))
            self.committed.append(LogEntry(revision=revision, operation=SET, key=key, value=value))
        self.consumer.drain(self.node.node)

    @rule(key=keys)
    def delete(self, key: str) -> None:
        deleted, revision = self.node.run(self.node.node.delete(key))
        if deleted:
            self.committed.append(LogEntry(revision=revision, operation=DELETE, key=key))

    @rule()
    def snapshot(self) -> None:
        self.node.run(self.node.node.snapshot())

    @rule()
    def drain(self) -> None:
        self.consumer.drain(self.node.node)

    @rule()
    def restart(self) -> None:
        self.consumer.drain(self.node.node)
        self.node.restart()
        self.consumer.attach(self.node.node)

    @rule()
    def crash(self) -> None:
        self.node.abandon()
        self.node.reopen()
        self.consumer.attach(self.node.node)

    @invariant()
    def consumer_has_a_prefix_of_the_log(self) -> None:
        got = self.consumer.got
        assert got == self.committed[: len(got)]

    def check_all(self) -> None:
        self.consumer.drain(self.node.node)
        assert self.consumer.got == self.committed


class WithFinalCheck(FeedAndBacklogAreTheLog):
    def teardown(self) -> None:
        try:
            self.check_all()
        finally:
            super().teardown()


WithFinalCheck.TestCase.settings = settings(max_examples=12, stateful_step_count=20, deadline=None)
TestFeedAndBacklogAreTheLog = WithFinalCheck.TestCase
