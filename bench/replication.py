"""Replication benchmarks (issue 8), side by side in one run on this machine.

    python -m bench.replication              # full run (about 4 minutes)
    python -m bench.replication --smoke      # seconds, tiny counts
    python -m bench.run --only replication   # the same, from the harness (also in `make bench`)

1. CPU per 1000 writes on the primary with no replicas and with two
   (fsync=always), from the primary's own CPU time, alternating rounds: at the
   maximum rate (wrk Set, 64 connections) and at one fixed rate both setups
   sustain (bench.rateload), which compares the same offered load.
2. Replication lag at half the primary's maximum write rate: bench.rateload
   keeps that rate of Sets on the primary (a separate process, which no
   measurement waits on); a probe here writes one key every 20 ms and, from the
   primary's ack, times `Get(minRevision)` on both replicas (answered once the
   replica applied that revision). The target figure is the primary's own
   per-entry histogram `kvservice_replica_durable_lag_seconds` over the same
   window: every entry's time from its writer's acknowledgement until the
   replica acknowledged it durable (the load's entries and the probe's, both
   replicas). Then the same with the replicas at fsync=no,
   a diagnostic of how much of the lag is the replica's fsync. (An earlier
   version made every paced write itself and waited on each from one asyncio
   loop: at thousands of writes per second the loop, not replication, was the
   bottleneck, and the run did not finish.)
3. Catch-up: a replica is stopped, wrk writes at least N entries, the replica is
   restarted; entries per second from its first answer until it reaches the
   primary's revision, against the primary's maximum write rate.
4. Full resync of the bench's 1M-key data set to a new, empty replica, in
   alternating rounds with redis-server full sync (`--replicaof`) of the same
   keys on loopback: time and peak RSS of both nodes.
Every section reports the CPU the rest of the machine took meanwhile.
Results: bench/results/replication.md (smoke: replication-smoke.md).

Before/after: `--compare-repo AFTER [--kvservice-repo BEFORE] --lag-rate N` runs
the lag part (replicas at fsync=always) against both checkouts in alternating
rounds at the same paced rate and reports after/before ratios; with `--only lag`
and `--lag-rate`, nothing else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import dataset, peers, snapshot
from bench.load import HttpLoad, run_http
from bench.procs import (
    BenchError,
    Child,
    cpu_seconds,
    free_port,
    http_ok,
    machine_busy_seconds,
    peak_rss_bytes,
    rss_bytes,
)
from bench.servers import REPO, Server, await_ready, kvservice_argv, kvservice_origin, repo_env
from bench.stats import summarize
from bench.throughput import wal_counters
from kvservice.metrics import REPLICATION_LAG_BUCKETS
from kvservice.v1.admin_connect import AdminClient
from kvservice.v1.admin_pb2 import ReplicationStatusRequest
from kvservice.v1.kv_connect import KVStoreClient
from kvservice.v1.kv_pb2 import GetRequest, SetRequest

log = logging.getLogger("bench.replication")
OUT = REPO / "bench" / "results"
MiB = 1024 * 1024


@dataclass
class Plan:
    smoke: bool
    rounds: int
    seconds: int
    lag_seconds: int
    catch_up_writes: int
    resync_keys: int

    @classmethod
    def make(cls, smoke: bool) -> Plan:
        if smoke:
            return cls(True, rounds=1, seconds=1, lag_seconds=1, catch_up_writes=2000,
                       resync_keys=20_000)  # fmt: skip
        return cls(False, rounds=5, seconds=5, lag_seconds=8, catch_up_writes=200_000,
                   resync_keys=1_000_000)  # fmt: skip


@dataclass
class Results:
    lines: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, line: str = "") -> None:
        log.info(line)
        self.lines.append(line)


# -- nodes ---------------------------------------------------------------------------------


def start_node(
    work: Path, name: str, data_dir: Path, *extra: str, port: int = 0, repo: Path = REPO
) -> Server:
    """A node of `repo`'s kvservice (this checkout unless comparing), fsync=always."""
    port = port or free_port()
    argv = [*kvservice_argv(port, data_dir, "always"), "--log-format", "text", *extra]
    child = Child(name, argv, work / f"{name}.log", cwd=repo, env=repo_env(repo)).start()
    server = Server(name, child, port)
    return await_ready(server, "/healthz", lambda: http_ok(server.url("/healthz")))


def start_replica(work: Path, name: str, primary: Server, port: int = 0) -> Server:
    data_dir = work / f"{name}-data"
    return start_node(work, name, data_dir, "--role", "replica", "--primary-url", primary.url(),
                      port=port)  # fmt: skip


async def status(url: str) -> tuple[int, list[tuple[str, str, int]]]:
    async with AdminClient(url, timeout_ms=10_000) as admin:
        reply = await admin.replication_status(ReplicationStatusRequest())
    return reply.revision, [(r.url, r.state, r.acked_revision) for r in reply.replicas]


