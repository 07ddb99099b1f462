"""Snapshot cost: wall time, memory of the server and of any process it starts,
and the latency of a light write load while a snapshot runs.

A node recovers the 1M-key data set (dataset.build_snapshot_dir) and is asked for
a snapshot over Admin/Snapshot, as `kvservice snapshot --url` does. While the
call runs, a thread polls every SAMPLE_SECONDS the VmRSS of the server and of
all its descendants (/proc/PID/task/*/children, recursively), so a forked
child and a spawned helper are measured the same way; every PSS_EVERY-th sample
also reads PSS (smaps_rollup), which splits pages a forked child still shares
with its parent, where summed RSS counts them twice. The server's own peak is
also read exactly: VmHWM after resetting it (clear_refs 5) just before the call.

The server may run from another checkout (`repo`), so the same case runs
against two commits side by side, in alternating rounds, and is reported as a
ratio.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import dataset
from bench.procs import (
    BenchError,
    children_cpu_seconds,
    cpu_seconds,
    descendants,
    http_post,
    machine_busy_seconds,
    peak_rss_bytes,
    process_name,
    pss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from bench.servers import REPO, Server, kvservice_origin, shell_command, start_kvservice
from bench.throughput import CONNECT_JSON, KV_PATH

log = logging.getLogger("bench.snapshot")

SNAPSHOT_PATH = "/kvservice.v1.Admin/Snapshot"
SAMPLE_SECONDS = 0.01
PSS_EVERY = 5  # smaps_rollup walks the page tables: read it every 50 ms, not every 10
LOAD_RATE = 500.0  # Set/s of the light write load: ~4 % of what one node serves
LOAD_CONNECTIONS = 8
LOAD_LEAD_SECONDS = 1.0  # load runs this long before the snapshot starts


@dataclass(frozen=True)
class System:
    """One kvservice checkout under test."""

    label: str
    repo: Path
    commit: str


@dataclass
class TreeSampler:
    """Polls RSS (and PSS) of a process and its descendants until stopped."""

    pid: int
    peak_server_rss: int = 0
    peak_children_rss: int = 0
    peak_total_rss: int = 0
    peak_total_pss: int = 0
    samples: int = 0
    children: dict[int, str] = field(default_factory=dict)  # pid -> command line
    child_cpu: dict[int, tuple[float, float]] = field(default_factory=dict)  # first, last
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_SECONDS)
        self.sample()

    def sample(self) -> None:
        with_pss = self.samples % PSS_EVERY == 0
        self.samples += 1
        try:
            server = rss_bytes(self.pid)
            server_pss = pss_bytes(self.pid) if with_pss else 0
        except (OSError, BenchError):
            return
        children_rss = children_pss = 0
        for child in descendants(self.pid):
            with contextlib.suppress(OSError, BenchError, ValueError):
                children_rss += rss_bytes(child)
                if with_pss:
                    children_pss += pss_bytes(child)
                cpu = cpu_seconds(child)
                first, _ = self.child_cpu.get(child, (cpu, cpu))
                self.child_cpu[child] = (first, cpu)
                if child not in self.children:
                    self.children[child] = process_name(child)
        self.peak_server_rss = max(self.peak_server_rss, server)
        self.peak_children_rss = max(self.peak_children_rss, children_rss)
        self.peak_total_rss = max(self.peak_total_rss, server + children_rss)
        if with_pss:
            self.peak_total_pss = max(self.peak_total_pss, server_pss + children_pss)

    def live_children_cpu(self) -> float:
        """CPU seen in descendants still running at the end (not yet in the parent's cutime)."""
        live = set(descendants(self.pid))
        return sum(last - first for pid, (first, last) in self.child_cpu.items() if pid in live)


@dataclass(frozen=True)
class SnapshotRun:
    """One Admin/Snapshot call and what it cost."""

    wall_seconds: float
    logged_seconds: float | None  # the server's own `snapshot written` figure
    started: float  # monotonic clock (machine-wide), for picking load requests
    ended: float
    rss_before: int
    rss_after: int
    server_hwm: int | None  # exact server peak (VmHWM after a reset); None if refused
    peak_server_rss: int
    peak_children_rss: int
    peak_total_rss: int
    peak_total_pss: int
    children: tuple[str, ...]
    server_cpu: float  # seconds, all threads
    children_cpu: float  # seconds, children waited for + still running
    other_cpu: float  # cores: the rest of the machine over the call
    samples: int

    @property
    def server_peak(self) -> int:
        return max(self.server_hwm or 0, self.peak_server_rss)


@dataclass(frozen=True)
class Latencies:
    """Fixed-rate Set latencies of the requests due inside one window."""

    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass(frozen=True)
class LoadedRun:
    snapshot: SnapshotRun
    during: Latencies  # requests due while the snapshot call ran
    outside: Latencies  # the same run's requests due before it or after it
    baseline: Latencies  # a run of the same length without a snapshot
    argv: list[str]


@dataclass
class SystemResult:
    system: System
    quiet: list[SnapshotRun] = field(default_factory=list)
    loaded: list[LoadedRun] = field(default_factory=list)
    server_argv: list[str] = field(default_factory=list)
    server_command: str = ""  # as a shell line: directory, PYTHONPATH, argv
    keys: int = 0


@dataclass
class SnapshotResult:
    keys: int
    rounds: int
    load_rate: float
    systems: list[SystemResult]


def kvservice_commit(repo: Path) -> str:
    """The last commit that changed `repo`'s kvservice/, with +dirty if it is edited."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
            check=False,
        )  # fmt: skip
        return done.stdout.strip()

    commit = git("log", "-1", "--format=%h", "--", "kvservice") or "?"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "kvservice") else "")


def describe(label: str, repo: Path) -> System:
    kvservice_origin(repo)  # refuses a checkout whose kvservice would not be imported
    return System(label, repo.resolve(), kvservice_commit(repo))


def systems_for(repo: Path, compare: Path | None, label: str = "after") -> list[System]:
    """The checkout under test, and the one to compare it with ("before" / `label`)."""
    if compare is None:
        return [describe("kvservice", repo)]
    return [describe("before", repo), describe(label, compare)]


def logged_snapshot_seconds(log_path: Path) -> float | None:
    """The `seconds` of the server's last `snapshot written` log line, if any."""
    found = None
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("message") == "snapshot written":
                found = float(entry["seconds"])
    return found


def take_snapshot(server: Server, also_running: Sequence[int] = ()) -> SnapshotRun:
    """One Admin/Snapshot call, measured; `also_running` are other busy processes
    of ours (the load generator) whose CPU is not counted as "other"."""
    # One write first, so every snapshot is at a new revision, as in service.
    http_post(server.url(KV_PATH + "Set"), dataset.kv_body("Set", "json"), CONNECT_JSON)
    pid = server.pid
    rss_before = rss_bytes(pid)
    hwm_reset = reset_peak_rss(pid)
    ours_before = sum(cpu_seconds(p) for p in also_running) + time.process_time()
    server_before, reaped_before = cpu_seconds(pid), children_cpu_seconds(pid)
    busy_before = machine_busy_seconds()
    with TreeSampler(pid) as sampler:
        started = time.monotonic()
        reply = http_post(server.url(SNAPSHOT_PATH), b"{}", CONNECT_JSON, timeout=600)
        ended = time.monotonic()
    busy = machine_busy_seconds() - busy_before
    server_cpu = cpu_seconds(pid) - server_before
    children_cpu = children_cpu_seconds(pid) - reaped_before + sampler.live_children_cpu()
    ours = sum(cpu_seconds(p) for p in also_running) + time.process_time() - ours_before
    wall = ended - started
    key_count = int(json.loads(reply).get("keyCount", 0))
    if key_count < 1:
        raise BenchError(f"{server.system}: snapshot reply without keys: {reply[:300]!r}")
    time.sleep(0.05)  # let the log line land
    return SnapshotRun(
        wall_seconds=wall,
        logged_seconds=logged_snapshot_seconds(server.child.log_path),
        started=started,
        ended=ended,
        rss_before=rss_before,
        rss_after=rss_bytes(pid),
        server_hwm=peak_rss_bytes(pid) if hwm_reset else None,
        peak_server_rss=sampler.peak_server_rss,
        peak_children_rss=sampler.peak_children_rss,
        peak_total_rss=sampler.peak_total_rss,
        peak_total_pss=sampler.peak_total_pss,
        children=tuple(sorted(set(sampler.children.values()))),
        server_cpu=server_cpu,
        children_cpu=children_cpu,
        other_cpu=max(0.0, busy - server_cpu - children_cpu - ours) / wall,
        samples=sampler.samples,
    )


# -- the light write load --------------------------------------------------------------------


def rateload_argv(server: Server, seconds: float, keys: int, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.rateload",
        server.url(KV_PATH + "Set"),
        "--rate",
        f"{LOAD_RATE:g}",
        "--connections",
        str(LOAD_CONNECTIONS),
        "--seconds",
        f"{seconds:.1f}",
        "--keys",
        str(keys),
        "--out",
        str(out),
    ]


@contextlib.contextmanager
def rate_load(argv: list[str], seconds: float) -> Iterator[subprocess.Popen[bytes]]:
    """Run bench.rateload for the body of the `with`; wait for it after (bounded)."""
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
        _, err = proc.communicate(timeout=seconds + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise BenchError(f"bench.rateload exited {proc.returncode}: {err.decode()[-2000:]}")


def read_records(path: Path) -> list[tuple[float, float, int]]:
    records = []
    for line in path.read_text().splitlines():
        due, latency, status = line.split()
        records.append((float(due), float(latency), int(status)))
    return records


def latencies(records: Sequence[tuple[float, float, int]]) -> Latencies:
    ok = sorted(latency * 1000 for _, latency, status in records if status == 200)
    errors = len(records) - len(ok)
    if not ok:
        return Latencies(len(records), errors, None, None, None)
    p99 = ok[min(len(ok) - 1, len(ok) * 99 // 100)]
    return Latencies(len(records), errors, statistics.median(ok), p99, ok[-1])


def snapshot_under_load(server: Server, work: Path, keys: int, quiet_wall: float) -> LoadedRun:
    """A snapshot while the fixed-rate load runs, then the same load without one."""
    seconds = min(40.0, max(4.0, LOAD_LEAD_SECONDS + 1.5 * quiet_wall + 1.5))
    out = work / f"rateload-{server.system}.txt"
    argv = rateload_argv(server, seconds, keys, out)
    with rate_load(argv, seconds) as proc:
        time.sleep(LOAD_LEAD_SECONDS)
        snap = take_snapshot(server, also_running=[proc.pid])
    records = read_records(out)
    during = [r for r in records if snap.started <= r[0] <= snap.ended]
    outside = [r for r in records if not snap.started <= r[0] <= snap.ended]
    base_out = work / f"rateload-{server.system}-baseline.txt"
    with rate_load(rateload_argv(server, seconds, keys, base_out), seconds):
        pass
    baseline = read_records(base_out)
    return LoadedRun(snap, latencies(during), latencies(outside), latencies(baseline), argv)


# -- the case --------------------------------------------------------------------------------


def prepare_data(work: Path, keys: int) -> Path:
    """The bench's data set as a data dir, plus a short WAL tail (recovery replays it)."""
    source = work / "snapshot-source"
    if not source.exists():
        revision = dataset.build_snapshot_dir(source, keys)
        dataset.write_wal_tail(source, revision, min(1000, keys), keys)
    return source


def measure(
    work: Path, systems: list[System], keys: int, rounds: int, *, with_load: bool = True
) -> SnapshotResult:
    """`rounds` alternating rounds of a quiet snapshot and one under load, per system."""
    source = prepare_data(work, keys)
    results = [SystemResult(system, keys=keys) for system in systems]
    with contextlib.ExitStack() as stack:
        servers = []
        for n, system in enumerate(systems):
            data_dir = work / f"snapshot-data-{n}"
            shutil.copytree(source, data_dir)
            name = "snapshot-" + re.sub(r"[^\w.-]+", "-", system.label)
            server = start_kvservice(work, name, data_dir, repo=system.repo)
            stack.callback(server.stop)
            servers.append(server)
            results[n].server_argv = server.child.argv
            results[n].server_command = shell_command(server)
        for server in servers:  # warm-up: lazy imports, page cache of the new files
            take_snapshot(server)
        for round_no in range(rounds):
            order = list(range(len(systems)))
            if round_no % 2:
                order.reverse()
            for n in order:
                quiet = take_snapshot(servers[n])
                results[n].quiet.append(quiet)
                log.info(
                    "round %d/%d %s snapshot %.2f s, peak server %.0f MiB + children %.0f MiB",
                    round_no + 1, rounds, systems[n].label, quiet.wall_seconds,
                    quiet.server_peak / 2**20, quiet.peak_children_rss / 2**20,
                )  # fmt: skip
                if with_load:
                    loaded = snapshot_under_load(servers[n], work, keys, quiet.wall_seconds)
                    results[n].loaded.append(loaded)
                    log.info(
                        "round %d/%d %s under load: p99 %s ms during, %s ms baseline",
                        round_no + 1, rounds, systems[n].label,
                        loaded.during.p99_ms, loaded.baseline.p99_ms,
                    )  # fmt: skip
    return SnapshotResult(keys, rounds, LOAD_RATE, results)
