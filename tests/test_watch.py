"""Watch without a server: log entries to events, target matching, batching, buffers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kvservice import values
from kvservice.config import Settings
from kvservice.errors import InvalidArgument, WatchTooSlow
from kvservice.feed import CommitFeed
from kvservice.storage import record
from kvservice.v1.kv_pb2 import Event, WatchRequest, WatchResponse
from kvservice.v1.log_pb2 import LogEntry
from kvservice.watch import (
    Chunk,
    Targets,
    Watcher,
    WatchHub,
    WatchLimits,
    _live_messages,
    event_bytes,
    events_of,
    progress_chunk,
    target_of,
)

E = Event
LIMITS = WatchLimits(
    max_streams=10, buffer_events=10, buffer_bytes=1 << 20, batch_events=3, batch_bytes=1 << 20,
    progress_seconds=5, stall_seconds=10, max_key_bytes=16,
)  # fmt: skip


def test_set_becomes_a_set_event_with_value_and_expiry() -> None:
    entry = LogEntry(
        revision=7, operation=LogEntry.OPERATION_SET, key="k", value=b"v", expires_at_ms=123
    )
    assert events_of(entry) == [
        E(type=E.EVENT_TYPE_SET, key="k", value=b"v", revision=7, expires_at_ms=123)
    ]


def test_touch_becomes_a_touch_event_with_expiry_and_no_value() -> None:
    entry = LogEntry(revision=3, operation=LogEntry.OPERATION_TOUCH, key="k", expires_at_ms=99)
    assert events_of(entry) == [E(type=E.EVENT_TYPE_TOUCH, key="k", revision=3, expires_at_ms=99)]


def test_expired_delete_is_an_expire_event_and_a_plain_delete_a_delete() -> None:
    expired = LogEntry(revision=4, operation=LogEntry.OPERATION_DELETE, key="k", expired=True)
    deleted = LogEntry(revision=5, operation=LogEntry.OPERATION_DELETE, key="k")
    assert events_of(expired) == [E(type=E.EVENT_TYPE_EXPIRE, key="k", revision=4)]
    assert events_of(deleted) == [E(type=E.EVENT_TYPE_DELETE, key="k", revision=5)]


def test_batch_events_all_carry_the_batch_revision_in_order() -> None:
    batch = LogEntry(
        revision=9,
        operation=LogEntry.OPERATION_BATCH,
        entries=[
            LogEntry(operation=LogEntry.OPERATION_SET, key="a", value=b"1"),
            LogEntry(operation=LogEntry.OPERATION_DELETE, key="b"),
            LogEntry(operation=LogEntry.OPERATION_TOUCH, key="c", expires_at_ms=5),
            LogEntry(operation=LogEntry.OPERATION_DELETE, key="d", expired=True),
        ],
    )
    assert events_of(batch) == [
        E(type=E.EVENT_TYPE_SET, key="a", value=b"1", revision=9),
        E(type=E.EVENT_TYPE_DELETE, key="b", revision=9),
        E(type=E.EVENT_TYPE_TOUCH, key="c", revision=9, expires_at_ms=5),
        E(type=E.EVENT_TYPE_EXPIRE, key="d", revision=9),
    ]


def test_a_compressed_value_is_delivered_as_the_client_wrote_it() -> None:
    raw = b'{"text":"hello hello hello hello hello hello hello hello"}' * 20
    frame = values.compress(raw, 1)
    assert frame is not None
    entry = LogEntry(
        revision=1, operation=LogEntry.OPERATION_SET, key="k", value=frame,
        value_encoding=LogEntry.VALUE_ENCODING_ZSTD,
    )  # fmt: skip
    assert [event.value for event in events_of(entry)] == [raw]


def test_unknown_operations_are_skipped() -> None:
    assert events_of(LogEntry(revision=1, key="k")) == []


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (WatchRequest(), "set one of key or prefix"),
        (WatchRequest(key=""), "key must not be empty"),
        (WatchRequest(key="x" * 17), "limit is 16"),
        (WatchRequest(prefix="é" * 9), "limit is 16"),
    ],
)
def test_bad_targets_are_invalid_arguments(request_: WatchRequest, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        target_of(request_, max_key_bytes=16)


def test_an_empty_prefix_watches_every_key() -> None:
    target = target_of(WatchRequest(prefix=""), max_key_bytes=16)
    assert target.is_prefix
    assert target.matches("anything")


def _watcher(request: WatchRequest) -> Watcher:
    return Watcher(target_of(request, 16), 1, LIMITS)


@pytest.mark.parametrize("many_prefixes", [False, True])
def test_targets_find_exact_keys_and_every_matching_prefix(many_prefixes: bool) -> None:
    targets = Targets()
    watchers = {
        name: _watcher(request)
        for name, request in {
            "key": WatchRequest(key="room:1"),
            "key-keys-only": WatchRequest(key="room:1", keys_only=True),
            "room": WatchRequest(prefix="room:"),
            "room-again": WatchRequest(prefix="room:"),
            "room1": WatchRequest(prefix="room:1"),
            "all": WatchRequest(prefix=""),
            "user": WatchRequest(prefix="user:"),
        }.items()
    }
    if many_prefixes:  # more distinct prefixes than lengths: the lookup by length
        for i in range(10):
            targets.add(_watcher(WatchRequest(prefix=f"zz{i}")))
    for watcher in watchers.values():
        targets.add(watcher)
    found = {w for group in targets.matching("room:1") for w in group.watchers}
    names = {name for name, w in watchers.items() if w in found}
    assert names == {"key", "key-keys-only", "room", "room-again", "room1", "all"}
    targets.remove(watchers["room"])
    targets.remove(watchers["room-again"])
    targets.remove(watchers["all"])
    found = {w for group in targets.matching("room:2") for w in group.watchers}
    assert found == set()
    # Streams with one target share one group.
    assert len([g for g in targets.groups.values() if g.target.text == "room:1"]) == 3


def _chunk(*revisions: int, last: int | None = None) -> Chunk:
    events = [E(type=E.EVENT_TYPE_DELETE, key="k", revision=r) for r in revisions]
    return Chunk(events, last or revisions[-1], sum(map(event_bytes, events)))


def test_queued_chunks_merge_into_few_messages_within_the_batch_limit() -> None:
    chunks = [_chunk(1), _chunk(2, 2), _chunk(3, last=5), progress_chunk(6), _chunk(7)]
    out = list(_live_messages(chunks, 1, LIMITS))
    assert [([e.revision for e in m.events], m.progress_revision, upto) for m, upto in out] == [
        ([1, 2, 2], 0, 2),  # one more event would pass batch_events=3
        ([3], 0, 5),  # covers revisions 4 and 5 too (nothing matched there)
        ([], 6, 6),
        ([7], 0, 7),
    ]


def test_a_single_chunk_is_sent_as_its_shared_message() -> None:
    chunk = _chunk(4)
    [(message, _)] = list(_live_messages([chunk], 1, LIMITS))
    assert message is chunk.message()


def test_events_before_a_future_start_are_left_out() -> None:
    out = list(_live_messages([_chunk(3, 4), _chunk(5)], 5, LIMITS))
    assert [[e.revision for e in m.events] for m, _ in out] == [[5]]


def test_a_full_buffer_ends_the_stream_naming_the_last_revision_delivered() -> None:
    watcher = _watcher(WatchRequest(prefix=""))
    watcher.delivered = 41
    for revision in range(42, 52):
        watcher.offer(_chunk(revision))
    watcher.offer(_chunk(52))  # the 11th event: over buffer_events=10
    with pytest.raises(WatchTooSlow, match=r"up to revision 41 was delivered.*from revision 42"):
        asyncio.run(watcher.take())


def test_the_dispatcher_keeps_a_batch_in_one_message_past_the_batch_limit() -> None:
    """Live delivery through a real commit feed: a Txn's 3 events stay together even with
    watch_batch_max_events=2, each with the batch's revision; keys_only drops values."""

    async def run() -> tuple[list[WatchResponse], list[WatchResponse]]:
        feed = CommitFeed(0)
        settings = Settings.model_validate({"watch_batch_max_events": 2})
        hub = WatchHub(SimpleNamespace(feed=feed), settings)  # type: ignore[arg-type]
        full = hub.stream(WatchRequest(prefix="t:"))
        keys = hub.stream(WatchRequest(prefix="t:", keys_only=True))
        first = [await anext(full), await anext(keys)]
        entries = [
            LogEntry(revision=1, operation=LogEntry.OPERATION_BATCH, entries=[
                LogEntry(operation=LogEntry.OPERATION_SET, key=f"t:{i}", value=b"v")
                for i in range(3)
            ]),
            LogEntry(revision=2, operation=LogEntry.OPERATION_SET, key="other", value=b"v"),
            LogEntry(revision=3, operation=LogEntry.OPERATION_DELETE, key="t:0", expired=True),
        ]  # fmt: skip
        for entry in entries:
            feed.stage(entry, record.encode(entry.SerializeToString()))
        feed.advance(3)
        got = [await anext(full), await anext(full), await anext(keys)]
        await full.aclose()
        await keys.aclose()
        return first, got

    first, (batch, expire, keys_batch) = asyncio.run(run())
    assert first == [WatchResponse(progress_revision=0)] * 2
    assert [(e.key, e.value, e.revision) for e in batch.events] == [
        ("t:0", b"v", 1), ("t:1", b"v", 1), ("t:2", b"v", 1),
    ]  # fmt: skip
    assert [(e.type, e.key, e.revision) for e in expire.events] == [(E.EVENT_TYPE_EXPIRE, "t:0", 3)]
    assert [(e.key, e.value) for e in keys_batch.events] == [
        ("t:0", b""),
        ("t:1", b""),
        ("t:2", b""),
    ]
