"""Replication benchmarks (issue 8), side by side in one run on this machine.

    python -m bench.replication              # full run (about 5 minutes)
    python -m bench.replication --smoke      # seconds, tiny counts

1. CPU per 1000 writes on the primary with no replicas and with two
   (fsync=always), from the server's own CPU time, so the figure does not depend
   on what else runs: wrk drives Set at 64 connections, alternating rounds.
2. Replication lag at half the primary's measured maximum write rate: a paced
   writer sets a key on the primary and, as soon as it is acknowledged, asks a
   replica for it with `minRevision` (which answers once the replica applied
   that revision); p50/p99 of that wait, next to the same read when nothing
   has to be waited for.
3. Catch-up: a replica that was down for N writes is restarted; entries per
   second until it reaches the primary's revision, against the primary's
   maximum write rate.
4. Full resync of the bench's 1M-key data set to an empty replica: time and
   peak RSS of both nodes, against redis-server full sync (`--replicaof`) of
   the same keys on loopback.
Results: bench/results/replication.md (and a dated copy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench import dataset, peers
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
from bench.servers import REPO, Server, await_ready, kvservice_argv
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
        return cls(False, rounds=3, seconds=5, lag_seconds=8, catch_up_writes=200_000,
                   resync_keys=1_000_000)  # fmt: skip


@dataclass
class Results:
    lines: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    def add(self, line: str = "") -> None:
        log.info(line)
        self.lines.append(line)


# -- nodes ---------------------------------------------------------------------------------


def start_node(work: Path, name: str, data_dir: Path, *extra: str, port: int = 0) -> Server:
    port = port or free_port()
    argv = [*kvservice_argv(port, data_dir, "always"), "--log-format", "text", *extra]
    child = Child(name, argv, work / f"{name}.log", cwd=REPO).start()
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


def cpu_per_write(plan: Plan, work: Path, out: Results) -> float:
    """Primary CPU seconds per 1000 writes, 0 vs 2 replicas, alternating rounds."""
    alone = start_node(work, "p-alone", work / "p-alone")
    primary = start_node(work, "p-repl", work / "p-repl")
    replicas = [start_replica(work, f"r{i}", primary) for i in (1, 2)]
    try:
        asyncio.run(wait_streaming(primary, 2))
        per_k: dict[str, list[float]] = {"none": [], "two": []}
        rates: dict[str, list[float]] = {"none": [], "two": []}
        others: list[float] = []
        for _ in range(plan.rounds):
            for label, server in (("none", alone), ("two", primary)):
                before = cpu_seconds(server.pid)
                result = run_http(set_load(server, work, plan.seconds), server.pid, "wrk")
                used = cpu_seconds(server.pid) - before
                per_k[label].append(used / result.requests * 1000)
                rates[label].append(result.rps)
                others.append(result.other_cpu)
        asyncio.run(wait_streaming(primary, 2))
    finally:
        for server in (alone, primary, *replicas):
            server.stop()
    none, two = statistics.median(per_k["none"]), statistics.median(per_k["two"])
    out.add("## 1. Primary CPU per 1000 writes (fsync=always, wrk Set, 64 connections)")
    out.add("")
    out.add("| replicas | CPU s / 1000 writes (median) | writes/s (median) |")
    out.add("|---|---|---|")
    out.add(f"| none | {none:.4f} | {statistics.median(rates['none']):,.0f} |")
    out.add(f"| two | {two:.4f} | {statistics.median(rates['two']):,.0f} |")
    out.add("")
    out.add(f"**Ratio two/none: {two / none:.2f}x** (target <= 1.25x). "
            f"{plan.rounds} alternating rounds of {plan.seconds} s; other CPU on the machine "
            f"{statistics.median(others):.2f} cores (replicas included).")  # fmt: skip
    out.add("")
    out.figures["cpu_ratio"] = two / none
    max_rate = statistics.median(rates["none"])
    out.figures["max_write_rate"] = max_rate
    return max_rate


# -- 2: lag at half the maximum rate --------------------------------------------------------


async def _lag_run(
    primary: Server, replica: Server, rate: float, seconds: float
) -> dict[str, list[float]]:
    waits: list[float] = []
    plain: list[float] = []
    async with (
        KVStoreClient(primary.url(), timeout_ms=10_000) as writer,
        KVStoreClient(replica.url(), timeout_ms=10_000) as reader,
    ):
        interval = 1.0 / rate
        start = time.monotonic()
        pending: set[asyncio.Task[None]] = set()

        async def one(i: int) -> None:
            reply = await writer.set(SetRequest(key=f"lag{i % 1000}", value=b"v" * 100))
            acked = time.perf_counter()
            await reader.get(GetRequest(key=f"lag{i % 1000}", min_revision=reply.revision))
            waits.append(time.perf_counter() - acked)
            begun = time.perf_counter()
            await reader.get(GetRequest(key=f"lag{i % 1000}", min_revision=reply.revision))
            plain.append(time.perf_counter() - begun)

        i = 0
        while (now := time.monotonic()) - start < seconds:
            due = start + i * interval
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        await asyncio.gather(*pending)
    return {"wait": waits, "plain": plain}


def lag(plan: Plan, work: Path, out: Results, max_rate: float) -> None:
    primary = start_node(work, "lag-p", work / "lag-p")
    replicas = [start_replica(work, f"lag-r{i}", primary) for i in (1, 2)]
    try:
        asyncio.run(wait_streaming(primary, 2))
        rate = max_rate / 2
        busy = machine_busy_seconds()
        started = time.monotonic()
        samples = asyncio.run(_lag_run(primary, replicas[0], rate, plan.lag_seconds))
        other = (machine_busy_seconds() - busy) / (time.monotonic() - started)
    finally:
        for server in (primary, *replicas):
            server.stop()
    waits = sorted(samples["wait"])
    plain = sorted(samples["plain"])

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    out.add("## 2. Replication lag at half the primary's maximum write rate")
    out.add("")
    out.add(f"Paced writer at {rate:,.0f} writes/s (half of {max_rate:,.0f}) against a primary "
            f"with two replicas, {len(waits):,} writes over {plan.lag_seconds} s; machine busy "
            f"{other:.2f} cores (all processes: primary, replicas, this writer).")  # fmt: skip
    out.add("")
    out.add("| from the primary's ack until | p50 ms | p99 ms |")
    out.add("|---|---|---|")
    out.add(f"| the replica answers `Get(minRevision)` (applied) | {pct(waits, 0.5):.2f} | "
            f"{pct(waits, 0.99):.2f} |")  # fmt: skip
    out.add(f"| same read with nothing to wait for (request cost) | {pct(plain, 0.5):.2f} | "
            f"{pct(plain, 0.99):.2f} |")  # fmt: skip
    out.add("")
    out.add("The replica applies an entry, then makes it durable (its own group-commit fsync) "
            "before acknowledging; the read answers at apply, one fsync earlier.")  # fmt: skip
    out.add("")
    out.figures["lag_p50_ms"] = pct(waits, 0.5)
    out.figures["lag_p99_ms"] = pct(waits, 0.99)


# -- 3: catch-up -------------------------------------------------------------------------------


async def _write_many(url: str, count: int, concurrency: int = 64) -> None:
    async with KVStoreClient(url, timeout_ms=30_000) as client:
        next_i = iter(range(count))

        async def worker() -> None:
            for i in next_i:
                await client.set(SetRequest(key=f"c{i % 50_000}", value=b"c" * 100))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


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
        asyncio.run(_write_many(primary.url(), plan.catch_up_writes))
        target, _ = asyncio.run(status(primary.url()))
        replica = start_replica(work, "cu-r", primary, port=replica_port)
        seconds, begun_at = asyncio.run(_wait_revision(replica.url(), target, 600))
        full = asyncio.run(status(primary.url()))[1]
    finally:
        primary.stop()
        replica.stop()
    entries = target - begun_at
    rate = entries / seconds if seconds else float("inf")
    out.add("## 3. Catch-up after a replica was down")
    out.add("")
    out.add(f"A replica down for {plan.catch_up_writes:,} writes (100-byte values) caught up "
            f"{entries:,} entries in {seconds:.2f} s = **{rate:,.0f} entries/s**, "
            f"**{rate / max_rate:.1f}x** the primary's maximum write rate ({max_rate:,.0f}/s; "
            f"target >= 5x). Partial resync from the backlog (links: {full}).")  # fmt: skip
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


def full_resync(plan: Plan, work: Path, out: Results) -> None:
    keys = plan.resync_keys
    data_dir = work / "fr-p"
    dataset.build_snapshot_dir(data_dir, keys)
    primary = start_node(work, "fr-p", data_dir)
    replica: Server | None = None
    try:
        revision, _ = asyncio.run(status(primary.url()))
        replica_port = free_port()
        started = time.monotonic()
        replica = start_replica(work, "fr-r", primary, port=replica_port)
        with peak_rss(primary.pid, replica.pid) as peaks:
            asyncio.run(_wait_revision(replica.url(), revision, 600))
            seconds = time.monotonic() - started
        kv = (seconds, peaks[primary.pid], max(peaks[replica.pid], peak_rss_bytes(replica.pid)))
    finally:
        primary.stop()
        if replica is not None:
            replica.stop()
    redis = redis_full_sync(work, keys)
    out.add(f"## 4. Full resync of {keys:,} keys (bench data set: 19-byte keys, 100-byte values)")
    out.add("")
    out.add("| system | time to synced (s) | primary peak RSS (MiB) | replica peak RSS (MiB) |")
    out.add("|---|---|---|---|")
    out.add(f"| kvservice (replica start -> revision reached) | {kv[0]:.2f} | {kv[1] / MiB:,.0f} | "
            f"{kv[2] / MiB:,.0f} |")  # fmt: skip
    if redis is not None:
        out.add(f"| redis-server `--replicaof` (start -> link up, sync done) | {redis[0]:.2f} | "
                f"{redis[1] / MiB:,.0f} | {redis[2] / MiB:,.0f} |")  # fmt: skip
        out.add("")
        out.add(f"**Ratio kvservice/redis: {kv[0] / redis[0]:.2f}x** (target <= 2x). Both "
                "include starting the replica process.")  # fmt: skip
        out.figures["resync_ratio"] = kv[0] / redis[0]
    else:
        out.add("")
        out.add("redis-server is not installed: no comparison.")
    out.add("")


def redis_full_sync(work: Path, keys: int) -> tuple[float, int, int] | None:
    if not peers.installed("redis-server"):
        return None
    master = peers.start_redis(work, "redis-m")
    replica_child: Child | None = None
    try:
        resp = dataset.write_resp_file(work / "sets.resp", keys)
        peers.redis_cli(master.port, "FLUSHALL")
        # Redis waits 5 s by default for more replicas before a diskless sync: not here.
        peers.redis_cli(master.port, "CONFIG", "SET", "repl-diskless-sync-delay", "0")
        with open(resp, "rb") as stdin:
            subprocess.run(["redis-cli", "-p", str(master.port), "--pipe"], stdin=stdin,
                           capture_output=True, check=True, timeout=600)  # fmt: skip
        port = free_port()
        data = work / "redis-r-data"
        data.mkdir(exist_ok=True)
        argv = [*peers.redis_argv(data, port), "--replicaof", "127.0.0.1", str(master.port)]
        started = time.monotonic()
        replica_child = Child("redis-r", argv, work / "redis-r.log").start()
        with peak_rss(master.pid, replica_child.pid) as peaks:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with contextlib.suppress(BenchError):
                    info = peers.redis_info(port, "replication")
                    if (
                        info.get("master_link_status") == "up"
                        and info.get("master_sync_in_progress") == "0"
                    ):
                        break
                time.sleep(0.01)
            seconds = time.monotonic() - started
        return seconds, peaks[master.pid], peaks[replica_child.pid]
    finally:
        master.stop()
        if replica_child is not None:
            replica_child.stop()


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, seconds")
    parser.add_argument("--only", default="", help="comma-separated: cpu,lag,catchup,resync")
    parser.add_argument("--out", type=Path, default=None, help="results file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = Plan.make(args.smoke)
    wanted = set(filter(None, args.only.split(","))) or {"cpu", "lag", "catchup", "resync"}
    out = Results()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.add(f"# Replication benchmarks ({'smoke' if plan.smoke else 'full'} run, {stamp})")
    out.add("")
    out.add(f"Command: `python -m bench.replication{' --smoke' if plan.smoke else ''}"
            f"{' --only ' + args.only if args.only else ''}`; 2 cores shared by every "
            "process of the run; fsync=always everywhere.")  # fmt: skip
    out.add("")
    with tempfile.TemporaryDirectory(prefix="kvs-repl-bench-") as tmp:
        work = Path(tmp)
        max_rate = 0.0
        if wanted & {"cpu", "lag", "catchup"}:
            max_rate = cpu_per_write(plan, work, out)
        if "lag" in wanted:
            lag(plan, work, out, max_rate)
        if "catchup" in wanted:
            catch_up(plan, work, out, max_rate)
        if "resync" in wanted:
            full_resync(plan, work, out)
    target = args.out or OUT / ("replication-smoke.md" if plan.smoke else "replication.md")
    target.write_text("\n".join(out.lines) + "\n")
    print(f"results: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
