"""Asynchronous primary -> replica replication (issue 8) against real processes on
loopback: convergence under load, partial resync after link faults and restarts, full
resync when the backlog ran out (also interrupted, and of 200k keys under load),
read-only replicas, min_revision reads, readiness, duplicate and reordered batches, a
replica pointed at another history, and clean shutdown with a link hanging.

Every replica sits behind a FaultProxy; the primary reaches it only through it.
Resync counts are deltas from the moment a scenario's fault starts, so how a node's
first attach is counted does not matter.
"""

from __future__ import annotations

import gzip
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from bench.dataset import build_snapshot_dir
from bench.dataset import key as dataset_key
from kvservice.replication.replica import PREDECESSOR_WAIT_SECONDS
from kvservice.storage.segments import list_segments, segment_revision
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import SnapshotRequest
from kvservice.v1.kv_pb2 import DeleteRequest, GetRequest, SetRequest
from kvservice.v1.replication_pb2 import PushRequest, PushResponse, PushResult
from tests.faults.proxy import FaultProxy
from tests.faults.workload import Burst, check_revisions, populate, verify_recovered
from tests.integration.cluster import (
    SMALL_BACKLOG,
    Cluster,
    Node,
    assert_consecutive,
    assert_converged,
    assert_same_store,
    replica_status,
    resyncs,
    retries,
    stored,
    wait_caught_up,
    wait_streaming,
    wal_revisions,
)
from tests.integration.conftest import run_cli, wait_for

pytestmark = pytest.mark.integration

PUSH_PATH = "/kvservice.v1.Replication/Push"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path)
    try:
        yield nodes
    finally:
        # Shown by pytest only when the test failed.
        print(nodes.logs())
        nodes.close()


# -- helpers ------------------------------------------------------------------------------


def burst(node: Node, prefix: str, *, clients: int = 16, max_ops: int = 100_000) -> Burst:
    """A 16-client write load on `node` (workload.Burst), started."""
    return Burst(node.url, prefix, clients=clients, max_ops=max_ops,
                 seed=random.randrange(1 << 20)).start()  # fmt: skip


def finish(load: Burst, *, seconds: float = 0.0, timeout: float = 30.0) -> None:
    """Let the load run `seconds` more (or until every writer is done), then stop it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(t.is_alive() for t in load.threads):
        time.sleep(0.02)
    load.stop_event.set()
    load.join(timeout)


def burst_keys(*loads: Burst) -> set[str]:
    """Every key the loads' writers may have touched."""
    return {w.key(i) for load in loads for w in load.writers for i in range(w.keys)}


def ack_more(load: Burst, count: int, timeout: float = 30.0) -> None:
    """Wait until `count` more writes than now were acknowledged."""
    load.wait_for_acks(load.acked_count() + count, timeout)


def full_and_partial(primary: Node, replica: Node) -> tuple[float, float]:
    return resyncs(primary, replica, "full"), resyncs(primary, replica, "partial")


def write(node: Node, prefix: str, count: int, tag: str) -> set[str]:
    """Set `count` keys `<prefix><i>` to values naming `tag`; return the keys."""
    keys = {f"{prefix}{i:04d}" for i in range(count)}
    with node.client() as client:
        for key in sorted(keys):
            client.set(SetRequest(key=key, value=f"{tag}:{key}".encode()))
    return keys


def force_replica_of(replica: Node, primary: Node) -> None:
    """`kvservice replicaof --force`: let `primary` replace the replica's history."""
    done = run_cli("replicaof", "--url", replica.url, "--primary", primary.url, "--force")
    assert done.returncode == 0, done.stderr


def not_ready(replica: Node, what: str) -> dict[str, Any]:
    """Wait until the replica's /readyz is 503; return the body that said so."""
    bodies: list[dict[str, Any]] = []

    def check() -> bool:
        code, body = replica.ready()
        if code == 503:
            bodies.append(body)
        return bool(bodies)

    wait_for(what, check, timeout=15)
    return bodies[0]


def connect_error(call: Callable[[], object]) -> ConnectError:
    """The ConnectError `call` raises (fails when it raises none)."""
    with pytest.raises(ConnectError) as caught:
        call()
    return caught.value


# -- 1. convergence -----------------------------------------------------------------------


