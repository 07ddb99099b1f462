"""Watch against real server processes: backlog, live, limits, replicas, shutdown, wire formats."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.storage.segments import data_dirs, list_segments, segment_revision
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import SnapshotRequest
from kvservice.v1.kv_connect import KVStoreClient, KVStoreClientSync
from kvservice.v1.kv_pb2 import (
    DeleteRequest,
    Event,
    IncrementRequest,
    Op,
    SetRequest,
    TouchRequest,
    TxnRequest,
    WatchRequest,
    WatchResponse,
)
from tests.securitykit import AUDIENCE, ISSUER, JwtKeys

from .cluster import Cluster
from .conftest import ServerProcess, run_cli, wait_for
from .watching import (
    RawStream,
    as_tuples,
    expected_events,
    raw_watch,
    until_live,
    wal_entries,
)

MakeServer = Callable[..., ServerProcess]


def _write_mix(kv: KVStoreClientSync, count: int, value_bytes: int = 100) -> list[int]:
    """Sets and Deletes over a few keys under a:, b: and c; returns their revisions."""
    revisions = []
    for i in range(count):
        key = f"{'ab'[i % 2]}:{i % 7}" if i % 5 else "c"
        if i % 11 == 10:
            reply = kv.delete(DeleteRequest(key=key))
            if reply.deleted:
                revisions.append(reply.revision)
        else:
            value = bytes([i % 256]) * value_bytes
            revisions.append(kv.set(SetRequest(key=key, value=value)).revision)
    return revisions


def test_from_every_start_revision_of_a_multi_segment_log_events_equal_the_wal(
    make_server: MakeServer,
) -> None:
    """Backlog events, from each start revision, are the WAL's entries filtered by target."""
    server = make_server("--wal-segment-bytes", "4096").start()
    with server.client() as kv:
        _write_mix(kv, 200)
    entries = wal_entries(server.data_dir)
    last = entries[-1].revision
    assert len(list_segments(data_dirs(server.data_dir)[0])) >= 4
    for start in range(1, last + 2):
        events, live_at = until_live(server, WatchRequest(prefix="a:", start_revision=start))
        assert as_tuples(events) == expected_events(entries, start, prefix="a:"), start
        assert live_at == last
    for start in range(1, last + 2, 17):
        events, _ = until_live(server, WatchRequest(key="b:3", start_revision=start))
        assert as_tuples(events) == expected_events(entries, start, key="b:3")
        events, _ = until_live(server, WatchRequest(prefix="", start_revision=start))
        assert as_tuples(events) == expected_events(entries, start, prefix="")
    events, _ = until_live(server, WatchRequest(prefix="a:", start_revision=1, keys_only=True))
    assert [(e.key, e.value, e.revision) for e in events] == [
        (key, b"", revision) for _, key, _, revision in expected_events(entries, 1, prefix="a:")
    ]


class Collector:
    """A watch read on a thread until it has seen `stop_at` (set later)."""

    def __init__(self, server: ServerProcess, request: WatchRequest) -> None:
        self.server = server
        self.request = request
        self.events: list[Event] = []
        self.progress: list[int] = []
        self.live = threading.Event()
        self.stop_at: int | None = None
        self.error: ConnectError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with KVStoreClientSync(self.server.url, proto_json=False, timeout_ms=60_000) as kv:
            try:
                for response in kv.watch(self.request):
                    self.events.extend(response.events)
                    if not response.events:
                        self.progress.append(response.progress_revision)
                        self.live.set()
                    seen = max([self.progress[-1] if self.progress else 0]
                               + [e.revision for e in response.events])  # fmt: skip
                    if self.stop_at is not None and seen >= self.stop_at:
                        return
            except ConnectError as exc:
                self.error = exc
                self.live.set()

    def finish(self, stop_at: int, timeout: float = 30) -> None:
        self.stop_at = stop_at
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"no revision {stop_at} within {timeout} s"


