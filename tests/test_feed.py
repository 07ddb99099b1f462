"""The commit feed: every durable entry once, in order, never above the watermark;
an overflowing subscriber is cut and resumes from the backlog without gap or duplicate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvservice.errors import FeedOverflow, ShuttingDown
from kvservice.feed import Committed, Subscription
from kvservice.node import Node
from kvservice.storage import record
from kvservice.storage.backlog import BacklogReader
from kvservice.v1.log_pb2 import LogEntry
from tests.nodes import open_node

WRITERS = 16
WRITES_EACH = 40


async def _writers(node: Node) -> list[int]:
    async def writer(w: int) -> list[int]:
        revisions = []
        for i in range(WRITES_EACH):
            if i % 5 == 4:
                revisions.append((await node.delete(f"w{w}-{i - 1}"))[1])
            else:
                revisions.append(await node.set(f"w{w}-{i}", f"{w}:{i}".encode()))
        return revisions

    results = await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    return [revision for revisions in results for revision in revisions]


async def _consume(node: Node, subscription: Subscription, until: int) -> list[Committed]:
    """Collect entries up to `until`, checking the watermark as each batch arrives."""
    got: list[Committed] = []
    while not got or got[-1].revision < until:
        batch = await subscription.get()
        for item in batch:
            # Never ahead of durability: the WAL has made this revision durable already.
            assert item.revision <= node.wal.durable_revision
        got.extend(batch)
    return got


@pytest.mark.parametrize("policy", ["always", "everysec", "no"])
def test_every_revision_once_in_order_and_durable(tmp_path: Path, policy: str) -> None:
    async def scenario() -> None:
        node = open_node(tmp_path, fsync=policy, wal_segment_bytes=8192)
        node.start()
        await node.set("first", b"x")
        with node.feed.subscribe() as subscription:
            assert subscription.start == 1
            total = 1 + WRITERS * WRITES_EACH
            consumer = asyncio.create_task(_consume(node, subscription, total))
            revisions = await _writers(node)
            got = await asyncio.wait_for(consumer, timeout=30)
        assert sorted(revisions) == list(range(2, total + 1))
        assert [item.revision for item in got] == list(range(2, total + 1))
        for item in got:
            # The record bytes are the WAL record of exactly this entry.
            assert next(iter(record.scan(item.record)))[1] == item.entry.SerializeToString()
            stored = node.store.get(item.entry.key)
            if item.entry.operation == LogEntry.OPERATION_SET and stored is not None:
                assert stored[1] >= item.revision
        await node.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("policy", ["always", "no"])
def test_an_overflowing_subscriber_resumes_from_the_backlog(tmp_path: Path, policy: str) -> None:
    """Cut with its last revision, the consumer reads the rest from disk and joins
    a new subscription: together exactly every revision, once."""

    async def scenario() -> None:
        node = open_node(tmp_path, fsync=policy, wal_segment_bytes=4096)
        node.start()
        slow = node.feed.subscribe(max_entries=50)
        total = WRITERS * WRITES_EACH
        writes = asyncio.create_task(_writers(node))
        got: list[Committed] = []
        cut: FeedOverflow | None = None
        try:
            got += await slow.get(max_entries=10)  # then it stops reading for a while
            await writes
            while True:
                got += await slow.get()
        except FeedOverflow as overflow:
            cut = overflow
        await writes
        assert cut is not None
        last = cut.last_revision
        assert last == (got[-1].revision if got else 0)
        # Resume: subscribe first, then fill the gap from the WAL up to where it starts.
        live = node.feed.subscribe()
        more = asyncio.create_task(_writers_small(node, 30))
        with BacklogReader(node.wal.dir, last) as reader:
            while batch := reader.read(live.start):
                got += batch
        assert got[-1].revision == live.start
        await more
        got += await _consume(node, live, total + 30)
        assert [item.revision for item in got] == list(range(1, total + 31))
        await node.close()
        with pytest.raises(ShuttingDown):
            await live.get()

    asyncio.run(scenario())


async def _writers_small(node: Node, count: int) -> None:
    for i in range(count):
        await node.set(f"late{i}", b"l")


def test_a_refused_write_is_never_published(tmp_path: Path) -> None:
    """A write the WAL refuses (fail-stop) never reaches a subscriber."""

    async def scenario() -> None:
        node = open_node(tmp_path, fsync="no")
        node.start()
        subscription = node.feed.subscribe()
        await node.set("a", b"1")
        node.wal._fail("test: disk gone")
        with pytest.raises(Exception, match="disk gone"):
            await node.set("b", b"2")
        assert [item.entry.key for item in subscription.get_nowait()] == ["a"]
        assert node.feed._staged == type(node.feed._staged)()
        await node.close()

    asyncio.run(scenario())
