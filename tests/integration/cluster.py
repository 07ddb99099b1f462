"""A replication cluster of real `kvservice serve` processes on loopback, for the
replication tests: a primary, replicas each behind a FaultProxy (the primary
reaches a replica only through its proxy, so the proxy cuts, stalls or replays
the primary -> replica link), and the checks every scenario ends with.

Processes and proxies are started and stopped only through this module; a
Cluster kills (by PID) what it started when closed.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvservice.storage import record
from kvservice.storage.recovery import recover
from kvservice.storage.segments import list_segments, segment_revision
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import ReplicationStatusRequest, ReplicationStatusResponse
from kvservice.v1.kv_connect import KVStoreClientSync
from kvservice.v1.log_pb2 import LogEntry
from tests.faults.proxy import FaultProxy
from tests.faults.workload import State, read_states
from tests.integration.conftest import PortTaken, ServerProcess, free_port, wait_for

T = TypeVar("T")

# Metric samples keyed by (name, labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Fast failure detection and retries, so faults heal within a test's budget (every node
# gets the same heartbeat: a replica re-announces itself after a few silent ones).
HEARTBEAT = ("--repl-heartbeat-seconds", "0.2")
PRIMARY_FLAGS = (*HEARTBEAT, "--repl-retry-max-seconds", "0.5")
REPLICA_FLAGS = (*HEARTBEAT, "--replica-max-lag-seconds", "2")
# The settings that make a primary's backlog run out quickly (see DESIGN.md, Replication).
SMALL_BACKLOG = (
    "--repl-backlog-bytes", "4096", "--wal-segment-bytes", "4096",
    "--snapshot-threshold-bytes", "8192",
)  # fmt: skip


def parse_metrics(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@dataclass
class Node:
    """One node of the cluster: its process and, for a replica, the proxy in front of it."""

    name: str
    server: ServerProcess
    role: str
    proxy: FaultProxy | None = None
    primary: Node | None = None  # a replica's primary
    extra: tuple[str, ...] = ()
    # A replica that announces itself (--primary-url); otherwise only its primary's
    # --replicas list links them.
    announce: bool = True
    # The primary URL the running process was given (a replica's; "" otherwise).
    spawned_with: str = ""

    @property
    def url(self) -> str:
        """Direct URL (what clients and the tests use)."""
        return self.server.url

    @property
    def advertise_url(self) -> str:
        """How the primary reaches this node: through its proxy when it has one."""
        return self.proxy.url if self.proxy is not None else self.server.url

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def alive(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Node:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (see wait_ready)."""
        self.server.args = self._args()
        self.spawned_with = self.primary.url if self.primary is not None else ""
        self.server.start(wait=False)

    def wait_ready(self, timeout: float = 30.0) -> Node:
        try:
            self.server.wait_ready(timeout)
        except PortTaken:  # another process took the port between probe and bind
            self.server.port = free_port()
            self.server.start(timeout=timeout)
            if self.proxy is not None:
                self.proxy.upstream = ("127.0.0.1", self.server.port)
        return self

    def _args(self) -> list[str]:
        args = ["--role", self.role]
        if self.role == "primary":
            args += PRIMARY_FLAGS
        else:
            assert self.primary is not None
            if self.announce:
                args += ["--primary-url", self.primary.url]
            args += ["--advertise-url", self.advertise_url, *REPLICA_FLAGS]
        return [*args, *self.extra]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM; the node must exit cleanly within `timeout` (else it is killed)."""
        try:
            code = self.server.stop(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} still running {timeout}s after SIGTERM:\n{self.log_tail()}"
            ) from None
        assert code == 0, f"{self.name} exited with {code}:\n{self.log_tail()}"

    def kill(self) -> None:
        """SIGKILL."""
        self.server.kill()

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or SIGKILL) and start again on the same port and data dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.server.log().splitlines()[-lines:])

    # -- talking to it ------------------------------------------------------------------

    def client(self, timeout_ms: int = 10_000) -> KVStoreClientSync:
        return KVStoreClientSync(self.url, proto_json=False, timeout_ms=timeout_ms)

    def status(self) -> ReplicationStatusResponse:
        with AdminClientSync(self.url, proto_json=False, timeout_ms=5_000) as admin:
            return admin.replication_status(ReplicationStatusRequest())

    def metrics(self) -> Samples:
        reply = httpx.get(f"{self.url}/metrics", timeout=5)
        reply.raise_for_status()
        return parse_metrics(reply.text)

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value; 0 when the series does not exist (yet)."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def ready(self) -> tuple[int, dict[str, Any]]:
        """(status code, JSON body) of /readyz."""
        reply = httpx.get(f"{self.url}/readyz", timeout=5)
        try:
            body = reply.json()
        except json.JSONDecodeError:
            body = {"raw": reply.text}
        return reply.status_code, body

    def states(self, keys: Iterable[str]) -> dict[str, State]:
        return read_states(self.url, sorted(keys))


@dataclass
class Cluster:
    """Nodes under one temporary directory. close() kills whatever is still running."""

    root: Path
    nodes: list[Node] = field(default_factory=list)
    proxies: list[FaultProxy] = field(default_factory=list)

    def add_primary(self, name: str = "primary", *extra: str, start: bool = True) -> Node:
        node = Node(name, self._server(name), "primary", extra=extra)
        self.nodes.append(node)
        return node.start() if start else node

    def add_replica(
        self, primary: Node, name: str | None = None, *extra: str, start: bool = True,
        data_dir: Path | None = None,
    ) -> Node:  # fmt: skip
        """A replica of `primary` behind its own FaultProxy (its advertised URL)."""
        name = name or f"replica{sum(n.role == 'replica' for n in self.nodes) + 1}"
        server = self._server(name, data_dir)
        proxy = FaultProxy(server.port).start()
        self.proxies.append(proxy)
        node = Node(name, server, "replica", proxy=proxy, primary=primary, extra=extra)
        self.nodes.append(node)
        return node.start() if start else node

    def start(self, *nodes: Node) -> None:
        """Start nodes side by side (each start is mostly Python imports) and wait for all.
        A primary whose port was taken comes up on another one: a replica spawned with
        the old URL is started again with the new one."""
        for node in nodes:
            node.spawn()
        for node in sorted(nodes, key=lambda n: n.role != "primary"):  # primaries first
            if node.primary is not None and node.announce and node.primary.url != node.spawned_with:
                node.server.kill()
                node.spawn()
            node.wait_ready()

    def primary_with_replicas(
        self, count: int, primary_extra: tuple[str, ...] = (), replica_extra: tuple[str, ...] = ()
    ) -> tuple[Node, list[Node]]:
        """A primary and `count` replicas, started together, every link streaming."""
        primary = self.add_primary("primary", *primary_extra, start=False)
        replicas = [
            self.add_replica(primary, None, *replica_extra, start=False) for _ in range(count)
        ]
        self.start(primary, *replicas)
        for replica in replicas:
            wait_streaming(primary, replica)
        return primary, replicas

    def black_hole(self, name: str = "nowhere") -> Node:
        """A stand-in primary that accepts connections and never answers (a FaultProxy in
        black-hole mode); never started, it only gives replicas a URL to point at."""
        hole = FaultProxy(free_port()).start()
        self.proxies.append(hole)
        hole.blackhole()
        return Node(name, ServerProcess(data_dir=self.root / name, port=hole.port), "primary")

    def _server(self, name: str, data_dir: Path | None = None) -> ServerProcess:
        return ServerProcess(data_dir=data_dir or self.root / name, port=free_port())

    @property
    def primaries(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "primary"]

    @property
    def replicas(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "replica"]

    def close(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.kill()
        for proxy in self.proxies:
            proxy.close()

    def logs(self) -> str:
        return "\n\n".join(f"== {n.name} ({n.url})\n{n.log_tail()}" for n in self.nodes)


# -- what the primary says about a replica ------------------------------------------------


def replica_status(primary: Node, replica: Node) -> Any:
    """The primary's ReplicaStatus entry for `replica` (None when it has none)."""
    for entry in primary.status().replicas:
        if entry.url == replica.advertise_url:
            return entry
    return None