def test_live_events_during_concurrent_writes_arrive_exactly_once_in_order(
    make_server: MakeServer,
) -> None:
    """Watchers from now and from the backlog (joining mid-load) see every write once, in order."""
    server = make_server("--watch-progress-seconds", "0.2", "--wal-segment-bytes", "8192").start()
    live = [Collector(server, WatchRequest(prefix="live:")) for _ in range(3)]
    for collector in live:
        assert collector.live.wait(10)
    written: list[int] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        with server.client() as kv:
            for i in range(150):
                key = f"live:{n}:{i % 10}" if i % 4 else f"other:{n}"
                revision = kv.set(SetRequest(key=key, value=b"v" * 50)).revision
                if key.startswith("live:"):
                    with lock:
                        written.append(revision)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in writers:
        thread.start()
    while len(written) < 150:  # then a watcher joins from the backlog, mid-load
        time.sleep(0.01)
    with lock:
        seam_start = sorted(written)[50]
    late = Collector(server, WatchRequest(prefix="live:", start_revision=seam_start))
    for thread in writers:
        thread.join(60)
    last = max(written)
    for collector in [*live, late]:
        collector.finish(last)
        assert collector.error is None
    for collector in live:
        assert [e.revision for e in collector.events] == sorted(written)
    assert [e.revision for e in late.events] == [r for r in sorted(written) if r >= seam_start]


def test_a_quiet_stream_gets_progress_messages_with_the_current_revision(
    make_server: MakeServer,
) -> None:
    """Nothing matches, yet every watch_progress_seconds a message says how fresh it is."""
    server = make_server("--watch-progress-seconds", "0.2").start()
    with raw_watch(server, {"prefix": "quiet:"}) as stream:
        assert stream.next() == WatchResponse(progress_revision=0)
        with server.client() as kv:
            kv.set(SetRequest(key="elsewhere", value=b"1"))
        while (message := stream.next()) != WatchResponse(progress_revision=1):
            assert message == WatchResponse(progress_revision=0)  # a tick before the Set
        started = time.monotonic()
        progress = [stream.next() for _ in range(3)]
        elapsed = time.monotonic() - started
    assert progress == [WatchResponse(progress_revision=1)] * 3
    assert elapsed < 2


def test_a_start_below_the_oldest_revision_held_is_out_of_range_naming_it(
    make_server: MakeServer,
) -> None:
    """After snapshots purged the first segments, start_revision 1 is out_of_range."""
    server = make_server(
        "--wal-segment-bytes", "4096", "--snapshot-threshold-bytes", "4096",
        "--repl-backlog-bytes", "4096",
    ).start()  # fmt: skip
    with server.client() as kv, AdminClientSync(server.url) as admin:
        _write_mix(kv, 300)
        admin.snapshot(SnapshotRequest())
        _write_mix(kv, 100)
        admin.snapshot(SnapshotRequest())
    oldest = segment_revision(list_segments(data_dirs(server.data_dir)[0])[0])
    assert oldest > 1
    with pytest.raises(ConnectError) as caught:
        until_live(server, WatchRequest(prefix="a:", start_revision=oldest - 1))
    assert caught.value.code == Code.OUT_OF_RANGE
    assert f"the oldest revision still in the WAL is {oldest}" in caught.value.message
    events, _ = until_live(server, WatchRequest(prefix="a:", start_revision=oldest))
    assert as_tuples(events) == expected_events(wal_entries(server.data_dir), oldest, prefix="a:")


def test_a_stream_reading_the_backlog_keeps_the_segments_it_needs_from_snapshots(
    make_server: MakeServer,
) -> None:
    """Snapshots purge the WAL behind them, but not the segments a stream still reads."""
    server = make_server(
        "--fsync", "no", "--wal-segment-bytes", str(1 << 20), "--repl-backlog-bytes", "4096",
    ).start()  # fmt: skip
    with server.client() as kv:
        revisions = [kv.set(SetRequest(key=f"k:{i}", value=b"x" * 60_000)).revision
                     for i in range(300)]  # fmt: skip
    with raw_watch(server, WatchRequest(prefix="k:", start_revision=1)) as stream:
        first = stream.next()  # the stream is now blocked mid-backlog: we do not read
        assert first is not None
        time.sleep(0.5)
        with AdminClientSync(server.url) as admin:
            admin.snapshot(SnapshotRequest())
            with server.client() as kv:
                kv.set(SetRequest(key="other", value=b"1"))
            admin.snapshot(SnapshotRequest())
        oldest = segment_revision(list_segments(data_dirs(server.data_dir)[0])[0])
        assert oldest > first.events[-1].revision + 1  # segments were purged...
        received = [e.revision for e in first.events]
        while len(received) < len(revisions):
            message = stream.next()
            assert message is not None, stream.end  # ...but not those the stream needed
            received.extend(e.revision for e in message.events)
    assert received == revisions