def test_primary_and_two_replicas_converge_under_16_client_load(cluster: Cluster) -> None:
    """After a 16-client load stops, both replicas answer every key like the primary;
    during it, reads on the replicas only ever show acknowledged writes, never going
    back in time."""
    primary, replicas = cluster.primary_with_replicas(2)

    load = burst(primary, "conv", max_ops=150)
    watched = sorted(burst_keys(load))[::12]
    seen: list[tuple[str, str, bytes, int]] = []  # (replica, key, value, revision)

    def watch(replica: Node) -> None:
        with replica.client(timeout_ms=5_000) as client:
            while any(t.is_alive() for t in load.threads):
                for key in watched:
                    got = client.get(GetRequest(key=key))
                    if got.found:
                        seen.append((replica.name, key, got.value, got.revision))
                time.sleep(0.05)  # a light read load: the writes are what is measured

    watchers = [threading.Thread(target=watch, args=(r,), daemon=True) for r in replicas]
    for thread in watchers:
        thread.start()
    finish(load, seconds=30)
    for thread in watchers:
        thread.join(10)
    assert not load.errors(), load.errors()
    assert load.acked_count() == 16 * 150
    check_revisions(load.acks())

    written = {(op.key, op.revision): op.value for op in load.acks() if op.kind == "set"}
    latest: dict[tuple[str, str], int] = {}
    for name, key, value, revision in seen:
        assert written.get((key, revision)) == value, f"{name} showed {key}@{revision}={value!r}"
        assert revision >= latest.get((name, key), 0), f"{name} went back in time on {key}"
        latest[name, key] = revision
    assert len(seen) > 100, f"only {len(seen)} reads on the replicas during the load"

    revision = wait_caught_up(primary, replicas)
    assert_converged(primary, replicas, burst_keys(load))
    for node in (primary, *replicas):
        # The primary's acknowledged history, on every node.
        verify_recovered(node.url, load.writers)

    status = primary.status()
    assert status.role == "primary"
    assert status.epoch == 0, "a history started in an empty data dir has epoch 0"
    assert status.revision == revision
    assert status.durable_revision == revision
    assert sorted(r.url for r in status.replicas) == sorted(r.advertise_url for r in replicas)
    for replica in replicas:
        entry = replica_status(primary, replica)
        assert entry.state == "streaming"
        assert entry.acked_revision == revision
        assert entry.lag_revisions == 0
        url = replica.advertise_url
        assert primary.metric("kvservice_replica_connected", replica=url) == 1
        assert primary.metric("kvservice_replica_lag_revisions", replica=url) == 0
        assert primary.metric("kvservice_replica_lag_seconds", replica=url) < 5
        # Every entry was written while the replica streamed: each one's lag to the
        # replica's durable ack is in the histogram, once.
        lags = "kvservice_replica_durable_lag_seconds"
        assert primary.metric(f"{lags}_count", replica=url) == revision
        assert primary.metric(f"{lags}_bucket", replica=url, le="+Inf") == revision
        assert 0 < primary.metric(f"{lags}_sum", replica=url) < 5 * revision
        names = {name for name, _ in primary.metrics()}
        assert {"kvservice_replica_lag_seconds", "kvservice_replication_retries_total"} <= names
    assert primary.metric("kvservice_replication_role", role="primary") == 1
    assert primary.metric("kvservice_replication_role", role="replica") == 0
    assert ("kvservice_replication_epoch", frozenset()) in primary.metrics()

    for replica in replicas:
        mine = replica.status()
        assert mine.role == "replica"
        assert mine.replication_id == status.replication_id
        assert mine.epoch == status.epoch
        assert mine.node_id != status.node_id
        assert mine.advertise_url == replica.advertise_url
        assert mine.link.state == "streaming"
        assert mine.link.primary_url == primary.url
        assert replica.metric("kvservice_replication_applied_revision") == revision
        assert replica.metric("kvservice_replication_role", role="replica") == 1
        assert replica.metric("kvservice_replication_lag_seconds") < 5
        assert ("kvservice_replication_lag_seconds", frozenset()) in replica.metrics()
        assert replica.ready()[0] == 200

    # `kvservice status` prints the same message as JSON.
    shown = run_cli("status", "--url", replicas[0].url, timeout=30)
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert printed["role"] == "replica"
    assert int(printed["revision"]) == revision


def test_primary_pushes_to_the_replicas_it_is_configured_with(cluster: Cluster) -> None:
    """Replicas in the primary's --replicas are brought up to date: one that does not
    announce itself learns its primary's URL from the pushes; one that also announces
    itself gets one link, not two."""
    primary = cluster.add_primary(start=False)
    silent = cluster.add_replica(primary, start=False)
    silent.announce = False
    both = cluster.add_replica(primary, start=False)
    primary.extra = ("--replicas", f"{silent.advertise_url},{both.advertise_url}")
    cluster.start(primary, silent, both)
    keys = write(primary, "listed/", 50, "p")
    for replica in (silent, both):
        wait_streaming(primary, replica)
    assert_converged(primary, [silent, both], keys)
    urls = [r.url for r in primary.status().replicas]
    assert sorted(urls) == sorted([silent.advertise_url, both.advertise_url]), urls
    assert silent.status().link.primary_url == primary.url
    with silent.client() as client:
        error = connect_error(lambda: client.set(SetRequest(key="x", value=b"x")))
    assert error.code == Code.FAILED_PRECONDITION, error
    assert primary.url in error.message


# -- 2. link faults -----------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["cut", "blackhole", "stall"])
def test_link_fault_under_load_heals_by_partial_resync(cluster: Cluster, fault: str) -> None:
    """Dropped (RST), black-holed or stalled link to one replica: the primary keeps taking
    writes, the other replica keeps up, and the link heals with no full resync (a cut or
    black hole by a partial resync; a stall, a pause shorter than the primary's timeout,
    by delivering what waited)."""
    primary, (faulty, healthy) = cluster.primary_with_replicas(2)
    assert faulty.proxy is not None
    full_before, partial_before = full_and_partial(primary, faulty)
    healthy_full_before = resyncs(primary, healthy, "full")
    retries_before = retries(primary, faulty)

    load = burst(primary, fault)
    load.wait_for_acks(300)
    if fault == "cut":
        faulty.proxy.cut()
        ack_more(load, 300)
        wait_for(
            "the primary to count a retry on the cut link",
            lambda: retries(primary, faulty) > retries_before,
        )
    elif fault == "stall":
        faulty.proxy.stall()
        ack_more(load, 1000)
    else:
        faulty.proxy.blackhole()
        started = time.monotonic()
        wait_for(
            "the primary to time out on the black-holed link",
            lambda: (
                retries(primary, faulty) > retries_before
                or replica_status(primary, faulty).state != "streaming"
            ),
            timeout=30,
        )
        print(f"primary noticed the black hole after {time.monotonic() - started:.1f}s")
    # Meanwhile the other replica keeps up with the primary.
    mark = primary.status().revision
    wait_for(
        "the healthy replica to keep up during the fault",
        lambda: healthy.status().revision >= mark,
    )
    faulty.proxy.heal()
    ack_more(load, 300)
    finish(load, seconds=0.5)
    assert not load.errors(), f"writes failed during the fault:\n{load.errors()}"

    assert_converged(primary, [faulty, healthy], burst_keys(load))
    full, partial = full_and_partial(primary, faulty)
    assert full - full_before == 0, f"{full - full_before} full resyncs after a {fault}"
    if fault != "stall":
        assert partial - partial_before >= 1, "the link healed without a partial resync"
    assert replica_status(primary, faulty).state == "streaming"
    assert resyncs(primary, healthy, "full") == healthy_full_before