async def wait_streaming(primary: Server, replicas: int, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        revision, links = await status(primary.url())
        done = [link for link in links if link[1] == "streaming" and link[2] >= revision]
        if len(done) >= replicas:
            return
        await asyncio.sleep(0.05)
    raise BenchError(f"replicas of {primary.url()} not streaming after {limit} s")


def set_load(server: Server, work: Path, seconds: int) -> HttpLoad:
    body = work / "set.bin"
    body.write_bytes(dataset.kv_body("Set", "proto"))
    return HttpLoad(server.url("/kvservice.v1.KVStore/Set"), body, "application/proto", 64,
                    seconds)  # fmt: skip


# -- 1 and 3: CPU per write and the maximum write rate --------------------------------------

LAG_CONNECTIONS = 64  # bench.rateload's connections, as wrk's for the maximum rate
FIXED_SHARE = 0.5  # the fixed-rate comparison runs at this share of the lower maximum rate


@dataclass(frozen=True)
class CpuRun:
    """One load run against a primary: its CPU per write and what surrounded it."""

    per_k: float  # primary CPU seconds per 1000 writes
    rate: float  # writes per second
    replicas_cpu: float  # cores, both replicas together
    other_cpu: float  # cores, the rest of the machine (neither the load nor our nodes)
    writes_per_fsync: float


def _cpu_run(
    server: Server, replicas: list[Server], load: Callable[[], tuple[int, float]]
) -> CpuRun:
    """Run `load()` (-> writes acknowledged, seconds) against `server`, measured."""
    wal = wal_counters(server)
    before = cpu_seconds(server.pid)
    mirrors = sum(cpu_seconds(r.pid) for r in replicas)
    busy = machine_busy_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    writes, seconds = load()
    wall = time.monotonic() - started  # the generator's start and exit included
    busy = machine_busy_seconds() - busy
    used = cpu_seconds(server.pid) - before
    mirrored = sum(cpu_seconds(r.pid) for r in replicas) - mirrors
    done = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generator, waited for
    generator = done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime
    after = wal_counters(server)
    fsyncs = after.get("fsyncs", 0.0) - wal.get("fsyncs", 0.0)
    return CpuRun(
        per_k=used / writes * 1000,
        rate=writes / seconds,
        replicas_cpu=mirrored / wall,
        other_cpu=max(0.0, (busy - used - mirrored - generator) / wall),
        writes_per_fsync=writes / fsyncs if fsyncs else 0.0,
    )


def _wrk_load(server: Server, work: Path, seconds: int) -> Callable[[], tuple[int, float]]:
    def run() -> tuple[int, float]:
        result = run_http(set_load(server, work, seconds), server.pid, "wrk")
        return result.requests - result.errors, result.seconds

    return run


def _fixed_load(
    server: Server, work: Path, rate: float, seconds: int
) -> Callable[[], tuple[int, float]]:
    records = work / "fixed-load.txt"
    argv = [sys.executable, "-m", "bench.rateload", server.url("/kvservice.v1.KVStore/Set"),
            "--rate", f"{rate:.0f}", "--connections", str(LAG_CONNECTIONS),
            "--seconds", str(seconds), "--keys", "50000", "--out", str(records)]  # fmt: skip

    def run() -> tuple[int, float]:
        with snapshot.rate_load(argv, seconds):
            pass
        ok = sum(1 for _, _, status in snapshot.read_records(records) if status == 200)
        return ok, float(seconds)

    return run


def _cpu_table(out: Results, title: str, runs: dict[str, list[CpuRun]]) -> float:
    """Rows for "none" and "two"; returns the ratio two/none of the CPU-per-write medians."""
    out.add(title)
    out.add("")
    out.add("| replicas | CPU s / 1000 writes, median (min-max) | writes/s, median (min-max) | "
            "writes per primary fsync | replicas' CPU (cores) | other CPU (cores), median "
            "(min-max) |")  # fmt: skip
    out.add("|---|---|---|---|---|---|")
    for label in ("none", "two"):
        k = [r.per_k for r in runs[label]]
        w = [r.rate for r in runs[label]]
        o = [r.other_cpu for r in runs[label]]
        med = statistics.median
        out.add(f"| {label} | {med(k):.4f} ({min(k):.4f}-{max(k):.4f}) | "
                f"{med(w):,.0f} ({min(w):,.0f}-{max(w):,.0f}) | "
                f"{med(r.writes_per_fsync for r in runs[label]):.1f} | "
                f"{med(r.replicas_cpu for r in runs[label]):.2f} | "
                f"{med(o):.2f} ({min(o):.2f}-{max(o):.2f}) |")  # fmt: skip
    out.add("")
    none = statistics.median(r.per_k for r in runs["none"])
    return statistics.median(r.per_k for r in runs["two"]) / none


def cpu_per_write(plan: Plan, work: Path, out: Results) -> float:
    """Primary CPU seconds per 1000 writes, 0 vs 2 replicas, alternating rounds: at the
    maximum rate (wrk), then at one fixed rate both sustain (bench.rateload)."""
    alone = start_node(work, "p-alone", work / "p-alone")
    primary = start_node(work, "p-repl", work / "p-repl")
    replicas = [start_replica(work, f"r{i}", primary) for i in (1, 2)]
    pair = [("none", alone), ("two", primary)]
    peak: dict[str, list[CpuRun]] = {"none": [], "two": []}
    fixed: dict[str, list[CpuRun]] = {"none": [], "two": []}
    try:
        asyncio.run(wait_streaming(primary, 2))
        for round_no in range(plan.rounds):
            for label, server in pair[round_no % 2 :] + pair[: round_no % 2]:  # alternate order
                mirrors = replicas if label == "two" else []
                peak[label].append(_cpu_run(server, mirrors, _wrk_load(server, work, plan.seconds)))
        fixed_rate = FIXED_SHARE * min(statistics.median(r.rate for r in peak[k]) for k in peak)
        for round_no in range(plan.rounds):
            for label, server in pair[round_no % 2 :] + pair[: round_no % 2]:
                mirrors = replicas if label == "two" else []
                load = _fixed_load(server, work, fixed_rate, plan.seconds)
                fixed[label].append(_cpu_run(server, mirrors, load))
        asyncio.run(wait_streaming(primary, 2))
    finally:
        for server in (alone, primary, *replicas):
            server.stop()
    out.add("## 1. Primary CPU per 1000 writes, no replicas vs two (fsync=always)")
    out.add("")
    peak_ratio = _cpu_table(
        out, "At the maximum rate (wrk Set, Connect proto, 64 connections):", peak
    )
    out.add(f"**Ratio two/none at the maximum rate: {peak_ratio:.2f}x** (target <= 1.25x).")
    out.add("")
    fixed_ratio = _cpu_table(
        out, f"At one fixed rate, {fixed_rate:,.0f} writes/s for both ({FIXED_SHARE:.0%} of the "
        "lower maximum; bench.rateload, 64 connections):", fixed,
    )  # fmt: skip
    out.add(f"**Ratio two/none at the same rate: {fixed_ratio:.2f}x.**")
    out.add("")
    out.add(f"{plan.rounds} alternating rounds of {plan.seconds} s each. CPU = the primary "
            "process's utime+stime over a run (all threads) / writes acknowledged; replicas' "
            "CPU is theirs during the primary's runs (part of the setup, not noise); other CPU "
            "= machine busy time minus the load generator, the primary and the replicas. The "
            "maximum-rate rows compare whatever rate each setup reached on the shared cores; "
            "the fixed-rate rows compare the same offered load. Per-write costs depend on how "
            "many writes share an fsync and an event-loop pass, so compare the "
            "writes-per-fsync column too.")  # fmt: skip
    out.add("")
    out.figures["cpu_ratio"] = peak_ratio
    out.figures["cpu_ratio_fixed"] = fixed_ratio
    max_rate = statistics.median(r.rate for r in peak["none"])
    out.figures["max_write_rate"] = max_rate
    # The primary's maximum while it replicates: what "half the primary's maximum
    # write rate" means for the lag (above it the primary itself queues).
    out.figures["max_write_rate_two"] = statistics.median(r.rate for r in peak["two"])
    return max_rate


# -- 2: lag at half the maximum rate --------------------------------------------------------

PROBE_INTERVAL = 0.02  # seconds between probe writes (50/s, next to thousands of load writes)


async def _probe_lag(primary: Server, replicas: list[Server], seconds: float) -> list[float]:
    """Every PROBE_INTERVAL: one Set on the primary, then, from its ack, the time until
    each replica answers `Get(minRevision)` (= has applied it), all replicas at once.
    Few requests, so this process's own event loop never queues them."""
    waits: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        writer = await stack.enter_async_context(KVStoreClient(primary.url(), timeout_ms=10_000))
        readers = [
            await stack.enter_async_context(KVStoreClient(r.url(), timeout_ms=10_000))
            for r in replicas
        ]

        async def wait_for(reader: KVStoreClient, key: str, revision: int, acked: float) -> None:
            await reader.get(GetRequest(key=key, min_revision=revision))
            waits.append(time.perf_counter() - acked)

        start = time.monotonic()
        i = 0
        while (now := time.monotonic()) - start < seconds:
            due = start + i * PROBE_INTERVAL
            if due > now:
                await asyncio.sleep(due - now)
            key = f"probe{i % 100}"
            reply = await writer.set(SetRequest(key=key, value=b"p" * 100))
            acked = time.perf_counter()
            await asyncio.gather(*(wait_for(r, key, reply.revision, acked) for r in readers))
            i += 1
    return waits


async def _request_cost(replica: Server, count: int = 200) -> list[float]:
    """The same Get(minRevision) with nothing to wait for, on an idle replica."""
    took = []
    async with KVStoreClient(replica.url(), timeout_ms=10_000) as reader:
        for _ in range(count):
            begun = time.perf_counter()
            await reader.get(GetRequest(key="probe0", min_revision=1))
            took.append(time.perf_counter() - begun)
    return took


def _fsync_use(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> tuple[float, float]:
    """Group-commit fsyncs per second and their mean ms, from two /metrics readings."""
    count = after.get("fsyncs", 0.0) - before.get("fsyncs", 0.0)
    spent = after.get("fsync_seconds", 0.0) - before.get("fsync_seconds", 0.0)
    return count / seconds, (spent / count * 1000 if count else 0.0)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


DURABLE_LAG = "kvservice_replica_durable_lag_seconds_bucket"


def durable_lag_counts(primary: Server) -> list[int]:
    """The primary's per-entry durable-lag histogram, all replicas together: counts
    per bucket of REPLICATION_LAG_BUCKETS (not cumulative; the last one is +Inf)."""
    with urllib.request.urlopen(primary.url("/metrics"), timeout=5) as reply:
        text = reply.read().decode()
    cumulative = [0.0] * (len(REPLICATION_LAG_BUCKETS) + 1)
    bounds = [*(str(b) for b in REPLICATION_LAG_BUCKETS), "+Inf"]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == DURABLE_LAG:
                cumulative[bounds.index(sample.labels["le"])] += sample.value
    return [int(c - p) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]


def lag_quantile(counts: list[int], q: float) -> float:
    """The q-quantile in ms of a bucketed histogram, interpolated linearly inside
    its bucket (as Prometheus's histogram_quantile does)."""
    total = sum(counts)
    if not total:
        return 0.0
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(REPLICATION_LAG_BUCKETS):
                return REPLICATION_LAG_BUCKETS[-1] * 1000  # beyond the last bound
            low = REPLICATION_LAG_BUCKETS[i - 1] if i else 0.0
            high = REPLICATION_LAG_BUCKETS[i]
            return (low + (high - low) * (rank - seen) / count) * 1000
        seen += count
    return REPLICATION_LAG_BUCKETS[-1] * 1000


def lag_share_within(counts: list[int], seconds: float) -> float:
    """The share of entries at or below a bucket bound."""
    bound = REPLICATION_LAG_BUCKETS.index(seconds)
    total = sum(counts)
    return sum(counts[: bound + 1]) / total if total else 0.0


def durable_lag_figures(counts: list[int]) -> str:
    """'p50 / p99 ms, share within 25 ms, entries' for a table cell group."""
    return (f"{lag_quantile(counts, 0.5):.2f} | **{lag_quantile(counts, 0.99):.2f}** | "
            f"{lag_share_within(counts, 0.025) * 100:.2f} % | {sum(counts):,}")  # fmt: skip


@dataclass(frozen=True)
class LagRun:
    """One lag measurement: a primary with two replicas under the paced load."""

    replica_fsync: str
    durable: list[int]  # per-entry durable lag at the primary, per bucket (both replicas)
    waits: list[float]  # seconds from the primary's ack until a replica had applied
    plain: list[float]  # the same read with nothing to wait for
    served: int
    due: int
    load_p50_ms: float
    load_p99_ms: float
    cpu: list[float]  # cores: primary, replica 1, replica 2, load generator
    other_cpu: float
    fsyncs: list[tuple[float, float]]  # per node: fsyncs per second, mean ms


def _lag_run(
    plan: Plan, work: Path, rate: float, replica_fsync: str, *, repo: Path = REPO, tag: str = ""
) -> LagRun:
    tag = tag or f"lag-{replica_fsync}"
    primary = start_node(work, f"{tag}-p", work / f"{tag}-p", repo=repo)
    # A later --fsync overrides the harness's default "always" (argparse: last one wins).
    replicas = [
        start_node(work, f"{tag}-r{i}", work / f"{tag}-r{i}-data", "--role", "replica",
                   "--primary-url", primary.url(), "--fsync", replica_fsync, repo=repo)
        for i in (1, 2)
    ]  # fmt: skip
    nodes = (primary, *replicas)
    records = work / f"{tag}-load.txt"
    argv = [sys.executable, "-m", "bench.rateload", primary.url("/kvservice.v1.KVStore/Set"),
            "--rate", f"{rate:.0f}", "--connections", str(LAG_CONNECTIONS),
            "--seconds", str(plan.lag_seconds + 1), "--keys", "50000",
            "--out", str(records)]  # fmt: skip
    try:
        asyncio.run(wait_streaming(primary, 2))
        wal_before = [wal_counters(n) for n in nodes]
        cpu_before = [cpu_seconds(n.pid) for n in nodes]
        busy = machine_busy_seconds()
        started = time.monotonic()
        with snapshot.rate_load(argv, plan.lag_seconds + 1) as load:
            time.sleep(0.5)  # the load reaches its rate first
            durable_before = durable_lag_counts(primary)
            waits = asyncio.run(_probe_lag(primary, replicas, plan.lag_seconds))
            durable = [
                after - before
                for after, before in zip(durable_lag_counts(primary), durable_before, strict=True)
            ]
            # CPU over the probe's window, while the load still runs.
            elapsed = time.monotonic() - started
            cpu = [
                (cpu_seconds(n.pid) - b) / elapsed for n, b in zip(nodes, cpu_before, strict=True)
            ]
            cpu.append(cpu_seconds(load.pid) / elapsed)
            other = (machine_busy_seconds() - busy) / elapsed - sum(cpu)
            fsyncs = [
                _fsync_use(b, wal_counters(n), elapsed)
                for n, b in zip(nodes, wal_before, strict=True)
            ]
        plain = asyncio.run(_request_cost(replicas[0]))
    finally:
        for server in nodes:
            server.stop()
    loaded = snapshot.read_records(records)
    load_lat = snapshot.latencies(loaded)
    return LagRun(
        replica_fsync=replica_fsync,
        durable=durable,
        waits=waits,
        plain=plain,
        served=sum(1 for _, _, status in loaded if status == 200),
        due=len(loaded),
        load_p50_ms=load_lat.p50_ms or 0.0,
        load_p99_ms=load_lat.p99_ms or 0.0,
        cpu=cpu,
        other_cpu=max(0.0, other),
        fsyncs=fsyncs,
    )


def lag_rate(out: Results, max_rate: float) -> float:
    """Half the primary's maximum write rate with two replicas attached (when measured)."""
    return out.figures.get("max_write_rate_two", max_rate) / 2


def lag(plan: Plan, work: Path, out: Results, max_rate: float) -> None:
    """The target run (replicas at fsync=always), then the same with the replicas at
    fsync=no: a diagnostic of how much of the lag is the replicas' fsync."""
    rate = lag_rate(out, max_rate)
    max_rate = rate * 2
    runs = [_lag_run(plan, work, rate, fsync) for fsync in ("always", "no")]
    out.add("## 2. Replication lag at half the primary's maximum write rate")
    out.add("")
    out.add(f"Load: `bench.rateload` Sets on the primary (fsync=always) at {rate:,.0f}/s (half "
            f"of {max_rate:,.0f}, the maximum with two replicas attached), "
            f"{LAG_CONNECTIONS} connections, random keys of 50,000, "
            f"{plan.lag_seconds + 1} s. Durable lag: the primary's histogram "
            "`kvservice_replica_durable_lag_seconds` over the probe's window, every entry "
            "(load and probe, both replicas) from its writer's acknowledgement until the "
            "replica acknowledged it durable; quantiles interpolated inside buckets (bounds "
            "at 20, 25 and 30 ms), the share within 25 ms exact. Applied lag (probe, in this "
            f"process): every {PROBE_INTERVAL * 1000:.0f} ms one Set on the primary, then "
            "`Get(minRevision)` on both replicas from its ack (the replica answers once it "
            "has applied that revision, before its fsync). Two setups one after the other: "
            "replicas at fsync=always (the target) and, as a diagnostic, replicas at "
            "fsync=no.")  # fmt: skip
    out.add("")
    out.add("| replicas' fsync | durable lag p50 ms | durable lag p99 ms | within 25 ms | "
            "entries | applied lag (probe) p50 ms | p99 ms | max ms | waits | request cost "
            "p50 / p99 ms | load answered / due | load Set p50 / p99 ms | fsyncs/s, mean ms: "
            "primary; replica 1; replica 2 | CPU cores: primary, replicas, load "
            "| other CPU |")  # fmt: skip
    out.add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        fsyncs = "; ".join(f"{per_s:,.0f}, {mean_ms:.1f}" for per_s, mean_ms in r.fsyncs)
        out.add(f"| {r.replica_fsync} | {durable_lag_figures(r.durable)} | "
                f"{_pct(r.waits, 0.5):.2f} | {_pct(r.waits, 0.99):.2f} "
                f"| {max(r.waits) * 1000:.2f} | {len(r.waits):,} | {_pct(r.plain, 0.5):.2f} / "
                f"{_pct(r.plain, 0.99):.2f} | {r.served:,} / {r.due:,} | {r.load_p50_ms:.1f} / "
                f"{r.load_p99_ms:.1f} | {fsyncs} | {r.cpu[0]:.2f}, {r.cpu[1]:.2f} + "
                f"{r.cpu[2]:.2f}, {r.cpu[3]:.2f} | {r.other_cpu:.2f} |")  # fmt: skip
    out.add("")
    out.add("Target: p99 <= 25 ms on loopback, with the replicas at fsync=always. Request cost "
            "= the same Get(minRevision) with nothing to wait for, on an idle replica after the "
            "run. Load Set latency counts from when each request was due. Other CPU = the rest "
            "of the machine (this probe included). A replica answers a push only once its "
            "entries are durable; the primary pushes each group commit as it becomes durable, "
            "up to PUSH_WINDOW (3) pushes in flight per replica (more entries wait for an "
            "answer); the fsync=no row shows the lag with no replica fsync at all.")  # fmt: skip
    out.add("")
    out.figures["lag_p50_ms"] = lag_quantile(runs[0].durable, 0.5)
    out.figures["lag_p99_ms"] = lag_quantile(runs[0].durable, 0.99)


@dataclass(frozen=True)
class Checkout:
    label: str  # "before" or "after"
    repo: Path


def lag_compare(plan: Plan, work: Path, out: Results, rate: float, sides: list[Checkout]) -> None:
    """Lag of two checkouts at the same paced rate, replicas at fsync=always, in
    alternating rounds (so both see the same machine, noise included)."""
    runs: dict[str, list[LagRun]] = {side.label: [] for side in sides}
    for i in range(plan.rounds):
        for side in sides if i % 2 == 0 else sides[::-1]:
            tag = f"lag-{side.label}-{i}"
            runs[side.label].append(_lag_run(plan, work, rate, "always", repo=side.repo, tag=tag))
    out.add("## 2. Replication lag, before/after, at the same paced rate")
    out.add("")
    out.add(f"Load: `bench.rateload` Sets on the primary (fsync=always) at {rate:,.0f}/s, "
            f"{LAG_CONNECTIONS} connections, random keys of 50,000, {plan.lag_seconds + 1} s "
            f"per round; {plan.rounds} alternating rounds per checkout, replicas at "
            f"fsync=always. Probe as in the full run (every {PROBE_INTERVAL * 1000:.0f} ms one "
            "Set on the primary, then `Get(minRevision)` on both replicas from its ack); "
            "durable lag from the primary's histogram as in the full run. "
            + "; ".join(f"{side.label} = `{side.repo}`" for side in sides) + ".")  # fmt: skip
    out.add("")
    out.add("| checkout | durable lag p50 ms | durable lag p99 ms | within 25 ms | entries "
            "| durable p99 per round, median (min-max) | applied lag (probe) p50 ms | p99 ms "
            "| max ms | load answered / due | CPU cores: primary, "
            "replicas | primary CPU s / 1000 writes | replica fsyncs/s (~ pushes/s), median "
            "| other CPU, median (min-max) |")  # fmt: skip
    out.add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    durable: dict[str, list[int]] = {}
    for side in sides:
        rounds = runs[side.label]
        waits = [w for r in rounds for w in r.waits]
        per_round = (r.durable for r in rounds)
        counts = durable[side.label] = [sum(c) for c in zip(*per_round, strict=True)]
        p99s = summarize([lag_quantile(r.durable, 0.99) for r in rounds])
        other = summarize([r.other_cpu for r in rounds])
        primary_cpu = statistics.median(r.cpu[0] for r in rounds)
        replicas_cpu = statistics.median(r.cpu[1] + r.cpu[2] for r in rounds)
        # (A replica fsyncs once per push, or once per several pipelined ones.)
        replica_fsyncs = statistics.median(per_s for r in rounds for per_s, _ in r.fsyncs[1:])
        out.add(f"| {side.label} | {durable_lag_figures(counts)} | {p99s.median:.2f} "
                f"({p99s.low:.2f}-{p99s.high:.2f}) | {_pct(waits, 0.5):.2f} | "
                f"{_pct(waits, 0.99):.2f} | {max(waits) * 1000:.2f} | "
                f"{sum(r.served for r in rounds):,} / "
                f"{sum(r.due for r in rounds):,} | {primary_cpu:.2f}, {replicas_cpu:.2f} | "
                f"{primary_cpu / rate * 1000:.4f} | {replica_fsyncs:,.0f} | "
                f"{other.median:.2f} ({other.low:.2f}-{other.high:.2f}) |")  # fmt: skip
    before, after = (durable[side.label] for side in sides)
    cpu = [statistics.median(r.cpu[0] for r in runs[side.label]) for side in sides]
    p50s = [lag_quantile(c, 0.5) for c in (before, after)]
    p99s_all = [lag_quantile(c, 0.99) for c in (before, after)]
    out.add("")
    out.add(
        f"**Durable lag, after/before: p50 {_ratio(p50s)}, p99 {_ratio(p99s_all)}** "
        f"(target: p99 <= 25 ms); primary CPU at this rate {cpu[1] / cpu[0]:.2f}x."
    )
    out.add("")
    out.figures["lag_p50_ms"] = p50s[1]
    out.figures["lag_p99_ms"] = p99s_all[1]


def _ratio(pair: list[float]) -> str:
    """after/before, or why there is none (a checkout without the durable-lag histogram)."""
    before, after = pair
    return f"{after / before:.2f}x" if before and after else "n/a (no histogram)"


# -- 3: catch-up -------------------------------------------------------------------------------


def _write_at_least(primary: Server, work: Path, count: int, seconds: int) -> int:
    """wrk Set runs of `seconds` until the primary's revision passes `count`; returns it.
    (wrk, not a Python client: it writes several times faster on these 2 cores.)"""
    while True:
        run_http(set_load(primary, work, seconds), primary.pid, "wrk")
        revision, _ = asyncio.run(status(primary.url()))
        if revision >= count:
            return revision


async def _wait_revision(url: str, revision: int, limit: float) -> tuple[float, int]:
    """Seconds from `url`'s first answer until it reaches `revision`, and its first revision."""
    deadline = time.monotonic() + limit
    first: tuple[float, int] | None = None
    while time.monotonic() < deadline:
        try:
            current, _ = await status(url)
        except Exception:
            await asyncio.sleep(0.01)
            continue
        now = time.monotonic()
        if first is None:
            first = (now, current)
        if current >= revision:
            return now - first[0], first[1]
        await asyncio.sleep(0.01)
    raise BenchError(f"{url} did not reach revision {revision} in {limit} s")


def catch_up(plan: Plan, work: Path, out: Results, max_rate: float) -> None:
    primary = start_node(work, "cu-p", work / "cu-p", "--repl-backlog-bytes", str(512 * MiB))
    replica_port = free_port()
    replica = start_replica(work, "cu-r", primary, port=replica_port)
    try:
        asyncio.run(wait_streaming(primary, 1))
        replica.stop()
        target = _write_at_least(primary, work, plan.catch_up_writes, plan.seconds)
        pids = [primary.pid]
        with other_cpu(pids) as other:
            replica = start_replica(work, "cu-r", primary, port=replica_port)
            pids.append(replica.pid)
            seconds, begun_at = asyncio.run(_wait_revision(replica.url(), target, 600))
        full = asyncio.run(status(primary.url()))[1]
    finally:
        primary.stop()
        replica.stop()
    entries = target - begun_at
    rate = entries / seconds if seconds else float("inf")
    out.add("## 3. Catch-up after a replica was down")
    out.add("")
    out.add(f"A replica down for {target:,} writes (wrk Set, 100-byte values, runs of "
            f"{plan.seconds} s until at least {plan.catch_up_writes:,}) was restarted; from its "
            f"first answer (at revision {begun_at:,}) it caught up {entries:,} entries in "
            f"{seconds:.2f} s = **{rate:,.0f} entries/s**, **{rate / max_rate:.1f}x** the "
            f"primary's maximum write rate ({max_rate:,.0f}/s; target >= 5x). Partial resync "
            f"from the backlog (links: {full}). Other CPU meanwhile: {other[0]:.2f} "
            "cores.")  # fmt: skip
    out.add("")
    out.figures["catch_up_ratio"] = rate / max_rate


# -- 4: full resync of the 1M-key set, against redis ---------------------------------------------


@contextlib.contextmanager
def peak_rss(*pids: int) -> Iterator[dict[int, int]]:
    """Peak RSS of each process over the block (sampled every 20 ms and VmHWM)."""
    peaks = dict.fromkeys(pids, 0)
    stop = False

    async def sample() -> None:
        while not stop:
            for pid in pids:
                with contextlib.suppress(OSError, BenchError):
                    peaks[pid] = max(peaks[pid], rss_bytes(pid))
            await asyncio.sleep(0.02)

    thread = threading.Thread(target=lambda: asyncio.run(sample()), daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop = True
        thread.join()


@dataclass(frozen=True)
class Sync:
    """One full sync to a new, empty replica."""

    seconds: float
    primary_peak: int
    replica_peak: int
    other_cpu: float  # cores the rest of the machine took meanwhile


@contextlib.contextmanager
def other_cpu(pids: list[int]) -> Iterator[list[float]]:
    """Cores the machine spent outside `pids` over the block (filled in at its end);
    a pid started inside the block is counted from its start (append it to `pids`)."""
    found: list[float] = []
    before = {pid: cpu_seconds(pid) for pid in pids}
    busy, started = machine_busy_seconds(), time.monotonic()
    yield found
    ours = sum(cpu_seconds(pid) - before.get(pid, 0.0) for pid in pids)
    found.append(max(0.0, (machine_busy_seconds() - busy - ours) / (time.monotonic() - started)))


def kv_full_sync(work: Path, primary: Server, revision: int, name: str) -> Sync:
    pids = [primary.pid]
    replica: Server | None = None
    try:
        with other_cpu(pids) as other:
            started = time.monotonic()
            replica = start_replica(work, name, primary)
            pids.append(replica.pid)
            with peak_rss(primary.pid, replica.pid) as peaks:
                asyncio.run(_wait_revision(replica.url(), revision, 600))
                seconds = time.monotonic() - started
        replica_peak = max(peaks[replica.pid], peak_rss_bytes(replica.pid))
        return Sync(seconds, peaks[primary.pid], replica_peak, other[0])
    finally:
        if replica is not None:
            replica.stop()


def redis_full_sync(work: Path, master: Server, name: str) -> Sync:
    port = free_port()
    data = work / f"{name}-data"
    data.mkdir(exist_ok=True)
    argv = [*peers.redis_argv(data, port), "--replicaof", "127.0.0.1", str(master.port)]
    pids = [master.pid]
    replica: Child | None = None
    try:
        with other_cpu(pids) as other:
            started = time.monotonic()
            replica = Child(name, argv, work / f"{name}.log").start()
            pids.append(replica.pid)
            with peak_rss(master.pid, replica.pid) as peaks:
                deadline = time.monotonic() + 600
                while not _redis_synced(port):
                    if time.monotonic() > deadline:
                        raise BenchError(f"redis replica {name} not in sync after 600 s")
                    time.sleep(0.01)
                seconds = time.monotonic() - started
        return Sync(seconds, peaks[master.pid], peaks[replica.pid], other[0])
    finally:
        if replica is not None:
            replica.stop()


def _redis_synced(port: int) -> bool:
    with contextlib.suppress(BenchError):
        info = peers.redis_info(port, "replication")
        return info.get("master_link_status") == "up" and info.get("master_sync_in_progress") == "0"
    return False


def start_redis_master(work: Path, keys: int) -> Server:
    master = peers.start_redis(work, "redis-m")
    try:
        resp = dataset.write_resp_file(work / "sets.resp", keys)
        peers.redis_cli(master.port, "FLUSHALL")
        # Redis waits 5 s by default for more replicas before a diskless sync: not here.
        peers.redis_cli(master.port, "CONFIG", "SET", "repl-diskless-sync-delay", "0")
        with open(resp, "rb") as stdin:
            subprocess.run(["redis-cli", "-p", str(master.port), "--pipe"], stdin=stdin,
                           capture_output=True, check=True, timeout=600)  # fmt: skip
    except BaseException:
        master.stop()
        raise
    return master


def full_resync(plan: Plan, work: Path, out: Results) -> None:
    """kvservice and redis, one new replica each per round, alternating."""
    keys = plan.resync_keys
    data_dir = work / "fr-p"
    dataset.build_snapshot_dir(data_dir, keys)
    kv: list[Sync] = []
    rd: list[Sync] = []
    with contextlib.ExitStack() as stack:
        primary = start_node(work, "fr-p", data_dir)
        stack.callback(primary.stop)
        revision, _ = asyncio.run(status(primary.url()))
        master = None
        if peers.installed("redis-server"):
            master = start_redis_master(work, keys)
            stack.callback(master.stop)
        for round_no in range(plan.rounds):
            kv.append(kv_full_sync(work, primary, revision, f"fr-r{round_no}"))
            if master is not None:
                rd.append(redis_full_sync(work, master, f"redis-r{round_no}"))

    def row(system: str, runs: list[Sync]) -> str:
        times = [r.seconds for r in runs]
        others = [r.other_cpu for r in runs]
        return (f"| {system} | **{statistics.median(times):.2f}** ({min(times):.2f}-"
                f"{max(times):.2f}) | {max(r.primary_peak for r in runs) / MiB:,.0f} | "
                f"{max(r.replica_peak for r in runs) / MiB:,.0f} | "
                f"{statistics.median(others):.2f} "
                f"({min(others):.2f}-{max(others):.2f}) |")  # fmt: skip

    out.add(f"## 4. Full resync of {keys:,} keys (bench data set: 19-byte keys, 100-byte values)")
    out.add("")
    out.add(f"{plan.rounds} alternating rounds, a new empty replica each time; medians (min-max).")
    out.add("")
    out.add("| system | time to synced (s) | primary peak RSS (MiB) | replica peak RSS (MiB) "
            "| other CPU (cores) |")  # fmt: skip
    out.add("|---|---|---|---|---|")
    out.add(row("kvservice (replica start -> revision reached)", kv))
    if rd:
        out.add(row("redis-server `--replicaof` (start -> link up, sync done)", rd))
        ratio = statistics.median(r.seconds for r in kv) / statistics.median(r.seconds for r in rd)
        out.add("")
        out.add(f"**Ratio kvservice/redis: {ratio:.2f}x** (target <= 2x). Both include starting "
                "the replica process; redis syncs diskless (repl-diskless-sync-delay 0), its "
                "replica loads the RDB it receives.")  # fmt: skip
        out.figures["resync_ratio"] = ratio
    else:
        out.add("")
        out.add("redis-server is not installed: no comparison.")
    out.add("")


# -- main ----------------------------------------------------------------------------------------


PARTS = ("cpu", "lag", "catchup", "resync")


def run(
    plan: Plan,
    wanted: set[str],
    target: Path,
    command: str,
    *,
    compare: list[Checkout] | None = None,
    fixed_lag_rate: float = 0.0,
) -> Path:
    """Measure the `wanted` PARTS and write the results file `target`; `command` is how
    the run was started (quoted in the file). With `compare` (before, after), the lag
    part compares the two checkouts instead; `fixed_lag_rate` replaces half the
    measured maximum rate there."""
    out = Results()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.add(f"# Replication benchmarks ({'smoke' if plan.smoke else 'full'} run, {stamp})")
    out.add("")
    out.add(f"Command: `{command}`; 2 cores shared by every process of the run and by other "
            "agents' test suites (each section says how much CPU those took); fsync=always "
            "everywhere but the lag diagnostic's replicas.")  # fmt: skip
    out.add("")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvs-repl-bench-") as tmp:
        work = Path(tmp)
        max_rate = 0.0
        if wanted & {"cpu", "catchup"} or ("lag" in wanted and not fixed_lag_rate):
            max_rate = cpu_per_write(plan, work, out)
        if "lag" in wanted and compare:
            lag_compare(plan, work, out, fixed_lag_rate or lag_rate(out, max_rate), compare)
        elif "lag" in wanted:
            if fixed_lag_rate:
                out.figures["max_write_rate_two"] = 2 * fixed_lag_rate
            lag(plan, work, out, max_rate)
        if "catchup" in wanted:
            catch_up(plan, work, out, max_rate)
        if "resync" in wanted:
            full_resync(plan, work, out)
    out.add(f"Whole run: {time.monotonic() - started:.0f} s.")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(out.lines) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, seconds")
    parser.add_argument("--only", default="", help=f"comma-separated: {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=None, help="results file")
    parser.add_argument(
        "--kvservice-repo",
        type=Path,
        default=REPO,
        help="with --compare-repo: the 'before' checkout (default: this one)",
    )
    parser.add_argument(
        "--compare-repo",
        type=Path,
        default=None,
        help="the 'after' checkout: the lag part compares it with "
        "--kvservice-repo in alternating rounds",
    )
    parser.add_argument(
        "--lag-rate",
        type=float,
        default=0.0,
        help="writes/s for the lag part (default: half the measured maximum "
        "with two replicas, which needs the cpu part)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = Plan.make(args.smoke)
    wanted = set(filter(None, args.only.split(","))) or set(PARTS)
    if wanted - set(PARTS):
        parser.error(f"--only: unknown {', '.join(sorted(wanted - set(PARTS)))}")
    command = "python -m bench.replication" + " ".join(["", *(argv or sys.argv[1:])])
    target = args.out or OUT / ("replication-smoke.md" if plan.smoke else "replication.md")
    compare = None
    if args.compare_repo is not None:
        compare = [Checkout("before", args.kvservice_repo), Checkout("after", args.compare_repo)]
        for side in compare:
            kvservice_origin(side.repo)  # refuses a checkout that would import another's code
    written = run(plan, wanted, target, command, compare=compare, fixed_lag_rate=args.lag_rate)
    print(f"results: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