def test_a_slow_consumer_is_cut_naming_its_last_revision_and_resumes_without_gap(
    make_server: MakeServer,
) -> None:
    """A client that stops reading is ended with resource_exhausted; it resumes from there."""
    server = make_server(
        "--fsync", "no", "--watch-buffer-events", "10", "--watch-buffer-bytes", "65536",
    ).start()  # fmt: skip
    value = b"x" * 60_000
    with raw_watch(server, WatchRequest(prefix="big:", start_revision=1)) as stream:
        first = stream.next()
        assert first is not None
        assert first.progress_revision == 0
        # Not reading: socket buffers fill, then the stream's own buffer.
        with server.client() as kv:
            revisions = [kv.set(SetRequest(key=f"big:{i}", value=value)).revision
                         for i in range(300)]  # fmt: skip
        received = []
        while (message := stream.next()) is not None:
            received.extend(e.revision for e in message.events)
        assert stream.error_code() == "resource_exhausted", stream.end
    assert received == revisions[: len(received)]  # in order, no gap, then cut
    assert len(received) < len(revisions)
    last = received[-1]
    assert f"every change up to revision {last} was delivered" in stream.error_message()
    assert f"watch again from revision {last + 1}" in stream.error_message()
    events, _ = until_live(server, WatchRequest(prefix="big:", start_revision=last + 1))
    assert received + [e.revision for e in events] == revisions
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert "\nkvservice_watch_too_slow_total 1.0\n" in metrics
    assert "\nkvservice_watch_streams " in metrics


def test_a_stalled_client_is_cut_and_frees_its_slot(make_server: MakeServer) -> None:
    """Cut for being slow and still reading nothing: its request is cancelled after
    watch_stall_seconds, so a client that went away cannot hold a stream slot."""
    server = make_server(
        "--fsync", "no", "--watch-buffer-events", "10", "--watch-buffer-bytes", "65536",
        "--watch-stall-seconds", "0.5", "--watch-max-streams", "1",
    ).start()  # fmt: skip
    with raw_watch(server, WatchRequest(prefix="big:")) as stream:
        assert stream.next() is not None
        with server.client() as kv:
            for i in range(300):
                kv.set(SetRequest(key=f"big:{i}", value=b"x" * 60_000))
        time.sleep(4)  # the stall cut (0.5 s, then a second cancel 1 s later) meanwhile
        with pytest.raises(httpx.HTTPError):  # the stream breaks off: no end message
            _read_to_the_end(stream)
    _, live_at = until_live(server, WatchRequest(prefix="big:"))
    assert live_at == 300  # the slot is free again


def _read_to_the_end(stream: RawStream) -> None:
    while stream.next() is not None:
        pass


def test_a_thousand_streams_on_one_node_all_receive_every_event(make_server: MakeServer) -> None:
    """1,000 concurrent watch streams, one prefix: each gets all 50 events, in order."""
    server = make_server("--fsync", "no").start()
    streams, writes = 1000, 50

    async def run() -> list[list[int]]:
        live = 0
        all_live = asyncio.Event()
        async with KVStoreClient(server.url, proto_json=False, timeout_ms=120_000) as kv:

            async def watch() -> list[int]:
                nonlocal live
                seen: list[int] = []
                async for response in kv.watch(WatchRequest(prefix="fan:")):
                    if not response.events and not seen and response.progress_revision == 0:
                        live += 1
                        if live == streams:
                            all_live.set()
                    seen.extend(e.revision for e in response.events)
                    if len(seen) >= writes:
                        return seen
                return seen

            tasks = [asyncio.create_task(watch()) for _ in range(streams)]
            await asyncio.wait_for(all_live.wait(), 60)
            for i in range(writes):
                await kv.set(SetRequest(key=f"fan:{i}", value=b"%d" % i))
            return await asyncio.wait_for(asyncio.gather(*tasks), 90)

    started = time.monotonic()
    results = asyncio.run(run())
    assert all(seen == list(range(1, writes + 1)) for seen in results)
    assert time.monotonic() - started < 120


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def test_watch_on_a_replica_from_its_backlog_then_live(cluster: Cluster) -> None:
    """A replica serves Watch: its backlog, then the primary's writes as it applies them."""
    primary, [replica] = cluster.primary_with_replicas(1)
    with primary.client() as kv:
        before = [kv.set(SetRequest(key=f"r:{i}", value=b"1")).revision for i in range(20)]
    collector = Collector(replica.server, WatchRequest(prefix="r:", start_revision=1))
    assert collector.live.wait(20)
    with primary.client() as kv:
        after = [kv.set(SetRequest(key=f"r:{i}", value=b"2")).revision for i in range(20)]
    collector.finish(after[-1])
    assert collector.error is None
    assert [(e.key, e.revision) for e in collector.events] == [
        (f"r:{i % 20}", revision) for i, revision in enumerate(before + after)
    ]


