"""A node holding entries past the fork point of a promotion saves them to diverged/,
rewinds to the fork point and continues the new history from there (a partial
resync); when it cannot rewind it asks for a full resync and says why."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvservice.config import Settings
from kvservice.engine import SET, Store
from kvservice.errors import CannotRewind
from kvservice.metrics import Metrics
from kvservice.replication import replica
from kvservice.replication.manager import ReplicationManager
from kvservice.server import build_replication
from kvservice.storage import record
from kvservice.storage.recovery import recover
from kvservice.storage.rewind import DIVERGED_DIR
from kvservice.v1.log_pb2 import LogEntry
from kvservice.v1.replication_pb2 import PrimaryInfo, PushRequest, PushResponse, PushResult
from tests.nodes import open_node

OLD = PrimaryInfo(url="http://primary", replication_id="history-a", epoch=0, durable_revision=10)
# R1, promoted when it had revision 6 of history-a.
NEW = PrimaryInfo(
    url="http://primary", replication_id="history-b", epoch=1, durable_revision=1000,
    prev_replication_id="history-a", prev_end_revision=6,
)  # fmt: skip
FORK = 6


def entry_records(history: str, first: int, last: int) -> list[bytes]:
    return [
        record.encode(
            LogEntry(revision=r, operation=SET, key=f"{history}{r}", value=b"v").SerializeToString()
        )
        for r in range(first, last + 1)
    ]


async def replica_at_10(tmp_path: Path) -> ReplicationManager:
    """A replica that applied revisions 1..10 of history-a."""
    data_dir = tmp_path / "node"
    node = open_node(data_dir, role="replica")
    node.start()
    manager = build_replication(Settings(data_dir=data_dir, role="replica"), node, Metrics())
    await manager.start()
    reply = await push(manager, OLD, 0, entry_records("a", 1, 10))
    assert (reply.result, reply.revision) == (PushResult.PUSH_RESULT_OK, 10)
    return manager


async def push(
    manager: ReplicationManager, primary: PrimaryInfo, prev: int, records: list[bytes]
) -> PushResponse:
    assert manager.replica is not None
    return await manager.replica.push(
        PushRequest(primary=primary, prev_revision=prev, records=records)
    )


def diverged_revisions(data_dir: Path) -> list[list[int]]:
    files = sorted((data_dir / DIVERGED_DIR).iterdir())
    return [
        [LogEntry.FromString(p).revision for _, p in record.scan(f.read_bytes(), str(f))]
        for f in files
    ]


def test_rewinds_to_the_fork_point_and_continues_the_new_history(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager = await replica_at_10(tmp_path)
        # The new primary's probe: the node rewinds and answers with the fork point,
        # still in the old history (a prefix of the new one).
        reply = await push(manager, NEW, 0, [])
        assert (reply.result, reply.revision) == (PushResult.PUSH_RESULT_POSITION_MISMATCH, FORK)
        assert reply.replication_id == "history-a"
        expected = Store()
        for raw in entry_records("a", 1, FORK):
            [(_, payload)] = record.scan(raw, "test")
            expected.apply(LogEntry.FromString(payload))
        assert manager.node.store.data == expected.data
        assert manager.node.store.digest == expected.digest
        # The new history's entries continue from it.
        reply = await push(manager, NEW, FORK, entry_records("b", FORK + 1, 8))
        assert (reply.result, reply.revision) == (PushResult.PUSH_RESULT_OK, 8)
        assert manager.state.replication_id == "history-b"
        await manager.close()
        await manager.node.close()

    asyncio.run(scenario())
    data_dir = tmp_path / "node"
    assert diverged_revisions(data_dir) == [[7, 8, 9, 10]]
    store = recover(data_dir).store
    assert store.revision == 8
    assert sorted(store.data) == [*(f"a{r}" for r in range(1, FORK + 1)), "b7", "b8"]


def test_a_node_that_cannot_rewind_asks_for_a_full_resync_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def compacted(data_dir: Path, revision: int) -> object:
        raise CannotRewind(f"revisions after 0 are compacted (wanted {revision})")

    monkeypatch.setattr(replica, "state_at", compacted)

    async def scenario() -> None:
        manager = await replica_at_10(tmp_path)
        for _ in range(2):  # asked again: the same answer, nothing saved twice
            reply = await push(manager, NEW, 0, [])
            assert reply.result == PushResult.PUSH_RESULT_HISTORY_MISMATCH
            assert "cannot rewind to the fork point at revision 6" in reply.message
            assert "compacted" in reply.message
        assert manager.node.store.revision == 10  # untouched until the full resync
        await manager.close()
        await manager.node.close()

    asyncio.run(scenario())
    data_dir = tmp_path / "node"
    assert diverged_revisions(data_dir) == [[7, 8, 9, 10]]
    assert not (data_dir / "resync").exists()
    assert recover(data_dir).store.revision == 10