# -- 3. replica crash ---------------------------------------------------------------------


def test_replica_sigkill_mid_stream_resumes_by_partial_resync(cluster: Cluster) -> None:
    """SIGKILL a replica under load and restart it, twice: it keeps what it
    acknowledged, resumes with partial resyncs, and its WAL holds every revision once.
    Small segments and snapshot thresholds on both nodes: rotations, snapshots and purges
    race the kills, and the primary's WAL retention must keep what the replica needs."""
    small = ("--wal-segment-bytes", "4096", "--snapshot-threshold-bytes", "16384")
    primary, (replica,) = cluster.primary_with_replicas(1, small, small)
    full_before, partial_before = full_and_partial(primary, replica)
    identity = replica.status()

    url = replica.advertise_url
    load = burst(primary, "crash")
    load.wait_for_acks(300)
    for _ in range(2):
        # Linked again (to this process) before each kill, so each kill costs a resync.
        wait_streaming(primary, replica)
        ack_more(load, 100)
        time.sleep(random.uniform(0, 0.2))
        acked = replica_status(primary, replica).acked_revision
        replica.kill()
        ack_more(load, 300)  # the primary does not wait for a dead replica
        wait_for(
            "the primary to show the replica down and lagging",
            lambda: (
                primary.metric("kvservice_replica_connected", replica=url) == 0
                and primary.metric("kvservice_replica_lag_revisions", replica=url) > 0
                and replica_status(primary, replica).state != "streaming"
            ),
        )
        replica.start()
        mine = replica.status()
        assert mine.revision >= acked, f"acknowledged {acked} but restarted at {mine.revision}"
        assert (mine.node_id, mine.replication_id, mine.epoch) == (
            identity.node_id, identity.replication_id, identity.epoch,
        )  # fmt: skip
        ack_more(load, 300)
    finish(load, seconds=0.5)
    assert not load.errors(), load.errors()

    assert_converged(primary, [replica], burst_keys(load))
    full, partial = full_and_partial(primary, replica)
    assert full - full_before == 0, "a restarted replica was fully resynced"
    assert partial - partial_before >= 2
    assert replica_status(primary, replica).state == "streaming"

    replica.stop()
    primary.stop()
    revisions = wal_revisions(replica.data_dir)
    assert_consecutive(revisions, "replica")
    assert_same_store(primary.data_dir, replica.data_dir)


# -- 4. primary restart -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_primary_restart_replicas_resume_by_partial_resync(cluster: Cluster, how: str) -> None:
    """Primary stopped (SIGTERM) or killed (SIGKILL) under load and restarted on its data
    dir and port: same history, replicas resume with partial resyncs and converge."""
    primary, replicas = cluster.primary_with_replicas(2)
    before = primary.status()

    first = burst(primary, "before")
    first.wait_for_acks(500)
    if how == "sigkill":
        primary.kill()
    else:
        primary.stop()
    first.join(30)  # every writer stops at its first failed request
    primary.start()

    after = primary.status()
    assert (after.node_id, after.replication_id, after.epoch) == (
        before.node_id, before.replication_id, before.epoch,
    )  # fmt: skip
    for replica in replicas:
        wait_streaming(primary, replica)
    second = burst(primary, "after", max_ops=50)
    finish(second, seconds=30)
    assert not second.errors(), second.errors()

    assert_converged(primary, replicas, burst_keys(first, second))
    for node in (primary, *replicas):
        verify_recovered(node.url, first.writers)
        verify_recovered(node.url, second.writers)
    for replica in replicas:
        full, partial = full_and_partial(primary, replica)
        assert full == 0, f"{replica.name}: {full} full resyncs after a primary {how}"
        assert partial >= 1, f"{replica.name}: no partial resync after a primary {how}"
        entry = replica_status(primary, replica)
        assert (entry.full_resyncs, entry.state) == (0, "streaming")


def test_primary_sigterm_with_a_push_in_flight_exits_cleanly(cluster: Cluster) -> None:
    """SIGTERM while a push hangs on a stalled link to a replica: the primary still shuts
    down (its sender stops instead of retrying) and exits 0."""
    primary, (replica,) = cluster.primary_with_replicas(1)
    assert replica.proxy is not None
    replica.proxy.stall()
    with primary.client() as client:
        client.set(SetRequest(key="k", value=b"v"))
    time.sleep(0.5)  # a push (or heartbeat) now waits on the stalled link
    started = time.monotonic()
    primary.stop()
    print(f"the primary exited {time.monotonic() - started:.1f}s after SIGTERM")


