"""Scan and its key index through real servers, side by side with a checkout without it.

    git clone -q . /tmp/kv-base && git -C /tmp/kv-base checkout -q main
    python -m bench.scan --base-repo /tmp/kv-base [--keys 1000000] [--rounds 5] [--seconds 4]

Both servers recover the same data dir (the bench's 1M keys, dataset.py), then:
- memory per key: RSS of a loaded node minus an empty one, each checkout;
- restart time to /readyz 200 with the keys in sorted insertion order (as
  dataset.py writes them) and shuffled, plus a 100k-record WAL tail; then the
  time of the first Scan (which builds the index) and of the second;
- Set throughput and server CPU per request, alternating rounds: Sets that create
  keys at random places of the order (the only Sets that touch the index) and
  Sets that overwrite one key;
- Scan of 100-key pages from random places of the 1M keys (JSON and protobuf, with
  values and keys only) on this checkout, beside a Get in the same rounds.
Results are printed as JSON; bench/results/scan.md holds a run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import dataset, recovery
from bench.load import CpuWindow, HttpLoad, wrk_argv
from bench.procs import BenchError, http_post, rss_bytes, run_measured
from bench.servers import REPO, Server, kvservice_origin, start_kvservice
from bench.throughput import CONNECT_JSON, KV_PATH
from kvservice.engine import pack
from kvservice.storage.snapshot import write_snapshot

TAG = "SCAN_BENCH"
CONNECTIONS = 64
DONE = f"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("{TAG} %d %d %d\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""
VALUE_B64 = base64.b64encode(dataset.HOT_VALUE).decode()


def set_new_keys_script(seed: int) -> str:
    """Sets of keys that do not exist yet, at random places of the sorted order."""
    return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
math.randomseed({seed})
local n = 0
request = function()
  n = n + 1
  local body = string.format('{{"key":"user:%06d:typing:{seed}:%d","value":"{VALUE_B64}"}}',
    math.random(0, 999999), n)
  return wrk.format(nil, nil, nil, body)
end
{DONE}"""


def fixed_body_script(content_type: str, body: str) -> str:
    return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
wrk.body = {body}
{DONE}"""


def scan_script(keys: int, codec: str, keys_only: bool) -> str:
    """100-key pages of prefix "user:" starting after a random key of the data set."""
    if codec == "json":
        only = ',"keysOnly":true' if keys_only else ""
        make = f"""string.format('{{"prefix":"user:","startAfter":"user:%06d:session","limit":100{only}}}', math.random(0, {keys - 1}))"""  # noqa: E501
        content_type = CONNECT_JSON
    else:
        # ScanRequest in protobuf: 1 prefix "user:", 2 start_after (19 bytes), 3 limit 100,
        # 4 keys_only.
        only = '.. "\\x20\\x01"' if keys_only else ""
        make = f""""\\x0a\\x05user:" .. "\\x12\\x13" .. string.format("user:%06d:session", math.random(0, {keys - 1})) .. "\\x18\\x64" {only}"""  # noqa: E501
        content_type = "application/proto"
    return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
math.randomseed(7)
request = function()
  return wrk.format(nil, nil, nil, {make})
end
{DONE}"""


@dataclass(frozen=True)
class Run:
    requests: int
    seconds: float
    server_cpu: float  # cores
    other_cpu: float  # cores used by everything else on the machine

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu * self.seconds / self.requests * 1e6


def run_wrk(server: Server, path: str, script: str, work: Path, seconds: int) -> Run:
    lua = work / f"case-{time.monotonic_ns()}.lua"
    lua.write_text(script)
    argv = wrk_argv(HttpLoad(server.url(path), lua, "", CONNECTIONS, seconds), lua)
    with CpuWindow(server.pid) as cpu:
        done = run_measured(argv, timeout=seconds + 30)
    server_cores, _, other = cpu.cores(done)
    for line in done.stdout.splitlines():
        if line.startswith(TAG + " "):
            requests, duration_us, errors = (int(v) for v in line.split()[1:])
            if errors:
                raise BenchError(f"{errors} errors in {path}: {done.stdout[-500:]}")
            return Run(requests, duration_us / 1e6, server_cores, other)
    raise BenchError(f"wrk printed no result: {done.stdout[-1000:]} {done.stderr[-1000:]}")


def build_data_dir(data_dir: Path, keys: int, order: str, wal_records: int) -> None:
    """The bench's keys as one snapshot in `order` insertion order, plus a WAL tail."""
    ids = list(range(keys))
    if order == "shuffled":
        random.Random(1).shuffle(ids)
    (data_dir / "wal").mkdir(parents=True)
    (data_dir / "snap").mkdir()
    data = {dataset.key(i): pack(i + 1, dataset.value(i)) for i in ids}
    write_snapshot(data_dir / "snap", data, keys)
    dataset.write_wal_tail(data_dir, keys, wal_records, keys)


def copy_dir(source: Path, target: Path) -> Path:
    """A fresh copy per server: a node writes to its data dir."""
    shutil.copytree(source, target)
    return target


def measure_memory(work: Path, repos: dict[str, Path], loaded: Path, keys: int) -> dict[str, float]:
    per_key = {}
    for side, repo in repos.items():
        empty = start_kvservice(work, f"{side}-empty", work / f"{side}-empty", repo=repo)
        try:
            empty_rss = settled_rss(empty)
        finally:
            empty.stop()
        data_dir = copy_dir(loaded, work / f"{side}-mem")
        full = start_kvservice(work, f"{side}-loaded", data_dir, repo=repo)
        try:
            per_key[side] = (settled_rss(full) - empty_rss) / keys
            if side == "index":
                timed_scan(full)  # builds the index
                per_key["index, built"] = (settled_rss(full) - empty_rss) / keys
        finally:
            full.stop()
    return per_key


