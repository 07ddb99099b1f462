"""Failover benchmarks (issue 9), side by side in one run:

    python -m bench.failover            # about 2 minutes
    python -m bench.failover --smoke    # seconds

1. `Set` with `waitReplicas: 1` against plain `Set` on a primary with two
   replicas (fsync=always everywhere): throughput and p99 from wrk, 64
   connections, alternating rounds.
2. The state digest's cost: `Store.apply` with and without the digest term
   (in process, alternating rounds), against the primary's measured CPU per
   Set from case 1, so the share does not depend on the machine's load.
3. Planned switchover under load: `kvservice failover` while wrk writes to the
   primary; the write pause it reports (`writePauseMs`), over several runs.
Results: bench/results/failover.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from datetime import UTC, datetime
from pathlib import Path

from bench.load import HttpLoad, run_http
from bench.procs import cpu_seconds
from bench.replication import start_node, start_replica, wait_streaming
from bench.servers import REPO
from kvservice import engine
from kvservice.engine import Store
from kvservice.v1.kv_pb2 import SetRequest

log = logging.getLogger("bench.failover")
OUT = REPO / "bench" / "results"


def set_body(work: Path, wait_replicas: int) -> Path:
    path = work / f"set-wait{wait_replicas}.bin"
    request = SetRequest(key="bench:hot", value=b"v" * 100, wait_replicas=wait_replicas)
    path.write_bytes(request.SerializeToString())
    return path


def wait_vs_plain(work: Path, rounds: int, seconds: int, lines: list[str]) -> float:
    """Returns the primary's CPU seconds per plain Set."""
    primary = start_node(work, "w-p", work / "w-p")
    replicas = [start_replica(work, f"w-r{i}", primary) for i in (1, 2)]
    results: dict[int, list[tuple[float, float, float]]] = {0: [], 1: []}
    try:
        asyncio.run(wait_streaming(primary, 2))
        for _ in range(rounds):
            for wait in (0, 1):
                load = HttpLoad(primary.url("/kvservice.v1.KVStore/Set"), set_body(work, wait),
                                "application/proto", 64, seconds)  # fmt: skip
                before = cpu_seconds(primary.pid)
                done = run_http(load, primary.pid, "wrk")
                per_set = (cpu_seconds(primary.pid) - before) / max(1, done.requests)
                results[wait].append((done.rps, done.p99_ms or 0.0, per_set))
    finally:
        for server in (primary, *replicas):
            server.stop()
    plain = [statistics.median(x[i] for x in results[0]) for i in range(3)]
    waited = [statistics.median(x[i] for x in results[1]) for i in range(3)]
    lines += [
        "## 1. `waitReplicas: 1` against plain Set (primary + 2 replicas, fsync=always)",
        "",
        "| Set | writes/s (median) | p99 ms (median) |",
        "|---|---|---|",
        f"| plain | {plain[0]:,.0f} | {plain[1]:.2f} |",
        f"| waitReplicas: 1 | {waited[0]:,.0f} | {waited[1]:.2f} |",
        "",
        f"Ratio waited/plain: throughput **{waited[0] / plain[0]:.2f}x**, p99 "
        f"**{waited[1] / plain[1]:.2f}x** ({rounds} alternating rounds of {seconds} s, "
        "wrk 64 connections, binary protobuf).",
        "",
    ]
    return plain[2]


def digest_cost(rounds: int, set_cpu: float, lines: list[str]) -> None:
    """Store.apply of one Set with and without the digest term, interleaved; the
    minimum of many short runs (the least disturbed by whatever else runs)."""
    store = Store()
    for i in range(20_000):
        store.apply(store.next_set(f"user:{i:06d}:session", b"x" * 100))
    entry = store.next_set("user:000001:session", b"y" * 100)

    def one() -> None:
        entry.revision = store.revision + 1
        store.apply(entry)

    real = engine._term
    with_digest, without = [], []
    try:
        for _ in range(rounds * 5):
            engine._term = real
            with_digest.append(timeit.timeit(one, number=20_000) / 20_000)
            engine._term = lambda key, stored: 0
            without.append(timeit.timeit(one, number=20_000) / 20_000)
    finally:
        engine._term = real
    cost = min(with_digest) - min(without)
    lines += [
        "## 2. Cost of the state digest",
        "",
        f"`Store.apply` of a Set (19-byte key, 100-byte value), minimum of "
        f"{len(with_digest)} interleaved runs: {min(with_digest) * 1e6:.2f} us with the "
        f"digest, {min(without) * 1e6:.2f} us without: **{cost * 1e6:.2f} us** per Set; the "
        f"primary's CPU per plain Set in case 1 was {set_cpu * 1e6:.0f} us, so the digest is "
        f"**{cost / set_cpu * 100:.2f} %** of a Set (target <= 3 %).",
        "",
    ]


def switchover_pause(work: Path, runs: int, lines: list[str]) -> None:
    nodes = [start_node(work, "s-0", work / "s-0")]
    nodes += [start_replica(work, f"s-{i}", nodes[0]) for i in (1, 2)]
    pauses: list[float] = []
    try:
        asyncio.run(wait_streaming(nodes[0], 2))
        primary = 0
        for _ in range(runs):
            target = (primary + 1) % 3
            load = HttpLoad(nodes[primary].url("/kvservice.v1.KVStore/Set"), set_body(work, 0),
                            "application/proto", 32, 3)  # fmt: skip
            writer = threading.Thread(target=run_http, args=(load, nodes[primary].pid, "wrk"))
            writer.start()
            time.sleep(1.0)
            done = subprocess.run(
                [sys.executable, "-m", "kvservice", "failover", "--url", nodes[primary].url(),
                 "--to", nodes[target].url()],
                capture_output=True, text=True, timeout=120, check=True, cwd=REPO,
            )  # fmt: skip
            pauses.append(float(json.loads(done.stdout)["writePauseMs"]))
            writer.join(60)
            primary = target
            asyncio.run(wait_streaming(nodes[primary], 2))
    finally:
        for server in nodes:
            server.stop()
    lines += [
        "## 3. Planned switchover under load",
        "",
        f"`kvservice failover` while wrk writes to the primary (32 connections): writes "
        f"refused for **{statistics.median(pauses):.1f} ms** (median of {runs}; "
        f"{min(pauses):.1f}-{max(pauses):.1f} ms), the time the target needed to make the "
        "primary's last revision durable, plus its promotion.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rounds, seconds, runs = (1, 1, 1) if args.smoke else (3, 4, 5)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Failover benchmarks ({'smoke' if args.smoke else 'full'} run, {stamp})", "",
             f"Command: `python -m bench.failover{' --smoke' if args.smoke else ''}`; 2 cores "
             "shared by every process of the run.", ""]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kvs-failover-bench-") as tmp:
        work = Path(tmp)
        set_cpu = wait_vs_plain(work, rounds, seconds, lines)
        digest_cost(rounds, set_cpu, lines)
        switchover_pause(work, runs, lines)
    target = OUT / ("failover-smoke.md" if args.smoke else "failover.md")
    target.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