def test_replica_sigterm_while_announcing_to_an_unresponsive_primary_exits_cleanly(
    cluster: Cluster,
) -> None:
    """SIGTERM while the replica's Announce waits on a primary that never answers (a
    black hole): the replica still shuts down and exits 0."""
    replica = cluster.add_replica(cluster.black_hole())
    time.sleep(1)  # the first Announce went out at start-up and waits for an answer
    started = time.monotonic()
    replica.stop()
    print(f"the replica exited {time.monotonic() - started:.1f}s after SIGTERM")


# -- 5. backlog exhausted -----------------------------------------------------------------


def test_backlog_exhausted_one_full_resync_and_old_data_served_throughout(
    cluster: Cluster,
) -> None:
    """A replica away while snapshots purged the WAL it needs gets exactly one full resync,
    serving its old data (never an error, never a missing key) until the switch."""
    # Snapshots go out in 4 KiB pieces: the resync spans several round trips.
    small_pieces = ("--repl-batch-max-bytes", "4096")
    primary, (replica,) = cluster.primary_with_replicas(1, (*SMALL_BACKLOG, *small_pieces))
    kept = populate(primary.server, 200, prefix="kept/")
    gone = populate(primary.server, 50, prefix="gone/")
    assert_converged(primary, [replica], [*kept, *gone])
    away_at = replica.status().revision
    full_before = resyncs(primary, replica, "full")
    replica.stop()

    # Every value each key has had: what the replica may answer during the resync.
    allowed: dict[str, set[bytes | None]] = {k: {v} for k, (v, _) in {**kept, **gone}.items()}
    with primary.client() as client:
        for key in gone:
            client.delete(DeleteRequest(key=key))
            allowed[key].add(None)
        for round_ in range(10):
            for i in range(300):
                key = f"kept/{i % 200:04d}"
                value = f"round{round_}-{i}-".encode() * 4
                client.set(SetRequest(key=key, value=value))
                allowed[key].add(value)
            with AdminClientSync(primary.url, timeout_ms=30_000) as admin:
                admin.snapshot(SnapshotRequest())
            oldest = segment_revision(list_segments(primary.data_dir / "wal")[0])
            if oldest > away_at + 1:
                break
        else:
            pytest.fail(f"the WAL still reaches revision {away_at + 1}: {oldest}")

    problems: list[str] = []
    reads = 0
    done = threading.Event()

    def read_old_data() -> None:
        nonlocal reads
        keys = sorted(allowed)
        with replica.client(timeout_ms=5_000) as client:
            while not done.is_set():
                for key in keys:
                    try:
                        got = client.get(GetRequest(key=key))
                    except ConnectError as exc:
                        problems.append(f"Get {key}: {exc.code} {exc.message}")
                        continue
                    reads += 1
                    value = got.value if got.found else None
                    if value not in allowed[key]:
                        problems.append(f"Get {key}: {value!r}")

    # Writes go on during the resync: the entries after the snapshot follow it. A link
    # delay stretches the resync over many reads.
    assert replica.proxy is not None
    replica.proxy.delay(0.2)
    meanwhile = burst(primary, "meanwhile", clients=2, max_ops=300)
    replica.start()
    reader = threading.Thread(target=read_old_data, daemon=True)
    reader.start()
    during: list[int] = []  # the read count each time the replica said full-sync

    def synced() -> bool:
        code, body = replica.ready()  # before the status: full-sync then covers it too
        link = replica.status().link
        if link.state == "full-sync":
            during.append(reads)
            if code != 503:
                problems.append(
                    f"/readyz {code} {body} just before or during the full resync, at revision"
                    f" {replica.status().revision} of the primary's {primary.status().revision}"
                )
        if link.state != "streaming":
            return False
        entry = replica_status(primary, replica)
        return entry is not None and entry.state == "streaming"

    try:
        wait_for("the full resync", synced, timeout=60)
        replica.proxy.heal()
        finish(meanwhile, seconds=30)
    finally:
        done.set()
        reader.join(30)
    print(f"{reads} reads, {len(during)} looks at the replica in full-sync: {during}")
    assert not problems, f"{len(problems)} problems on the replica: {problems[:10]}"
    assert len(during) >= 2, "the full resync was never seen in progress"
    assert during[-1] > during[0], f"no reads were served during the full resync: {during}"
    assert not meanwhile.errors(), meanwhile.errors()

    assert_converged(primary, [replica], [*allowed, *burst_keys(meanwhile)])
    full = resyncs(primary, replica, "full")
    assert full - full_before == 1, f"{full - full_before} full resyncs, expected exactly 1"
    entry = replica_status(primary, replica)
    assert entry.state == "streaming"
    assert entry.full_resyncs == full
    assert all(g is None for g in replica.states(gone).values()), "deleted keys survived"