def settled_rss(server: Server) -> int:
    http_post(server.url(KV_PATH + "Get"), dataset.kv_body("Get", "json"), CONNECT_JSON)
    return rss_bytes(server.pid)


def measure_restarts(
    work: Path, repos: dict[str, Path], loaded: Path, rounds: int
) -> dict[str, list[float]]:
    """Seconds from start to /readyz 200, alternating checkouts each round."""
    found: dict[str, list[float]] = {}
    for n in range(rounds):
        for side, repo in alternate(repos, n):
            name = f"{side}-restart-{loaded.name}-{n}"
            server = start_kvservice(work, name, copy_dir(loaded, work / name), repo=repo)
            found.setdefault(side, []).append(time.monotonic() - server.child.started_at)
            if side == "index":  # the first Scan builds the index; the second one reads it
                found.setdefault("index first Scan", []).append(timed_scan(server))
                found.setdefault("index second Scan", []).append(timed_scan(server))
            server.stop()
            recovered = recovery.recovered_seconds(server.child.log_path)
            found.setdefault(f"{side} recovered (log)", []).append(recovered or 0.0)
    return found


def timed_scan(server: Server) -> float:
    body = json.dumps({"prefix": "user:", "startAfter": dataset.key(500), "limit": 100})
    started = time.monotonic()
    http_post(server.url(KV_PATH + "Scan"), body.encode(), CONNECT_JSON, timeout=120)
    return time.monotonic() - started


def alternate(repos: dict[str, Path], n: int) -> list[tuple[str, Path]]:
    items = list(repos.items())
    return items if n % 2 == 0 else items[::-1]


def measure_load(
    work: Path, servers: dict[str, Server], args: argparse.Namespace
) -> dict[str, list[Run]]:
    """Alternating rounds of every case on every server it applies to."""
    set_body = json.dumps(dataset.kv_body("Set", "json").decode())
    get_body = json.dumps(dataset.kv_body("Get", "json").decode())
    cases: list[tuple[str, str, str, Callable[[int], str]]] = []
    for side in servers:
        cases.append((f"{side} Set new keys", side, "Set", set_new_keys_script))
        cases.append((
            f"{side} Set overwrite", side, "Set",
            lambda _n: fixed_body_script(CONNECT_JSON, set_body),
        ))  # fmt: skip
    for codec in ("json", "proto"):
        for keys_only in (False, True):
            name = f"index Scan 100, {codec}{', keys only' if keys_only else ''}"
            cases.append((
                name, "index", "Scan",
                lambda _n, c=codec, k=keys_only: scan_script(args.keys, c, k),
            ))  # fmt: skip
    cases.append(
        ("index Get", "index", "Get", lambda _n: fixed_body_script(CONNECT_JSON, get_body))
    )
    found: dict[str, list[Run]] = {}
    for n in range(args.rounds):
        shift = n % len(cases)
        for name, side, method, script in cases[shift:] + cases[:shift]:
            run = run_wrk(servers[side], KV_PATH + method, script(n), work, args.seconds)
            found.setdefault(name, []).append(run)
            print(f"round {n} {name}: {run.rps:,.0f}/s, {run.cpu_us_per_request:.0f} µs CPU,"
                  f" other {run.other_cpu:.2f}", file=sys.stderr)  # fmt: skip
    return found


def summary(runs: list[Run]) -> dict[str, object]:
    return {
        "req/s median": round(statistics.median(r.rps for r in runs)),
        "req/s range": [round(min(r.rps for r in runs)), round(max(r.rps for r in runs))],
        "server CPU µs/request median": round(
            statistics.median(r.cpu_us_per_request for r in runs), 1
        ),
        "server CPU µs/request every round": [round(r.cpu_us_per_request, 1) for r in runs],
        "other CPU cores median": round(statistics.median(r.other_cpu for r in runs), 2),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    repos = {"base": args.base_repo.resolve(), "index": REPO}
    for repo in repos.values():
        kvservice_origin(repo)  # refuses a checkout that would import the wrong code
    results: dict[str, object] = {"load average at start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="kvbench-scan-") as tmp:
        work = Path(tmp)
        sorted_dir, shuffled_dir = work / "sorted", work / "shuffled"
        build_data_dir(sorted_dir, args.keys, "sorted", args.wal_records)
        build_data_dir(shuffled_dir, args.keys, "shuffled", args.wal_records)
        results["memory bytes per key"] = measure_memory(work, repos, sorted_dir, args.keys)
        for order, loaded in (("sorted", sorted_dir), ("shuffled", shuffled_dir)):
            restarts = measure_restarts(work, repos, loaded, args.restarts)
            results[f"restart seconds, {order} keys"] = {
                side: {"median": statistics.median(v), "every": v} for side, v in restarts.items()
            }
        servers = {}
        try:
            for side, repo in repos.items():
                data_dir = copy_dir(shuffled_dir, work / f"{side}-load")
                servers[side] = start_kvservice(work, f"{side}-load", data_dir, repo=repo)
            timed_scan(servers["index"])  # build the index: every round measures it built
            found = measure_load(work, servers, args)
        finally:
            for server in servers.values():
                server.stop()
    results["load"] = {name: summary(runs) for name, runs in found.items()}
    results["load average at end"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base-repo", type=Path, required=True, help="checkout without Scan")
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--wal-records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    print(json.dumps(run(parser.parse_args()), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