def resyncs(primary: Node, replica: Node, kind: str) -> float:
    """kvservice_replication_resyncs_total{replica, kind} on the primary."""
    return primary.metric(
        "kvservice_replication_resyncs_total", replica=replica.advertise_url, kind=kind
    )


def retries(primary: Node, replica: Node) -> float:
    return primary.metric("kvservice_replication_retries_total", replica=replica.advertise_url)


def wait_streaming(primary: Node, replica: Node, timeout: float = 30.0) -> None:
    """Wait until both ends of the link say `streaming`."""

    def both() -> bool:
        entry = replica_status(primary, replica)
        return (
            entry is not None
            and entry.state == "streaming"
            and replica.status().link.state == "streaming"
        )

    wait_for(f"{replica.name} streaming from {primary.name}", both, timeout)


# -- convergence --------------------------------------------------------------------------


def wait_caught_up(primary: Node, replicas: list[Node], timeout: float = 30.0) -> int:
    """Wait until every replica applied, and the primary saw acknowledged, the primary's
    revision (the load must have stopped); return that revision."""
    target = primary.status().revision

    def caught_up() -> bool:
        for replica in replicas:
            if replica.status().revision != target:
                return False
            entry = replica_status(primary, replica)
            if entry is None or entry.acked_revision != target:
                return False
        return True

    try:
        wait_for(f"replicas at revision {target}", caught_up, timeout)
    except AssertionError as exc:
        seen = {r.name: _safe(lambda r=r: r.status().revision) for r in replicas}
        raise AssertionError(f"{exc}\nreplica revisions: {seen}") from None
    assert primary.status().revision == target, "the primary took writes while converging"
    return target