# -- 6. big full resync -------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_full_resync_of_200k_keys_under_write_load_completes_in_one_attempt(
    cluster: Cluster,
) -> None:
    """A new replica of a 200k-key primary, while 16 clients keep writing, is fully
    resynced exactly once and ends up equal to the primary."""
    keys = 200_000
    primary = cluster.add_primary("primary", start=False)
    build_snapshot_dir(primary.data_dir, keys)
    primary.start()
    load = burst(primary, "big")
    load.wait_for_acks(200)

    started = time.monotonic()
    replica = cluster.add_replica(primary)
    not_ready: list[dict[str, object]] = []

    def streaming() -> bool:
        time.sleep(0.15)  # light polling: the machine is busy enough
        code, body = replica.ready()
        if code == 503:
            not_ready.append(body)
        entry = replica_status(primary, replica)
        return entry is not None and entry.state == "streaming"

    wait_for("the 200k-key full resync", streaming, timeout=90)
    elapsed = time.monotonic() - started
    print(f"full resync of {keys} keys under load: {elapsed:.1f}s")
    assert not_ready, "/readyz never said 503 while the replica was not in sync"
    assert all(b.get("ready") is False and b.get("reason") for b in not_ready), not_ready
    ack_more(load, 200)
    finish(load, seconds=0.5)
    assert not load.errors(), load.errors()

    wait_caught_up(primary, [replica], timeout=60)
    assert full_and_partial(primary, replica)[0] == 1
    assert replica_status(primary, replica).full_resyncs == 1
    sample = {dataset_key(i) for i in random.sample(range(keys), 2000)}
    assert_converged(primary, [replica], sample | burst_keys(load))
    replica.stop()
    primary.stop()
    assert_same_store(primary.data_dir, replica.data_dir)


# -- 7. read-only replicas and min_revision -----------------------------------------------


def test_writes_to_a_replica_fail_with_failed_precondition_naming_the_primary(
    cluster: Cluster,
) -> None:
    """Set and Delete on a replica: failed_precondition naming the primary; nothing written."""
    primary, (replica,) = cluster.primary_with_replicas(1)
    with primary.client() as client:
        client.set(SetRequest(key="k", value=b"from-primary"))
    wait_caught_up(primary, [replica])
    with replica.client() as client:
        for call in (
            lambda: client.set(SetRequest(key="k", value=b"x")),
            lambda: client.set(SetRequest(key="new", value=b"x")),
            lambda: client.delete(DeleteRequest(key="k")),
        ):
            error = connect_error(call)
            assert error.code == Code.FAILED_PRECONDITION, error
            assert primary.url in error.message, error.message
        got = client.get(GetRequest(key="k"))
        assert (got.found, got.value) == (True, b"from-primary")
        assert not client.get(GetRequest(key="new")).found
    # Over Connect JSON too, as curl would send it.
    reply = httpx.post(
        f"{replica.url}/kvservice.v1.KVStore/Set", json={"key": "k", "value": "eA=="}, timeout=5
    )
    assert reply.status_code == 400
    assert reply.json()["code"] == "failed_precondition"
    assert primary.url in reply.json()["message"]
    assert primary.status().revision == replica.status().revision == 1


def test_min_revision_reads_your_writes_on_a_lagging_replica(cluster: Cluster) -> None:
    """Get(min_revision=R) on a replica 150 ms behind answers the write made at R; a
    revision that never comes is deadline_exceeded, at the node's cap or the client's."""
    primary, (replica,) = cluster.primary_with_replicas(
        1, replica_extra=("--min-revision-max-wait-ms", "1500")
    )
    assert replica.proxy is not None
    replica.proxy.delay(0.15)
    waited = 0
    with primary.client() as writer, replica.client(timeout_ms=5_000) as reader:
        for i in range(20):
            value = f"v{i}".encode()
            revision = writer.set(SetRequest(key="ryw", value=value)).revision
            sent = time.monotonic()
            got = reader.get(GetRequest(key="ryw", min_revision=revision))
            waited += time.monotonic() - sent > 0.05
            assert (got.found, got.value, got.revision) == (True, value, revision)
        assert waited >= 10, f"the replica had to wait only {waited} times: no lag to read past"

        far = revision + 1_000
        sent = time.monotonic()
        error = connect_error(lambda: reader.get(GetRequest(key="ryw", min_revision=far)))
        took = time.monotonic() - sent
        assert error.code == Code.DEADLINE_EXCEEDED, error
        assert 1 < took < 5, f"min_revision_max_wait_ms=1500 but the answer took {took:.1f}s"

        error = connect_error(
            lambda: reader.get(GetRequest(key="ryw", min_revision=far), timeout_ms=300)
        )
        assert error.code == Code.DEADLINE_EXCEEDED, error
    # The primary has applied what it acknowledged: min_revision there never waits long.
    with primary.client() as client:
        assert client.get(GetRequest(key="ryw", min_revision=revision)).revision == revision


def test_unlinked_replica_not_ready_serves_reads_and_refuses_future_revisions(
    cluster: Cluster,
) -> None:
    """Primary gone: /readyz 503 with a reason, plain Gets still served, a Get for a
    revision not yet applied is unavailable; ready again once the primary is back."""
    primary, (replica,) = cluster.primary_with_replicas(
        1, replica_extra=("--replica-max-lag-seconds", "0.5", "--min-revision-max-wait-ms", "500")
    )
    with primary.client() as client:
        client.set(SetRequest(key="k", value=b"v"))
    wait_caught_up(primary, [replica])
    assert replica.ready()[0] == 200

    # Lagging (every push arrives 1.5 s late) is not ready either.
    assert replica.proxy is not None
    replica.proxy.delay(1.5)
    stop = threading.Event()

    def write_on() -> None:
        with primary.client() as client:
            while not stop.is_set():
                client.set(SetRequest(key="lag", value=b"x"))
                time.sleep(0.05)

    writer = threading.Thread(target=write_on, daemon=True)
    writer.start()
    try:
        body = not_ready(replica, "replica /readyz 503 while lagging 1.5 s")
        assert body["ready"] is False, body
        assert body["reason"], body
    finally:
        stop.set()
        writer.join(10)
    replica.proxy.heal()
    wait_for("replica ready after the lag", lambda: replica.ready()[0] == 200)
    revision = wait_caught_up(primary, [replica])

    primary.stop()
    body = not_ready(replica, "replica /readyz 503 after the primary stopped")
    assert body["ready"] is False, body
    assert body["reason"], body
    assert replica.status().link.state == "unlinked"
    with replica.client(timeout_ms=5_000) as client:
        got = client.get(GetRequest(key="k"))
        assert (got.found, got.value) == (True, b"v")
        assert client.get(GetRequest(key="k", min_revision=revision)).value == b"v"
        # The node's 500 ms cap ends the wait, well before the client's 5 s deadline.
        error = connect_error(lambda: client.get(GetRequest(key="k", min_revision=revision + 1)))
        assert error.code == Code.UNAVAILABLE, error

    primary.start()
    wait_streaming(primary, replica)
    wait_for("replica ready again", lambda: replica.ready()[0] == 200)


