"""Failover building blocks against real nodes: promote, replicaof, fencing,
wait_replicas and min_replicas (issue 9; the planned `failover` command, digests
and backups are still to come)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.storage import record
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import (
    DigestRequest,
    ReplicationStatusRequest,
    ReplicationStatusResponse,
)
from kvservice.v1.kv_connect import KVStoreClientSync
from kvservice.v1.kv_pb2 import GetRequest, SetRequest
from kvservice.v1.log_pb2 import LogEntry
from tests.faults.logs import json_lines
from tests.faults.proxy import FaultProxy
from tests.faults.shim import shim_env
from tests.integration import cluster as kv_cluster
from tests.integration.conftest import ServerProcess, free_port, run_cli, wait_for

pytestmark = pytest.mark.integration
FAST = ("--repl-heartbeat-seconds", "0.2", "--repl-retry-max-seconds", "0.5")


def status(node: ServerProcess) -> ReplicationStatusResponse:
    with AdminClientSync(node.url, timeout_ms=5000) as admin:
        return admin.replication_status(ReplicationStatusRequest())


def replica(make_server, tmp_path: Path, name: str, primary: str, *extra: str) -> ServerProcess:  # type: ignore[no-untyped-def]
    return make_server(
        "--role", "replica", "--primary-url", primary, *FAST, *extra,
        data_dir=tmp_path / name,
    ).start()  # fmt: skip


def streaming(primary: ServerProcess, count: int) -> Callable[[], bool]:
    def check() -> bool:
        state = status(primary)
        return sum(r.state == "streaming" and r.acked_revision >= state.revision
                   for r in state.replicas) >= count  # fmt: skip

    return check


def set_(node: ServerProcess, key: str, value: bytes, **fields: int) -> int:
    with node.client() as client:
        return client.set(SetRequest(key=key, value=value, **fields)).revision


def test_promote_and_replicaof_keep_every_replica_in_one_history(
    make_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Primary lost: promote the replica, repoint the other one (partial resync from
    the fork point) and the old primary (its unshipped write goes to diverged/)."""
    primary = make_server(*FAST, data_dir=tmp_path / "p").start()
    r1 = replica(make_server, tmp_path, "r1", primary.url)
    r2 = replica(make_server, tmp_path, "r2", primary.url)
    for i in range(20):
        set_(primary, f"k{i}", b"v", wait_replicas=2)
    primary.kill()

    promoted = json.loads(run_cli("promote", "--url", r1.url).stdout)
    assert promoted["epoch"] == "1"
    assert promoted["prevEndRevision"] == "20"
    assert status(r1).role == "primary"
    with pytest.raises(ConnectError) as refused:
        set_(r2, "x", b"y")
    assert refused.value.code == Code.FAILED_PRECONDITION
    assert primary.url in refused.value.message

    done = run_cli("replicaof", "--url", r2.url, "--primary", r1.url)
    assert done.returncode == 0, done.stderr
    assert set_(r1, "after", b"1", wait_replicas=1) == 21
    wait_for("r2 streaming from r1", streaming(r1, 1))
    [link] = status(r1).replicas
    assert (link.partial_resyncs, link.full_resyncs) == (1, 0)

    # The old primary comes back on its data dir (as configured: a primary) and
    # takes a write its successor never sees, then is repointed.
    old = make_server(*FAST, data_dir=tmp_path / "p", port=primary.port).start()
    assert set_(old, "lost", b"!") == 21
    assert run_cli("replicaof", "--url", old.url, "--primary", r1.url).returncode == 0
    wait_for("old primary streaming from r1", streaming(r1, 2))
    # It rewound to the fork point (revision 20) and resumed from there.
    [back] = [link for link in status(r1).replicas if link.url == old.url]
    assert (back.partial_resyncs, back.full_resyncs) == (1, 0)
    with old.client() as client:
        assert client.get(GetRequest(key="after")).revision == 21
        assert not client.get(GetRequest(key="lost")).found
    diverged = list((tmp_path / "p" / "diverged").iterdir())
    assert len(diverged) == 1
    assert "count=1" in old.log() or '"count": 1' in old.log()
    # Restarted, it stays a replica of r1 (the role set at run time is persisted).
    old.stop()
    old = make_server(*FAST, data_dir=tmp_path / "p", port=primary.port).start()
    assert status(old).role == "replica"


