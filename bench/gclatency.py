"""Get and Set latency with 1M keys loaded, under CPython's default GC and the
alternatives of bench/gcserve.py (gc.freeze() after recovery, raised thresholds).

One node per GC mode, each recovered from its own copy of the bench data set and
started through bench/gcserve.py; the cases run in the throughput module's
alternating, rotated rounds (wrk, closed loop). Around every run the harness
sends SIGUSR1 and reads the node's GC counters, so each run also reports how
many collections of each generation it made and their longest pause.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import dataset
from bench.gcserve import MODES
from bench.load import LoadResult
from bench.procs import BenchError, http_post
from bench.servers import REPO, Server, start_kvservice
from bench.throughput import CONNECT_JSON, KV_PATH, Case, HttpSpec, Settings, http_case, run_rounds

GCSERVE = REPO / "bench" / "gcserve.py"
STATS_TIMEOUT = 5.0


@dataclass
class GcNode:
    """A node started through gcserve, with its stats file."""

    mode: str
    server: Server
    stats_path: Path
    startup: dict[str, Any] = field(default_factory=dict)


@dataclass
class GcResult:
    keys: int
    repo: Path
    nodes: list[GcNode]
    cases: list[Case]
    runs: dict[str, list[LoadResult]]
    settings: Settings


def read_stats(node: GcNode) -> dict[str, Any]:
    """Ask the node for its GC counters (SIGUSR1) and wait for the new dump."""
    previous = json.loads(node.stats_path.read_text())["seq"]
    os.kill(node.server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + STATS_TIMEOUT
    while time.monotonic() < deadline:
        stats: dict[str, Any] = json.loads(node.stats_path.read_text())
        if stats["seq"] > previous:
            return stats
        time.sleep(0.005)
    raise BenchError(
        f"{node.server.system}: no GC stats after SIGUSR1:\n{node.server.child.log_tail()}"
    )


def start_node(work: Path, source: Path, mode: str, repo: Path) -> GcNode:
    data_dir = work / f"gc-data-{mode}"
    shutil.copytree(source, data_dir)
    stats = work / f"gc-{mode}.json"
    launcher = ["-P", str(GCSERVE), "--gc", mode, "--stats", str(stats), "--"]
    server = start_kvservice(work, f"kvservice-gc-{mode}", data_dir, repo=repo, launcher=launcher)
    node = GcNode(mode, server, stats)
    try:
        node.startup = json.loads(stats.read_text())
    except BaseException:
        server.stop()
        raise
    return node


def gc_case(node: GcNode, op: str, work: Path, settings: Settings) -> Case:
    """A wrk case on one node whose runs carry the GC counters they caused."""
    method = "Get" if op == "get" else "Set"
    spec = HttpSpec(
        f"gc-{node.mode}-{op}",
        f"{method} JSON, GC {node.mode}",
        op,
        node.server,
        KV_PATH + method,
        dataset.kv_body(method, "json"),
    )
    plain = http_case(spec, work, settings)

    def run(seconds: int) -> LoadResult:
        before = read_stats(node)
        result = plain.run(seconds)
        after = read_stats(node)
        extra: dict[str, float] = {}
        for gen in range(3):
            extra[f"gen{gen}"] = after["collections"][gen] - before["collections"][gen]
            extra[f"gen{gen}_ms"] = after["total_ms"][gen] - before["total_ms"][gen]
            extra[f"gen{gen}_max_ms"] = after["max_ms"][gen]
            extra[f"gen{gen}_cpu_ms"] = after["cpu_total_ms"][gen] - before["cpu_total_ms"][gen]
            extra[f"gen{gen}_cpu_max_ms"] = after["cpu_max_ms"][gen]
        # Objects allocated since the last young collection, as the run ends: with
        # requests in flight this stays under a raised threshold, which then never fires.
        extra["gen0_count"] = after["counts"][0]
        return dataclasses.replace(result, extra=extra)

    return dataclasses.replace(plain, run=run)


def measure(
    work: Path, keys: int, settings: Settings, repo: Path = REPO, modes: tuple[str, ...] = MODES
) -> GcResult:
    source = work / "gc-source"
    dataset.build_snapshot_dir(source, keys)
    nodes: list[GcNode] = []
    try:
        for mode in modes:
            nodes.append(start_node(work, source, mode, repo))
        for node in nodes:
            if node.startup.get("kvservice") != str((repo / "kvservice").resolve()):
                raise BenchError(f"gcserve imported {node.startup.get('kvservice')}, not {repo}")
        # Get reads HOT_KEY: write the value the Get cases expect (the data set has its own).
        for node in nodes:
            http_post(
                node.server.url(KV_PATH + "Set"), dataset.kv_body("Set", "json"), CONNECT_JSON
            )
        cases = [gc_case(node, op, work, settings) for op in ("get", "set") for node in nodes]
        runs = run_rounds(cases, settings)
    finally:
        for node in nodes:
            node.server.stop()
    shutil.rmtree(source, ignore_errors=True)
    return GcResult(keys, repo, nodes, cases, runs, settings)
