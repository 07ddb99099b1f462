"""A replica applies its primary's records exactly once, in order, in one history."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvservice.config import Settings
from kvservice.errors import NotPrimary
from kvservice.feed import Committed
from kvservice.metrics import Metrics
from kvservice.replication.manager import ReplicationManager
from kvservice.server import build_replication
from kvservice.storage.recovery import recover
from kvservice.v1.replication_pb2 import PrimaryInfo, PushRequest, PushResult
from tests.nodes import open_node

OK = PushResult.PUSH_RESULT_OK
MISMATCH = PushResult.PUSH_RESULT_POSITION_MISMATCH
OTHER_HISTORY = PushResult.PUSH_RESULT_HISTORY_MISMATCH
REFUSED = PushResult.PUSH_RESULT_REFUSED


def info(replication_id: str = "history-a", epoch: int = 0, durable: int = 1000) -> PrimaryInfo:
    return PrimaryInfo(
        url="http://primary", replication_id=replication_id, epoch=epoch, durable_revision=durable
    )


async def _records(tmp_path: Path, count: int) -> tuple[list[Committed], dict[str, object]]:
    """Write `count` entries on a primary node; return its committed records and state."""
    primary = open_node(tmp_path / "primary")
    primary.start()
    subscription = primary.feed.subscribe()
    for i in range(count):
        if i % 4 == 3:
            await primary.delete(f"k{i - 2}")
        else:
            await primary.set(f"k{i}", f"v{i}".encode())
    got = subscription.get_nowait(10_000)
    state = {key: primary.store.get(key) for key in primary.store.data}
    await primary.close()
    return got, state


async def _replica(tmp_path: Path) -> ReplicationManager:
    node = open_node(tmp_path / "replica", role="replica")
    node.start()
    settings = Settings(data_dir=tmp_path / "replica", role="replica")
    manager = build_replication(settings, node, Metrics())
    await manager.start()
    return manager


def push(manager: ReplicationManager, prev: int, items: list[Committed], **kw: object):  # type: ignore[no-untyped-def]
    assert manager.replica is not None
    request = PushRequest(
        primary=info(**kw),  # type: ignore[arg-type]
        prev_revision=prev,
        records=[c.record for c in items],
    )
    return manager.replica.push(request)


def test_exactly_once_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        committed, state = await _records(tmp_path, 40)
        manager = await _replica(tmp_path)
        node = manager.node
        first, second, third = committed[:15], committed[15:30], committed[30:]
        reply = await push(manager, 0, first)
        assert (reply.result, reply.revision, reply.durable_revision) == (OK, 15, 15)
        # The same batch again (a replayed request): answered with the position, not applied.
        reply = await push(manager, 0, first)
        assert (reply.result, reply.revision) == (MISMATCH, 15)
        # A later batch before the one it follows (reordered): refused the same way.
        reply = await push(manager, 30, third)
        assert (reply.result, reply.revision) == (MISMATCH, 15)
        assert node.store.revision == 15
        assert (await push(manager, 15, second)).result == OK
        assert (await push(manager, 30, third)).result == OK
        assert {key: node.store.get(key) for key in node.store.data} == state
        assert manager.state.replication_id == "history-a"  # adopted, persisted
        with pytest.raises(NotPrimary, match="http://primary"):
            await node.set("x", b"y")
        await manager.close()
        await node.close()

    asyncio.run(scenario())
    # The replica's own WAL holds the primary's revisions, consecutive, once each.
    result = recover(tmp_path / "replica")
    assert result.store.revision == 40


def test_another_history_or_a_lower_epoch_is_not_applied(tmp_path: Path) -> None:
    async def scenario() -> None:
        committed, _ = await _records(tmp_path, 10)
        manager = await _replica(tmp_path)
        assert (await push(manager, 0, committed[:5], epoch=3)).result == OK
        # Same revisions, another history at the same epoch (an empty or unrelated
        # primary): never mixed in, and the replica's data is not given up either.
        reply = await push(manager, 5, committed[5:], replication_id="history-b", epoch=3)
        assert reply.result == REFUSED
        assert "refusing" in reply.message
        # From a higher epoch (a promotion) a diverging history asks for a full resync.
        reply = await push(manager, 5, committed[5:], replication_id="history-b", epoch=4)
        assert reply.result == OTHER_HISTORY
        # A primary behind this replica in its own history is refused too.
        reply = await push(manager, 5, [], epoch=3, durable=2)
        assert reply.result == REFUSED
        assert "behind" in reply.message
        # An older primary (lower epoch) is refused outright.
        reply = await push(manager, 5, committed[5:], epoch=2)
        assert reply.result == REFUSED
        assert "epoch" in reply.message
        assert manager.node.store.revision == 5
        await manager.close()
        await manager.node.close()

    asyncio.run(scenario())


def test_a_damaged_record_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        committed, _ = await _records(tmp_path, 6)
        manager = await _replica(tmp_path)
        good = [c.record for c in committed]
        bad = bytearray(good[3])
        bad[-1] ^= 0x01
        assert manager.replica is not None
        reply = await manager.replica.push(
            PushRequest(primary=info(), prev_revision=0, records=[*good[:3], bytes(bad)])
        )
        assert reply.result == REFUSED
        assert manager.node.store.revision == 0  # not even the three good ones
        await manager.close()
        await manager.node.close()

    asyncio.run(scenario())


def test_pushes_in_flight_together_apply_once_in_order_whatever_order_they_arrive(
    tmp_path: Path,
) -> None:
    """The primary keeps several pushes in flight: one that arrives before the push it
    continues waits for it instead of being refused, a duplicate racing them is not
    applied, and each answer reports only what is durable."""

    async def scenario() -> None:
        committed, state = await _records(tmp_path, 40)
        manager = await _replica(tmp_path)
        node = manager.node
        first, second, third = committed[:15], committed[15:30], committed[30:]
        assert (await push(manager, 0, [])).result == OK  # the probe: joins the history
        # Started last-first: the third and second wait for their predecessors.
        late = asyncio.create_task(push(manager, 30, third))
        middle = asyncio.create_task(push(manager, 15, second))
        await asyncio.sleep(0.05)
        assert node.store.revision == 0
        replies = await asyncio.gather(
            push(manager, 0, first), push(manager, 0, first), middle, late
        )
        results = sorted(reply.result for reply in replies[:2])
        assert results == sorted([OK, MISMATCH])  # the duplicate: answered, not applied
        assert [(r.result, r.revision) for r in replies[2:]] == [(OK, 30), (OK, 40)]
        for reply in replies:
            if reply.result == OK:
                assert reply.durable_revision >= reply.revision
        assert node.wal.durable_revision == 40
        assert {key: node.store.get(key) for key in node.store.data} == state
        await manager.close()
        await node.close()

    asyncio.run(scenario())
    assert recover(tmp_path / "replica").store.revision == 40