def test_a_primary_that_meets_a_higher_epoch_stops_taking_writes(
    make_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The old primary, still running and never told, keeps pushing to r2; r2 (now
    following the promoted r1, epoch 1) answers with its epoch and the old primary
    is fenced: its writes are refused naming the new primary."""
    primary = make_server(*FAST, data_dir=tmp_path / "p").start()
    r1 = replica(make_server, tmp_path, "r1", primary.url)
    r2 = replica(make_server, tmp_path, "r2", primary.url)
    wait_for("both replicas streaming", streaming(primary, 2))
    set_(primary, "a", b"1", wait_replicas=2)
    run_cli("promote", "--url", r1.url)
    assert run_cli("replicaof", "--url", r2.url, "--primary", r1.url).returncode == 0
    set_(r1, "b", b"2", wait_replicas=1)  # r2 is in epoch 1 now

    def fenced() -> bool:
        try:
            set_(primary, "late", b"x")
        except ConnectError as exc:
            return exc.code == Code.FAILED_PRECONDITION and r1.url in exc.message
        return False

    wait_for("the old primary fenced", fenced, timeout=30)
    ready = httpx.get(f"{primary.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert "fenced" in ready.json()["reason"]
    assert "fenced" in status(primary).fenced
    with r1.client() as client:
        assert not client.get(GetRequest(key="late")).found


def test_wait_replicas_and_min_replicas(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    primary = make_server(
        *FAST, "--min-replicas", "1", "--min-replicas-max-lag-seconds", "1",
        data_dir=tmp_path / "p",
    ).start()  # fmt: skip
    # No replica yet: writes that could be lost with the primary are refused.
    with pytest.raises(ConnectError) as refused:
        set_(primary, "k", b"v")
    assert refused.value.code == Code.UNAVAILABLE
    assert "min_replicas" in refused.value.message
    r1 = replica(make_server, tmp_path, "r1", primary.url)
    wait_for("r1 streaming", streaming(primary, 1))
    revision = set_(primary, "k", b"v", wait_replicas=1)
    with r1.client() as client:  # acknowledged by r1 means durable there already
        assert client.get(GetRequest(key="k")).revision == revision
    # Asking for more replicas than exist: committed, but deadline_exceeded says so.
    with primary.client() as client, pytest.raises(ConnectError) as short:
        client.set(SetRequest(key="k2", value=b"v", wait_replicas=2), timeout_ms=1500)
    assert short.value.code == Code.DEADLINE_EXCEEDED
    assert "only 1 of the 2" in short.value.message
    with primary.client() as client:
        assert client.get(GetRequest(key="k2")).found  # the write stays committed
    r1.kill()
    wait_for("writes refused without a healthy replica", lambda: _refused(primary), 15)


def _refused(primary: ServerProcess) -> bool:
    try:
        set_(primary, "probe", b"p")
    except ConnectError as exc:
        return exc.code == Code.UNAVAILABLE
    return False


def test_planned_switchover_under_load_loses_no_acknowledged_write(
    make_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """`kvservice failover --url P --to R` while writers run: every acknowledged write
    is on the new primary; writers are told where to go; the pause is reported."""
    primary = make_server(*FAST, data_dir=tmp_path / "p").start()
    r1 = replica(make_server, tmp_path, "r1", primary.url)
    r2 = replica(make_server, tmp_path, "r2", primary.url)
    wait_for("both replicas streaming", streaming(primary, 2))
    acked: dict[str, int] = {}
    unexpected: list[ConnectError] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        target = primary.url
        i = 0
        while not stop.is_set() and i < 2000:
            key = f"w{w}-{i}"
            try:
                with KVStoreClientSync(target, timeout_ms=5000) as client:
                    acked[key] = client.set(SetRequest(key=key, value=b"x")).revision
                i += 1
            except ConnectError as exc:
                # Refused during the switchover, by the demoted node, or by r1 in the
                # moment before its promotion: go where the message says, as a client would.
                if exc.code != Code.FAILED_PRECONDITION:
                    unexpected.append(exc)
                    return
                target = exc.message.rsplit(" ", 1)[-1]
                time.sleep(0.01)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    done = run_cli("failover", "--url", primary.url, "--to", r1.url)
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert done.returncode == 0, done.stderr
    assert not unexpected, unexpected
    report = json.loads(done.stdout)
    assert float(report["writePauseMs"]) < 5000
    assert sorted(report["repointed"]) == sorted([primary.url, r2.url])
    assert status(r1).role == "primary"
    assert status(primary).role == "replica"
    wait_for("both follow r1", streaming(r1, 2))
    for node in (r1, r2, primary):
        with node.client() as client:
            for key, revision in acked.items():
                assert client.get(GetRequest(key=key)).revision == revision, (node.url, key)


def test_an_empty_primary_never_wipes_a_replica(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A primary restarted on an empty data dir (a new history, no higher epoch) is
    refused by its replica, which keeps its data and says why; only `replicaof
    --force` lets it be replaced."""
    primary = make_server(*FAST, data_dir=tmp_path / "p").start()
    r1 = replica(make_server, tmp_path, "r1", primary.url)
    for i in range(10):
        set_(primary, f"k{i}", b"v", wait_replicas=1)
    primary.stop()
    shutil.rmtree(tmp_path / "p")
    primary = make_server(*FAST, data_dir=tmp_path / "p", port=primary.port).start()

    def refused() -> bool:
        return "refusing" in status(r1).link.last_error

    wait_for("the replica refusing the empty primary", refused)
    ready = httpx.get(f"{r1.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert "refusing" in ready.json()["reason"]
    with r1.client() as client:
        assert client.get(GetRequest(key="k9")).found  # nothing wiped
    assert status(r1).revision == 10

    assert (
        run_cli("replicaof", "--url", r1.url, "--primary", primary.url, "--force").returncode == 0
    )
    wait_for("the replica replaced by force", lambda: status(r1).revision == 0)
    with r1.client() as client:
        assert not client.get(GetRequest(key="k9")).found


def test_the_promoted_node_itself_fences_the_old_primary(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two nodes: the replica is promoted while the old primary keeps running; the old
    primary's next push meets the new epoch and it stops taking writes, also after a
    restart (the fence is persisted)."""
    primary = make_server(*FAST, data_dir=tmp_path / "p").start()
    r1 = replica(make_server, tmp_path, "r1", primary.url)
    wait_for("r1 streaming", streaming(primary, 1))
    assert run_cli("promote", "--url", r1.url).returncode == 0

    def fenced() -> bool:
        try:
            set_(primary, "late", b"x")
        except ConnectError as exc:
            return exc.code == Code.FAILED_PRECONDITION and "fenced" in exc.message
        return False

    wait_for("the old primary fenced by r1", fenced, timeout=30)
    primary.stop()
    primary = make_server(*FAST, data_dir=tmp_path / "p", port=primary.port).start()
    assert fenced()  # still fenced after a restart
    assert "fenced" in status(primary).fenced


def test_an_old_primary_partitioned_during_promotion_is_fenced_when_healed(
    make_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The primary is cut off from both replicas (TCP proxies in front of them) while r1
    is promoted and r2 repointed; it keeps acknowledging writes meanwhile. Once the
    links heal it meets the higher epoch and stops; none of its writes reach anyone."""
    proxies = [FaultProxy(free_port()).start() for _ in range(2)]
    try:
        primary = make_server(*FAST, data_dir=tmp_path / "p").start()
        replicas = [
            make_server(
                "--role",
                "replica",
                "--primary-url",
                primary.url,
                *FAST,
                "--advertise-url",
                proxy.url,
                data_dir=tmp_path / f"r{i}",
                port=proxy.upstream[1],
            ).start()
            for i, proxy in enumerate(proxies)
        ]
        r1, r2 = replicas
        wait_for("both replicas streaming", streaming(primary, 2))
        set_(primary, "before", b"1", wait_replicas=2)
        for proxy in proxies:
            proxy.cut()
        assert run_cli("promote", "--url", r1.url).returncode == 0
        assert run_cli("replicaof", "--url", r2.url, "--primary", r1.url).returncode == 0
        # Partitioned, the old primary still takes writes (it has not met epoch 1 yet).
        cut_off = [f"cut-{i}" for i in range(5)]
        for key in cut_off:
            set_(primary, key, b"x")
        for proxy in proxies:
            proxy.heal()
        after_heal: list[str] = []

        def fenced() -> bool:
            key = f"healed-{len(after_heal)}"
            try:
                set_(primary, key, b"x")
            except ConnectError as exc:
                return exc.code == Code.FAILED_PRECONDITION and "fenced" in exc.message
            after_heal.append(key)
            return False

        wait_for("the old primary fenced after the heal", fenced, timeout=30)
        time.sleep(1.0)  # any push that could carry them has had its chance
        for node in (r1, r2):
            with node.client() as client:
                assert client.get(GetRequest(key="before")).found
                for key in cut_off + after_heal:
                    assert not client.get(GetRequest(key=key)).found, (node.url, key)
    finally:
        for proxy in proxies:
            proxy.close()


def test_unplanned_failover_the_old_primary_rewinds_to_the_fork_point(tmp_path: Path) -> None:
    """P with replicas R1 and R2 is cut off (proxies) and acknowledges N writes no replica
    gets; R1 is promoted and takes M more; R2 follows R1 by partial resync; P, fenced once
    the links heal, is repointed to R1: its N entries are in diverged/, it rewinds to the
    fork point (snapshot + WAL) and resumes by exactly one partial resync and no full
    one; every node ends at the same revision and digest."""
    nodes = kv_cluster.Cluster(tmp_path)
    try:
        _unplanned_failover(nodes)
    except BaseException:
        print(nodes.logs())  # shown by pytest only when the test failed
        raise
    finally:
        nodes.close()


def _unplanned_failover(nodes: kv_cluster.Cluster) -> None:
    p, (r1, r2) = nodes.primary_with_replicas(2)
    for i in range(40):
        _set(p, f"before/{i:02d}", wait_replicas=2)
    assert run_cli("snapshot", "--url", p.url).returncode == 0  # the rewind's base
    for i in range(10):  # replayed from the WAL on top of it
        _set(p, f"before/{i:02d}", wait_replicas=2)
    fork = p.status().revision
    assert fork == 50
    for node in (r1, r2):
        assert node.proxy is not None
        node.proxy.cut()
    lost = [f"lost/{i}" for i in range(7)]
    for key in lost:  # acknowledged by P alone
        _set(p, key)

    promoted = json.loads(run_cli("promote", "--url", r1.url).stdout)
    assert int(promoted["prevEndRevision"]) == fork
    assert run_cli("replicaof", "--url", r2.url, "--primary", r1.url).returncode == 0
    for node in (r1, r2):
        assert node.proxy is not None
        node.proxy.heal()  # P meets epoch 1 through them and is fenced
    wait_for("P fenced", lambda: "fenced" in p.status().fenced, timeout=30)
    kv_cluster.wait_streaming(r1, r2)
    after = [f"after/{i}" for i in range(12)]
    for key in after:
        _set(r1, key, wait_replicas=1)
    assert _resyncs(r1, r2) == (1, 0)

    assert run_cli("replicaof", "--url", p.url, "--primary", r1.url).returncode == 0
    kv_cluster.wait_streaming(r1, p)
    revision = kv_cluster.wait_caught_up(r1, [r2, p])
    assert revision == fork + len(after)
    assert _resyncs(r1, p) == (1, 0)
    assert _resyncs(r1, r2) == (1, 0)

    [diverged] = (p.data_dir / "diverged").iterdir()
    entries = [
        LogEntry.FromString(payload)
        for _, payload in record.scan(diverged.read_bytes(), str(diverged))
    ]
    assert [e.revision for e in entries] == list(range(fork + 1, fork + len(lost) + 1))
    assert [e.key for e in entries] == lost
    [moved] = [e for e in json_lines(p.server.log()) if e["message"].startswith("entries the new")]
    assert (moved["count"], moved["after_revision"]) == (len(lost), fork)
    [rewound] = [e for e in json_lines(p.server.log()) if e["message"].startswith("rewound to")]
    assert (rewound["revision"], rewound["entries_set_aside"]) == (fork, len(lost))
    assert (rewound["base_snapshot_revision"], rewound["replayed"]) == (40, 10)

    digests = set()
    for node in (r1, r2, p):
        with AdminClientSync(node.url, timeout_ms=10_000) as admin:
            reply = admin.digest(DigestRequest(min_revision=revision))
        digests.add((reply.revision, reply.digest))
    assert len(digests) == 1, digests
    assert next(iter(digests))[0] == revision
    for node in (r2, p):
        checked = run_cli("check", "--primary", r1.url, "--replica", node.url)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with node.client() as client:
            assert not any(client.get(GetRequest(key=key)).found for key in lost)
            assert all(client.get(GetRequest(key=key)).found for key in after)


def _set(node: kv_cluster.Node, key: str, **fields: int) -> int:
    with node.client() as client:
        return client.set(SetRequest(key=key, value=key.encode(), **fields)).revision


def _resyncs(primary: kv_cluster.Node, replica: kv_cluster.Node) -> tuple[float, float]:
    """(partial, full) resyncs of `replica` counted by `primary` (its /metrics)."""
    return (
        kv_cluster.resyncs(primary, replica, "partial"),
        kv_cluster.resyncs(primary, replica, "full"),
    )


@pytest.mark.parametrize("killed", ["before COMPLETE", "after COMPLETE"])
def test_an_old_primary_killed_mid_rewind_comes_back_on_one_state_or_the_other(
    make_server, tmp_path: Path, fault_shim: Path, killed: str
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL while the rewind stages (fsyncs in resync/ stalled) or once it is staged
    (every fsync in the data dir stalled, killed as COMPLETE appears): the restarted node
    discards the staging and rewinds again, or finishes the staged rewind at start-up;
    either way it resumes by one partial resync, with its unshipped entries in
    diverged/ once."""
    p_dir, stall = tmp_path / "p", tmp_path / "stall-fsync"
    before = killed == "before COMPLETE"
    env = shim_env(fault_shim, p_dir, slow_fsync_trigger=stall,
                   slow_fsync_ms=2000 if before else 700)  # fmt: skip
    # Before: only the staging stalls. After: every fsync under the data dir, the
    # directory's own included, so the switch is still under way when COMPLETE appears.
    env["KVS_FAULT_PATH_PREFIX"] = f"{p_dir}/resync/" if before else str(p_dir)
    primary = make_server(*FAST, data_dir=p_dir, env=env).start()
    r1 = replica(make_server, tmp_path, "r1", primary.url)
    for i in range(20):
        set_(primary, f"k{i}", b"v", wait_replicas=1)
    primary.kill()
    assert run_cli("promote", "--url", r1.url).returncode == 0
    for i in range(5):
        set_(r1, f"after{i}", b"1")
    old = make_server(*FAST, data_dir=p_dir, env=env, port=primary.port).start()
    lost = [f"lost{i}" for i in range(3)]
    for key in lost:
        set_(old, key, b"!")

    stall.touch()
    assert run_cli("replicaof", "--url", old.url, "--primary", r1.url).returncode == 0
    marker = p_dir / "resync" / ("rewound.snap.tmp" if before else "COMPLETE")
    wait_for(f"the rewind stalled {killed}", marker.exists, timeout=60)
    old.kill()
    stall.unlink()
    if before:
        assert kv_cluster.stored(p_dir)[1] == 23  # the live files were not touched

    old = make_server(*FAST, data_dir=p_dir, env=env, port=primary.port).start()
    wait_for("old primary streaming from r1", streaming(r1, 1))
    log = json_lines(old.log())
    finished = [e for e in log if e["message"].startswith("finished installing a staged")]
    rewinds = [e for e in log if e["message"].startswith("rewound to the fork point")]
    assert (len(finished), len(rewinds)) == ((0, 1) if before else (1, 0))
    [back] = status(r1).replicas
    assert (back.partial_resyncs, back.full_resyncs) == (1, 0)
    [diverged] = (p_dir / "diverged").iterdir()
    keys = [LogEntry.FromString(p).key for _, p in record.scan(diverged.read_bytes(), "d")]
    assert keys == lost
    with AdminClientSync(r1.url) as a, AdminClientSync(old.url) as b:
        assert a.digest(DigestRequest()) == b.digest(DigestRequest(min_revision=25))