def _safe(fn: Callable[[], T]) -> T | str:
    try:
        return fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def assert_converged(
    primary: Node, replicas: list[Node], keys: Iterable[str], timeout: float = 30.0
) -> dict[str, State]:
    """Every node reports the primary's revision and answers every key in `keys`
    identically (value and revision). Returns the primary's states."""
    revision = wait_caught_up(primary, replicas, timeout)
    keys = sorted(set(keys))
    expected = primary.states(keys)
    for replica in replicas:
        got = replica.states(keys)
        wrong = [(k, got[k], expected[k]) for k in keys if got[k] != expected[k]]
        assert not wrong, (
            f"{replica.name} differs from {primary.name} on {len(wrong)} of {len(keys)} keys "
            f"(key, replica, primary): {wrong[:5]}"
        )
        assert replica.status().revision == revision
    return expected


# -- offline checks (nodes stopped) -------------------------------------------------------


def stored(data_dir: Path) -> tuple[dict[str, bytes], int]:
    """Everything a stopped node's data dir holds (key -> revision-prefixed value) and its
    revision, by the same read-only recovery `kvservice wal check` runs."""
    recovery = recover(data_dir, repair_tail=False)
    return dict(recovery.store.data), recovery.store.revision


def assert_same_store(a: Path, b: Path) -> int:
    """Two stopped nodes hold exactly the same keys, values and revisions."""
    data_a, rev_a = stored(a)
    data_b, rev_b = stored(b)
    assert rev_a == rev_b, f"revision {rev_a} in {a} but {rev_b} in {b}"
    only_a = sorted(data_a.keys() - data_b.keys())
    only_b = sorted(data_b.keys() - data_a.keys())
    differ = sorted(k for k in data_a.keys() & data_b.keys() if data_a[k] != data_b[k])
    assert not only_a, f"{len(only_a)} keys only in {a}: {only_a[:5]}"
    assert not only_b, f"{len(only_b)} keys only in {b}: {only_b[:5]}"
    assert not differ, f"{len(differ)} keys differ between {a} and {b}: {differ[:5]}"
    return rev_a


def wal_revisions(data_dir: Path) -> list[int]:
    """Revisions of every WAL record in a stopped node's data dir, in file order; checks
    each segment starts at the revision its name says."""
    revisions: list[int] = []
    for segment in list_segments(data_dir / "wal"):
        first = True
        for _, payload in record.scan(segment.read_bytes(), str(segment)):
            entry = LogEntry.FromString(payload)
            if first:
                assert entry.revision == segment_revision(segment), (
                    f"{segment.name} starts at revision {entry.revision}"
                )
                first = False
            revisions.append(entry.revision)
    return revisions


def assert_consecutive(revisions: list[int], what: str) -> None:
    """No revision twice, none skipped."""
    gaps = [(a, b) for a, b in itertools.pairwise(revisions) if b != a + 1]
    assert not gaps, f"{what}: WAL revisions not consecutive at {gaps[:10]}"