def test_replica_catching_up_on_old_writes_is_not_ready(cluster: Cluster) -> None:
    """A replica restarted behind by writes older than replica_max_lag_seconds answers
    /readyz 503 until it has caught up (a load balancer must not send reads to it)."""
    primary, (replica,) = cluster.primary_with_replicas(
        1, ("--repl-batch-max-entries", "20"), ("--replica-max-lag-seconds", "1")
    )
    write(primary, "before/", 50, "p")
    wait_caught_up(primary, [replica])
    replica.stop()
    write(primary, "missed/", 200, "p")
    target = primary.status().revision
    time.sleep(1.5)  # every missed write is now older than replica_max_lag_seconds
    assert replica.proxy is not None
    replica.proxy.delay(0.25)  # ten batches of 20, half a second each
    replica.start()
    looks: list[tuple[int, int]] = []  # (/readyz status, the replica's revision after it)

    def caught_up() -> bool:
        code, _ = replica.ready()
        revision = replica.status().revision
        looks.append((code, revision))
        return revision >= target

    wait_for("the replica to catch up", caught_up, timeout=60)
    behind = [(code, rev) for code, rev in looks if rev < target - 20]
    print(f"{len(looks)} looks while catching up: {looks}")
    assert len(behind) >= 3, f"catching up was not observed: {looks}"
    ready_while_behind = [(code, rev) for code, rev in behind if code == 200]
    assert not ready_while_behind, (
        f"/readyz 200 at revisions {[rev for _, rev in ready_while_behind]} while writes up to"
        f" {target}, older than replica_max_lag_seconds, were still missing"
    )
    replica.proxy.heal()
    wait_for("ready once caught up", lambda: replica.ready()[0] == 200)


# -- 8. duplicate and reordered batches ---------------------------------------------------


def split_request(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """(path, headers, body) of one raw HTTP/1.1 request the proxy recorded."""
    head, _, body = raw.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in lines)
    return (
        request_line.split(" ")[1],
        {k.strip().lower(): v.strip() for k, v in headers.items()},
        body,
    )


def response_body(raw: bytes) -> bytes:
    """The body of one raw HTTP/1.1 response (status 200; chunked and gzip undone)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert status_line.split(" ")[1] == "200", raw[:500]
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    if "chunked" in headers.get("transfer-encoding", ""):
        out = bytearray()
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += body[:size]
            body = body[size + 2 :]
        body = bytes(out)
    if headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    return body


def push_of(raw: bytes | None) -> PushRequest | None:
    """The PushRequest in a recorded request, if it is an uncompressed Push."""
    if raw is None:
        return None
    path, headers, body = split_request(raw)
    if path != PUSH_PATH or headers.get("content-encoding", "identity") != "identity":
        return None
    return PushRequest.FromString(body)


def resend(replica: Node, raw: bytes, push: PushRequest | None = None) -> PushResponse:
    """Send a recorded Push again (or `push` with its headers), straight to the replica."""
    path, headers, body = split_request(raw)
    if push is not None:
        body = push.SerializeToString()
    keep = {k: v for k, v in headers.items() if k not in ("host", "content-length", "connection")}
    reply = httpx.post(f"{replica.url}{path}", content=body, headers=keep, timeout=10)
    assert reply.status_code == 200, reply.text
    return PushResponse.FromString(reply.content)


def test_duplicate_and_reordered_batches_change_nothing(cluster: Cluster) -> None:
    """Pushes replayed, held back and released late, and resent long after: the replica
    applies each entry once and ends equal to the primary."""
    primary, (replica,) = cluster.primary_with_replicas(1)
    proxy = replica.proxy
    assert proxy is not None

    load = burst(primary, "dup", clients=8)
    load.wait_for_acks(200)

    batches: list[bytes] = []

    def batch() -> bool:
        raw = proxy.last_request()
        push = push_of(raw)
        if raw is not None and push is not None and len(push.records) > 0:
            batches.append(raw)
        return bool(batches)

    wait_for("a Push with entries through the proxy", batch, timeout=10)
    old = batches[0]
    replays = 0
    for _ in range(15):  # duplicates, racing the primary's next push
        if push_of(proxy.last_request()) is not None:
            response = PushResponse.FromString(response_body(proxy.replay_last_request()))
            assert response.result != PushResult.PUSH_RESULT_HISTORY_MISMATCH, response
            replays += 1
        time.sleep(0.03)
    assert replays > 0

    # Reordered: while the primary waits on a held push of entries p+1..q, the second
    # half of it arrives first (a gap: nothing applied), then the whole of it, and
    # the held original last (a duplicate).
    held = None
    for _ in range(20):
        proxy.hold_next_request()
        raw = proxy.wait_held(timeout=5)
        push = push_of(raw)
        if push is not None and len(push.records) >= 2:
            held = (raw, push)
            break
        proxy.release_held()
    assert held is not None, "no push of two or more entries in 20 tries"
    raw, push = held
    start = push.prev_revision
    assert replica.status().revision == start
    half = len(push.records) // 2
    later = PushRequest()
    later.CopyFrom(push)
    later.prev_revision = start + half
    del later.records[:half]
    response = resend(replica, raw, later)
    assert response.result == PushResult.PUSH_RESULT_POSITION_MISMATCH, response
    assert response.revision == start, response
    assert replica.status().revision == start
    response = resend(replica, raw)
    assert response.result == PushResult.PUSH_RESULT_OK, response
    assert response.revision == start + len(push.records), response
    ack_more(load, 100)  # the primary's writes do not wait for the held push
    assert proxy.release_held() == 1
    finish(load, seconds=1)
    assert not load.errors(), load.errors()
    keys = burst_keys(load)
    assert_converged(primary, [replica], keys)

    # A stale batch and a duplicate of the newest, long after they were applied: each is
    # answered with the replica's position and applies nothing. (A stale one may be
    # refused, since the primary it names looks behind the replica; REFUSED is only
    # allowed here because it changes nothing: the replica goes on following.)
    revision = replica.status().revision
    for raw in (old, proxy.last_request()):
        assert raw is not None
        response = resend(replica, raw)
        assert response.result in (
            PushResult.PUSH_RESULT_OK, PushResult.PUSH_RESULT_POSITION_MISMATCH,
            PushResult.PUSH_RESULT_REFUSED,
        ), response  # fmt: skip
        assert response.revision == revision, response
    assert replica.status().revision == revision
    keys |= write(primary, "after-replays/", 5, "p")
    assert_converged(primary, [replica], keys)
    wait_for("the replica ready after the stale pushes", lambda: replica.ready()[0] == 200)

    replica.stop()
    primary.stop()
    assert_consecutive(wal_revisions(replica.data_dir), "replica")
    assert_same_store(primary.data_dir, replica.data_dir)


def hold_push_with_entries(proxy: FaultProxy, tries: int = 20) -> tuple[PushRequest, int]:
    """Hold back the next Push that carries entries (others pass); return it and the
    proxy's request count just before it (the held one included after)."""
    for _ in range(tries):
        before = proxy.stats().requests
        proxy.hold_next_request()
        push = push_of(proxy.wait_held(timeout=5))
        if push is not None and len(push.records) > 0:
            return push, before
        proxy.release_held()
    raise AssertionError(f"no Push with entries in {tries} tries")