def test_a_full_resync_on_a_replica_ends_its_streams_naming_where_to_resume(
    cluster: Cluster,
) -> None:
    """The replica's store is replaced (replicaof --force onto another history): its
    streams end with unavailable saying so, rather than mixing two histories."""
    a, [replica] = cluster.primary_with_replicas(1)
    b = cluster.add_primary("b")
    with a.client() as kv:
        for i in range(5):
            kv.set(SetRequest(key=f"h:{i}", value=b"a"))
    with b.client() as kv:
        for i in range(30):
            kv.set(SetRequest(key=f"h:{i}", value=b"b"))
    wait_for("the replica to apply A's writes", lambda: replica.status().revision == 5)
    collector = Collector(replica.server, WatchRequest(prefix="h:"))
    assert collector.live.wait(10)
    done = run_cli("replicaof", "--url", replica.url, "--primary", b.url, "--force")
    assert done.returncode == 0, done.stderr
    collector.thread.join(30)
    error = collector.error
    assert error is not None
    assert error.code == Code.UNAVAILABLE
    assert "replaced by a full resync" in error.message
    assert "every change up to revision 5 was delivered" in error.message
    # Watching the replica again works, on B's history.
    wait_for("the replica to follow B", lambda: replica.status().revision == 30)
    _, live_at = until_live(replica.server, WatchRequest(prefix="h:"))
    assert live_at == 30


def test_shutdown_ends_open_streams_promptly_naming_the_last_revision(
    make_server: MakeServer,
) -> None:
    """SIGTERM: every stream ends with unavailable and where to resume; the node exits at once."""
    server = make_server("--shutdown-timeout-seconds", "20").start()
    with server.client() as kv:
        kv.set(SetRequest(key="s:1", value=b"1"))
    collectors = [Collector(server, WatchRequest(prefix="s:")) for _ in range(3)]
    for collector in collectors:
        assert collector.live.wait(10)
    started = time.monotonic()
    assert server.stop(timeout=15) == 0
    assert time.monotonic() - started < 5  # not the 20 s drain timeout
    for collector in collectors:
        collector.thread.join(5)
        assert collector.error is not None
        assert collector.error.code == Code.UNAVAILABLE
        assert "shutting down" in collector.error.message
        assert "every change up to revision 1 was delivered" in collector.error.message


def test_connect_json_over_plain_http_post(make_server: MakeServer) -> None:
    """The Connect streaming framing with JSON, as curl sends it; values in base64."""
    server = make_server().start()
    with raw_watch(server, {"prefix": "j:", "startRevision": "1"}) as stream:
        first = stream.next()
        assert first is not None
        assert first.progress_revision == 0
        with server.client() as kv:
            kv.set(SetRequest(key="j:1", value=b"hello"))
            kv.delete(DeleteRequest(key="j:1"))
        got: list[Event] = []
        while len(got) < 2:
            message = stream.next()
            assert message is not None
            got.extend(message.events)
    assert [(e.type, e.key, e.value, e.revision) for e in got] == [
        (Event.EVENT_TYPE_SET, "j:1", b"hello", 1),
        (Event.EVENT_TYPE_DELETE, "j:1", b"", 2),
    ]


def test_binary_protobuf_with_the_real_client(make_server: MakeServer) -> None:
    server = make_server().start()
    with server.client(proto_json=False) as kv:
        kv.set(SetRequest(key="p:1", value=b"\x00\xff"))
        responses = kv.watch(WatchRequest(key="p:1", start_revision=1))
        first: WatchResponse = next(iter(responses))
    assert [(e.key, e.value, e.revision) for e in first.events] == [("p:1", b"\x00\xff", 1)]


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ({}, "set one of key or prefix"),
        ({"key": ""}, "key must not be empty"),
        ({"key": "a", "prefix": "b"}, "oneof"),
        ({"prefix": "x" * 2000}, "limit is 1024"),
        ({"prefix": "a", "startRevision": "-1"}, "startRevision"),
        ({"prefix": 5}, "prefix"),
    ],
)
def test_bad_requests_are_invalid_argument(
    server: ServerProcess, request_: dict[str, object], reason: str
) -> None:
    with raw_watch(server, request_) as stream:
        assert stream.next() is None
    assert stream.error_code() == "invalid_argument", stream.end
    assert reason in stream.error_message()


