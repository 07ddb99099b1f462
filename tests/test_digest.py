"""The state digest: O(1) updates always equal a full recomputation; it survives
snapshots and restarts; it tells equal states from different ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kvservice.digests import bucket_digests
from kvservice.engine import Store, digest_of
from kvservice.storage.recovery import recover
from tests.nodes import open_node

keys = st.sampled_from(["a", "b", "c", "dé", "e" * 30])
ops = st.lists(st.tuples(st.booleans(), keys, st.binary(max_size=20)), max_size=60)


@given(ops)
def test_incremental_digest_equals_a_full_pass(operations: list[tuple[bool, str, bytes]]) -> None:
    store = Store()
    for is_set, key, value in operations:
        entry = store.next_set(key, value) if is_set else store.next_delete(key)
        store.apply(entry)
        assert store.digest == digest_of(store.data.items())
    buckets = bucket_digests(store.data, 16, set())
    folded = 0
    for part in buckets.digests:
        folded ^= part
    assert folded == store.digest


def test_same_state_same_digest_whatever_the_order() -> None:
    first, second = Store(), Store()
    first.load({"x": b"\0" * 7 + b"\x01v", "y": b"\0" * 7 + b"\x02w"}, 2)
    second.load({"y": b"\0" * 7 + b"\x02w", "x": b"\0" * 7 + b"\x01v"}, 2)
    assert first.digest == second.digest != 0
    third = Store()
    third.load({"x": b"\0" * 7 + b"\x01v", "y": b"\0" * 7 + b"\x02W"}, 2)
    assert third.digest != first.digest


@settings(max_examples=5, deadline=None)
@given(ops)
def test_digest_survives_snapshot_and_replay(
    tmp_path_factory, operations: list[tuple[bool, str, bytes]]
) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path_factory.mktemp("d")

    async def scenario() -> int:
        node = open_node(data_dir)
        node.start()
        for i, (is_set, key, value) in enumerate(operations):
            if is_set:
                await node.set(key, value)
            else:
                await node.delete(key)
            if i == len(operations) // 2:
                await node.snapshot()
        digest = node.store.digest
        await node.close()
        return digest

    digest = asyncio.run(scenario())
    recovered = recover(data_dir).store  # snapshot's stored digest + WAL replay
    assert recovered.digest == digest == digest_of(recovered.data.items())


def test_digest_of_an_empty_store_is_zero(tmp_path: Path) -> None:
    assert recover(tmp_path).store.digest == 0