def wait_pushed_past(proxy: FaultProxy, before: int, count: int) -> None:
    """Wait until `count` requests followed a held one: only pipelined pushes (sent
    without waiting for its answer) can."""
    wait_for(
        f"{count} pushes sent while one is held",
        lambda: proxy.stats().requests >= before + 1 + count,
        timeout=10,
    )


def test_pipelined_pushes_reordered_duplicated_and_dropped_change_nothing(
    cluster: Cluster,
) -> None:
    """With several pushes in flight: one held back briefly (its successors arrive first)
    is absorbed without a resync; duplicates change nothing; one lost while its
    successors are out ends in a partial resync. Each entry is applied once and the
    replica ends equal to the primary (same data, same digest)."""
    primary, (replica,) = cluster.primary_with_replicas(1)
    proxy = replica.proxy
    assert proxy is not None
    load = burst(primary, "pipe", clients=8)
    load.wait_for_acks(200)

    full_before, partial_before = full_and_partial(primary, replica)
    retries_before = retries(primary, replica)

    # Reordered: the successors of a held push reach the replica before it does.
    held, before = hold_push_with_entries(proxy)
    started = time.monotonic()
    wait_pushed_past(proxy, before, 2)
    assert replica.status().revision <= held.prev_revision  # nothing after the gap applied
    assert proxy.release_held() == 1
    held_for = time.monotonic() - started
    ack_more(load, 300)
    if held_for < 0.8 * PREDECESSOR_WAIT_SECONDS:  # (else the successors gave up: a reset)
        assert resyncs(primary, replica, "partial") == partial_before, "the reordering reset"
        assert retries(primary, replica) == retries_before
    else:
        print(f"held {held_for:.2f} s: too long to expect no reset on this machine")

    # Duplicated: requests replayed while later ones are in flight.
    for _ in range(10):
        response = PushResponse.FromString(response_body(proxy.replay_last_request()))
        assert response.result != PushResult.PUSH_RESULT_HISTORY_MISMATCH, response
        time.sleep(0.02)

    # Dropped: a held push is lost (its connection reset) after its successors went out.
    _, before = hold_push_with_entries(proxy)
    wait_pushed_past(proxy, before, 2)
    proxy.cut()
    proxy.heal()
    wait_for(
        "a partial resync after the lost push",
        lambda: resyncs(primary, replica, "partial") > partial_before,
        timeout=30,
    )
    ack_more(load, 300)
    finish(load, seconds=0.5)
    assert not load.errors(), load.errors()
    assert resyncs(primary, replica, "full") == full_before
    assert_converged(primary, [replica], burst_keys(load))
    assert replica.metric("kvservice_replication_digest_mismatches_total") == 0
    assert run_cli("check", "--primary", primary.url, "--replica", replica.url).returncode == 0

    replica.stop()
    primary.stop()
    assert_consecutive(wal_revisions(replica.data_dir), "replica")
    assert_same_store(primary.data_dir, replica.data_dir)