def test_too_many_streams_is_resource_exhausted(make_server: MakeServer) -> None:
    server = make_server("--watch-max-streams", "2").start()
    with raw_watch(server, {"prefix": ""}) as one, raw_watch(server, {"prefix": ""}) as two:
        assert one.next() is not None
        assert two.next() is not None
        with raw_watch(server, {"prefix": ""}) as three:
            assert three.next() is None
    assert three.error_code() == "resource_exhausted"
    assert "setting watch_max_streams" in three.error_message()
    # The RPC metrics count a stream by the code its end-of-stream message carries
    # (the HTTP status of a stream is 200 whatever happens).
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'kvservice_rpc_requests_total{code="resource_exhausted",method="Watch"} 1.0' in metrics
    assert 'code="ok",method="Watch"' not in metrics, "no stream here ended normally"


def test_a_jwt_holder_cannot_watch_outside_its_prefix(
    make_server: MakeServer, tmp_path: Path
) -> None:
    """Confined to user:alice:, Alice watches her keys but not Bob's, nor every key."""
    keys = JwtKeys.make(tmp_path)
    server = make_server(
        "--auth", "token", "--jwt-hs256-secret-file", str(keys.secret_file),
        "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE,
    ).start()  # fmt: skip
    alice = {"authorization": f"Bearer {keys.token('alice')}"}
    with raw_watch(server, {"prefix": "user:alice:"}, alice) as own:
        assert own.next() is not None
    for outside in ({"prefix": "user:bob:"}, {"prefix": ""}, {"key": "user:bob:x"},
                    {"prefix": "user:"}):  # fmt: skip
        with raw_watch(server, outside, alice) as stream:
            assert stream.next() is None
        assert stream.error_code() == "permission_denied", outside


def _messages_until_live(server: ServerProcess, request: WatchRequest) -> list[list[Event]]:
    """The event lists of each message before the stream's first progress message."""
    messages: list[list[Event]] = []
    with server.client(proto_json=False) as kv:
        responses = kv.watch(request)
        try:
            for response in responses:
                if not response.events:
                    return messages
                messages.append(list(response.events))
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()
    raise AssertionError("the stream ended before it went live")


def test_ttl_touch_txn_and_expiry_events_from_the_data_model(make_server: MakeServer) -> None:
    """Set with a TTL, Touch, a Txn and an expiry as a watcher sees them: SET with its
    expiry, TOUCH, the Txn's three events in one message at one revision, EXPIRE."""
    server = make_server().start()
    with server.client(proto_json=False) as kv:
        kv.set(SetRequest(key="p:typing", value=b"1", ttl_ms=300))
        kv.set(SetRequest(key="p:a", value=b"online"))
        touched = kv.touch(TouchRequest(key="p:a", ttl_ms=60_000))
        txn = kv.txn(TxnRequest(success=[
            Op(set=SetRequest(key="p:b", value=b"x")),
            Op(increment=IncrementRequest(key="p:c", delta=1)),
            Op(delete=DeleteRequest(key="p:a")),
        ]))  # fmt: skip
        kv.set(SetRequest(key="other", value=b"not watched"))

        def expired() -> bool:
            events = [e for m in _messages_until_live(server, WatchRequest(prefix="p:",
                      start_revision=1)) for e in m]  # fmt: skip
            return any(e.type == Event.EVENT_TYPE_EXPIRE for e in events)

        wait_for("the typing key's expiry", expired, timeout=10)
    messages = _messages_until_live(server, WatchRequest(prefix="p:", start_revision=1))
    events = [e for m in messages for e in m]
    shown = [(e.type, e.key, e.value, e.revision) for e in events]
    set_, touch, delete, expire = (Event.EVENT_TYPE_SET, Event.EVENT_TYPE_TOUCH,
                                   Event.EVENT_TYPE_DELETE, Event.EVENT_TYPE_EXPIRE)  # fmt: skip
    assert shown == [
        (set_, "p:typing", b"1", 1),
        (set_, "p:a", b"online", 2),
        (touch, "p:a", b"", 3),
        (set_, "p:b", b"x", txn.revision),
        (set_, "p:c", b"1", txn.revision),
        (delete, "p:a", b"", txn.revision),
        (expire, "p:typing", b"", txn.revision + 2),
    ]
    assert events[0].expires_at_ms > 0
    assert events[2].expires_at_ms == touched.expires_at_ms
    holding = [m for m in messages if any(e.revision == txn.revision for e in m)]
    assert len(holding) == 1, "a Txn's events come in one message"