# -- 9. another history -------------------------------------------------------------------


@pytest.mark.parametrize("b_level", [150, 400, 800], ids=["b-behind", "b-level", "b-ahead"])
def test_replica_repointed_to_unrelated_primary_ends_equal_to_it(
    cluster: Cluster, b_level: int
) -> None:
    """A replica of A restarted as a replica of an unrelated B (behind, level with, or
    ahead of it) is never mixed: it refuses B and keeps A's state exactly until told
    `replicaof --force`, then gets B's state exactly, nothing of A's, even while A
    keeps pushing to it."""
    a = cluster.add_primary("a", start=False)
    b = cluster.add_primary("b", start=False)
    # Small snapshot thresholds: the replica has snapshots of A's history, some at
    # revisions above B's snapshot, which must not come back after the switch.
    small = ("--wal-segment-bytes", "4096", "--snapshot-threshold-bytes", "8192")
    replica = cluster.add_replica(a, None, *small, start=False)
    cluster.start(a, b, replica)
    wait_streaming(a, replica)
    # The same keys in both histories with different values; A stops at revision 400.
    a_keys = write(a, "shared/", 200, "a") | write(a, "a-only/", 200, "a")
    b_keys = write(b, "shared/", min(b_level, 200), "b")
    b_keys |= write(b, "b-only/", b_level - len(b_keys), "b")
    assert (a.status().revision, b.status().revision) == (400, b_level)
    a_states = assert_converged(a, [replica], a_keys | b_keys)
    assert a.status().replication_id != b.status().replication_id

    replica.stop()
    replica.primary = b
    replica.start()
    # B's history has no higher epoch: taking it would throw A's writes away.
    wait_for(
        "the replica to refuse B and say why",
        lambda: replica.status().link.last_error != "" and replica.ready()[0] == 503,
    )
    assert replica.status().revision == 400
    assert replica.states(a_keys | b_keys) == a_states, "the refused history was mixed in"
    force_replica_of(replica, b)
    wait_streaming(b, replica, timeout=30)
    # A still has the replica on its list and may keep pushing to it.
    a_keys |= write(a, "a-later/", 50, "a")
    b_keys |= write(b, "b-later/", 50, "b")
    time.sleep(1)  # a few of A's heartbeats

    assert_converged(b, [replica], a_keys | b_keys)
    leftovers = {k: v for k, v in replica.states(a_keys - b_keys).items() if v is not None}
    assert not leftovers, f"keys of A on the replica: {sorted(leftovers)[:10]}"
    mine = replica.status()
    assert mine.replication_id == b.status().replication_id
    assert mine.link.primary_url == b.url
    with replica.client() as client:
        error = connect_error(lambda: client.set(SetRequest(key="x", value=b"x")))
    assert error.code == Code.FAILED_PRECONDITION, error
    assert b.url in error.message, error.message
    assert full_and_partial(b, replica) == (1, 0)

    replica.stop()
    b.stop()
    assert_same_store(b.data_dir, replica.data_dir)
    data, _ = stored(replica.data_dir)
    assert not [k for k in data if k.startswith(("a-only/", "a-later/"))]


# -- 10. interrupted full resync ----------------------------------------------------------


def test_full_resync_interrupted_by_a_replica_kill_keeps_the_old_state_then_completes(
    cluster: Cluster,
) -> None:
    """A replica SIGKILLed halfway through a full resync restarts with exactly its old
    data (never a half-loaded store), and a later full resync completes cleanly."""
    a = cluster.add_primary("a", start=False)
    b = cluster.add_primary("b", "--repl-batch-max-bytes", "32768", start=False)
    build_snapshot_dir(b.data_dir, 20_000)
    replica = cluster.add_replica(a, start=False)
    cluster.start(a, b, replica)
    wait_streaming(a, replica)
    a_keys = write(a, "a/", 100, "a")
    wait_caught_up(a, [replica])
    replica.stop()
    old_data, old_revision = stored(replica.data_dir)
    assert len(old_data) == 100

    proxy = replica.proxy
    assert proxy is not None
    proxy.delay(0.1)  # many round trips for the ~2.5 MB snapshot, in 32 KiB pieces
    replica.primary = b
    sent_before = proxy.stats().bytes_up
    replica.start()
    force_replica_of(replica, b)
    wait_for(
        "a full resync a tenth of the way through",
        lambda: (
            (entry := replica_status(b, replica)) is not None
            and entry.state == "full-sync"
            and proxy.stats().bytes_up - sent_before > 256 * 1024
        ),
        timeout=30,
    )
    proxy.cut()
    assert replica.status().revision == old_revision, "the resync ended before the kill"
    replica.kill()

    replica.start()  # unlinked: the proxy is still cut
    mine = replica.status()
    assert mine.revision == old_revision
    assert replica.states(a_keys) == {
        k: (v[8:], int.from_bytes(v[:8], "big")) for k, v in old_data.items()
    }
    assert set(replica.states({dataset_key(i) for i in range(0, 20_000, 97)}).values()) == {None}, (
        "keys of the interrupted transfer are visible"
    )
    replica.stop()
    assert stored(replica.data_dir) == (old_data, old_revision)

    proxy.heal()
    replica.start()
    force_replica_of(replica, b)  # the interrupted transfer's consent is not kept
    wait_streaming(b, replica, timeout=60)
    wait_caught_up(b, [replica])
    assert full_and_partial(b, replica)[0] >= 2
    replica.stop()
    b.stop()
    assert_same_store(b.data_dir, replica.data_dir)
