"""Run the benchmarks of issue 4 and write the results file.

    python -m bench.run            # full run (~10 min): latest.md + dated copy, replication.md
    python -m bench.run --smoke    # seconds, tiny counts: bench/results/smoke.md
    python -m bench.run --only snapshot,gc   # bench/results/snapshot-gc.md (opt-in cases)
    python -m bench.run --only replication   # bench/results/replication.md alone (~4 min)
    python -m bench.run --only watch         # bench/results/watch.md (~3 min; bench/watch.py)
    python -m bench.run --only datamodel     # bench/results/datamodel.md alone (~5 min)
    python -m bench.run --only snapshot --compare-repo ../after   # before/after side by side
    python -m bench.run --only kv-get,kv-set-json-always,kv-set-proto-always \
        --kvservice-repo ../before --compare-repo ../after        # hot path before/after

Peers (redis-server, etcd) and wrk are installed with apt-get when missing
(full run; `--install` for the smoke). What cannot be installed is skipped and
named in the results; without wrk, HTTP load comes from bench/pyload.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    datamodel,
    dataset,
    gclatency,
    gcserve,
    memory,
    profile,
    recovery,
    replication,
    snapgc_report,
    snapshot,
    targets,
    throughput,
    tools,
    watch,
)
from bench.load import http_generator
from bench.peers import start_etcd, start_redis
from bench.procs import BenchError
from bench.report import Results, render
from bench.servers import REPO, Server, command_argv, start_kvservice, start_uvicorn_app

log = logging.getLogger("bench.run")
DEFAULT_OUT = REPO / "bench" / "results"
# Cases with a results file of their own, run when --only names them: snapshot and gc
# (snapshot-gc.md; not in the full run, they add minutes), and replication
# (bench/replication.py -> replication.md; about 4 minutes, also in the full run), and
# watch (bench/watch.py -> watch.md; about 3 minutes) and datamodel
# (bench/datamodel.py -> datamodel.md; about 5 minutes): not in the full run.
OPT_IN = ("snapshot", "gc", "replication", "watch", "datamodel")


@dataclass(frozen=True)
class Plan:
    """How big a run is: the full run, or the smoke run's tiny counts."""

    smoke: bool
    seconds: int
    rounds: int
    warmup_seconds: int
    connections: int
    keys: int
    wal_records: int
    restarts: int
    install: bool
    profile: bool
    only: tuple[str, ...] = ()  # substrings of case keys (or "memory", "recovery"); () = all
    kvservice_repo: Path = REPO  # the checkout whose kvservice the opt-in cases serve
    compare_repo: Path | None = None  # a second checkout, side by side (snapshot, kv hot path)
    compare_label: str = "after"
    gc_modes: tuple[str, ...] = gcserve.MODES  # the GC modes the gc case compares

    def wants(self, name: str) -> bool:
        return not self.only or any(part in name for part in self.only)

    def opted(self, name: str) -> bool:
        """Opt-in cases (OPT_IN) run only when --only names them."""
        return name in self.only

    @property
    def replication(self) -> bool:
        """bench/replication.py: named by --only, or part of the full run (not the smoke
        run, whose only file is smoke.md: `--smoke --only replication` smoke-tests it)."""
        return self.opted("replication") or not (self.only or self.smoke)

    @property
    def standard(self) -> bool:
        """Whether any case of the results file of issue 4 is wanted."""
        return not self.only or any(part not in OPT_IN for part in self.only)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        smoke = bool(args.smoke)
        return cls(
            smoke=smoke,
            seconds=args.seconds or (1 if smoke else 4),
            rounds=args.rounds or (1 if smoke else 5),
            warmup_seconds=0 if smoke else 1,
            connections=args.connections,
            keys=args.keys or (10_000 if smoke else 1_000_000),
            wal_records=args.wal_records or (1_000 if smoke else 100_000),
            restarts=args.restarts or (1 if smoke else 3),
            install=args.install if args.install is not None else not smoke,
            profile=args.profile,
            only=tuple(part for part in (args.only or "").split(",") if part),
            kvservice_repo=args.kvservice_repo.resolve(),
            compare_repo=args.compare_repo.resolve() if args.compare_repo else None,
            compare_label=args.compare_label,
            gc_modes=tuple(args.gc_modes.split(",")) if args.gc_modes else gcserve.MODES,
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts; writes smoke.md")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for results files")
    parser.add_argument("--seconds", type=int, help="seconds per load run (4; smoke 1)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per case (5; smoke 1)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections")
    parser.add_argument("--keys", type=int, help="keys for memory and recovery (1e6; smoke 1e4)")
    parser.add_argument("--wal-records", type=int, help="WAL tail for recovery (1e5; smoke 1e3)")
    parser.add_argument("--restarts", type=int, help="restarts per system (3; smoke 1)")
    parser.add_argument(
        "--install",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apt-get install missing peers and wrk (default: full run only)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also sample kvservice with py-spy (if installed)"
    )
    parser.add_argument(
        "--only",
        help="comma-separated parts of case keys to run (e.g. kv-set,redis, or memory); "
        "writes partial.md; `snapshot` and `gc` (not in the full run) write snapshot-gc.md, "
        "`replication` (also in the full run) replication.md, `watch` watch.md,"
        " `datamodel` datamodel.md",
    )
    parser.add_argument(
        "--kvservice-repo",
        type=Path,
        default=REPO,
        help="checkout whose kvservice the kvservice, snapshot and gc cases serve "
        "(default: this one)",
    )
    parser.add_argument(
        "--compare-repo",
        type=Path,
        help="second checkout: the snapshot case, and kvservice Get and Set at fsync=always, "
        "run against both in alternating rounds with compare/base ratios "
        "(base = --kvservice-repo, 'before')",
    )
    parser.add_argument(
        "--compare-label",
        default="after",
        help="name of --compare-repo in the tables (default: after; the base is 'before')",
    )
    parser.add_argument(
        "--gc-modes",
        help="comma-separated GC modes for the gc case (default: all of "
        f"{','.join(gcserve.MODES)})",
    )
    args = parser.parse_args(argv)
    unknown = set((args.gc_modes or "").split(",")) - set(gcserve.MODES) - {""}
    if unknown:
        parser.error(f"--gc-modes: unknown {', '.join(sorted(unknown))}")
    return args


def prepare_tools(plan: Plan) -> list[str]:
    """Install what is missing if allowed; return what is still missing. The opt-in
    cases alone need only wrk (the peers are for the cases of issue 4)."""
    commands = None if plan.standard else ["wrk"]
    if commands is not None and any(plan.opted(c) for c in ("replication", "watch", "datamodel")):
        commands += ["redis-server", "redis-cli"]  # full resync, pub/sub and memory peer
    return tools.install_missing(commands) if plan.install else tools.missing(commands)


def run_throughput(plan: Plan, results: Results, work: Path, missing: list[str]) -> None:
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}

        def keep(server: Server) -> Server:
            stack.callback(server.stop)
            servers[server.system] = server
            results.commands[server.system] = command_argv(server)
            return server

        keep(start_uvicorn_app(work, "bare-asgi", "bench.apps.bare_asgi:app"))
        keep(start_uvicorn_app(work, "bare-connect", "bench.apps.bare_connect:app"))
        repo = plan.kvservice_repo
        keep(start_kvservice(work, "kvservice", work / "kv-always", fsync="always", repo=repo))
        keep(start_kvservice(work, "kvservice-fsync-no", work / "kv-no", fsync="no", repo=repo))
        if plan.compare_repo is not None:
            compare = start_kvservice(
                work, throughput.COMPARE_SYSTEM, work / "kv-compare", repo=plan.compare_repo
            )
            keep(compare)
        cases = throughput.python_cases(servers, work, results.settings, plan.compare_label)
        if "etcd" in missing:
            results.skipped.append("etcd cases: etcd (Debian etcd-server) is not installed")
        elif plan.wants("etcd-"):
            cases += throughput.etcd_cases(keep(start_etcd(work)), work, results.settings)
        if {"redis-server", "redis-benchmark"} & set(missing):
            results.skipped.append("redis cases: redis-server/redis-benchmark are not installed")
        elif plan.wants("redis-"):
            cases += throughput.redis_cases(keep(start_redis(work)), results.settings)
        cases = [case for case in cases if plan.wants(case.key)]
        results.cases = cases
        results.throughput = throughput.run_rounds(cases, results.settings)
        if plan.profile:
            results.profiles = run_profiles(cases, plan, work)


def run_profiles(cases: list[throughput.Case], plan: Plan, work: Path) -> list[profile.Profile]:
    """py-spy profiles of the target cases, in extra runs outside the measured rounds."""
    if profile.py_spy() is None:
        log.warning("--profile: py-spy is not installed (pip install py-spy); no profiles")
        return []
    found = []
    for case in cases:
        if case.key in profile.PROFILED:
            raw = work / f"{case.key}.pyspy"
            profile.record(case.pid, plan.seconds, raw, functools.partial(case.run, plan.seconds))
            found.append(profile.summarize(case.label, raw))
    return found


def run_memory_and_recovery(plan: Plan, results: Results, work: Path, missing: list[str]) -> None:
    data_dir = work / "kv-loaded"
    started = time.monotonic()
    revision = dataset.build_snapshot_dir(data_dir, plan.keys)
    log.info("wrote a %d-key snapshot in %.1f s", plan.keys, time.monotonic() - started)
    results.kv_memory = memory.measure_kvservice(work, data_dir, plan.keys)
    redis_restarts: list[recovery.Restart] = []
    rdb_bytes = 0
    if {"redis-server", "redis-cli"} & set(missing):
        results.skipped.append("redis memory and RDB restart: redis-server is not installed")
    else:
        results.redis_memory, redis = memory.measure_redis(work, plan.keys)
        results.commands["redis-memory"] = redis.child.argv
        try:
            rdb = recovery.save_rdb(redis)
        finally:
            redis.stop()
        rdb_bytes = rdb.stat().st_size
        redis_restarts = recovery.restart_redis(work, rdb, plan.keys, plan.restarts)
    dataset.write_wal_tail(data_dir, revision, plan.wal_records, plan.keys)
    kv_restarts = recovery.restart_kvservice(work, data_dir, plan.restarts)
    results.recovery = recovery.RecoveryResult(
        plan.keys,
        plan.wal_records,
        kv_restarts,
        recovery.disk_bytes(data_dir),
        redis_restarts,
        rdb_bytes,
    )


def write_results(results: Results, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    text = render(results)
    if results.smoke or results.partial:
        names = ["smoke.md" if results.smoke else "partial.md"]
    else:
        names = ["latest.md", f"{results.started:%Y-%m-%d}.md"]
    paths = [out / name for name in names]
    for path in paths:
        path.write_text(text)
    return paths


def run(plan: Plan, out: Path) -> list[Path]:
    missing = prepare_tools(plan)
    generator = http_generator()
    if generator != "wrk":
        log.warning(
            "wrk is not installed: using the Python load generator (figures not comparable)"
        )
    settings = throughput.Settings(
        seconds=plan.seconds,
        rounds=plan.rounds,
        connections=plan.connections,
        warmup_seconds=plan.warmup_seconds,
        generator=generator,
        redis_rps_guess=150_000,
    )
    paths = []
    if plan.standard:
        paths += run_standard(plan, out, settings, missing)
    if plan.opted("snapshot") or plan.opted("gc"):
        paths += run_snapshot_gc(plan, out, settings)
    if plan.replication:
        paths.append(run_replication(plan, out))
    if plan.opted("watch"):
        target = out / ("watch-smoke.md" if plan.smoke else "watch.md")
        paths.append(watch.run(watch.Plan.make(plan.smoke), target))
    if plan.opted("datamodel"):
        paths.append(run_datamodel(plan, out))
    return paths


def run_datamodel(plan: Plan, out: Path) -> Path:
    """bench/datamodel.py, all of it -> datamodel.md (smoke: datamodel-smoke.md)."""
    target = out / ("datamodel-smoke.md" if plan.smoke else "datamodel.md")
    command = shlex.join(["python", "-m", "bench.run", *sys.argv[1:]])
    return datamodel.run(datamodel.Plan.make(plan.smoke), set(datamodel.PARTS), target, command)


def run_replication(plan: Plan, out: Path) -> Path:
    """bench/replication.py, all of it -> replication.md (smoke: replication-smoke.md)."""
    target = out / ("replication-smoke.md" if plan.smoke else "replication.md")
    command = shlex.join(["python", "-m", "bench.run", *sys.argv[1:]])
    return replication.run(
        replication.Plan.make(plan.smoke), set(replication.PARTS), target, command
    )


def run_standard(
    plan: Plan, out: Path, settings: throughput.Settings, missing: list[str]
) -> list[Path]:
    """The cases of issue 4: throughput, memory, recovery -> latest.md (or smoke/partial)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvbench-") as tmp:
        work = Path(tmp)
        results = Results(
            started=datetime.now(UTC),
            smoke=plan.smoke,
            machine=tools.machine(work),
            versions=tools.versions(REPO),
            settings=settings,
            partial=bool(plan.only),
        )
        name_checkouts(plan, results.versions)
        if plan.compare_repo is not None:
            results.compare_label = plan.compare_label
        if settings.generator != "wrk":
            results.skipped.append("wrk is not installed: HTTP load came from bench/pyload.py")
        run_throughput(plan, results, work, missing)
        if plan.wants("memory") or plan.wants("recovery"):
            run_memory_and_recovery(plan, results, work, missing)
    results.verdicts = targets.judge(results)
    results.elapsed_seconds = time.monotonic() - started
    return write_results(results, out)


def name_checkouts(plan: Plan, versions: dict[str, str]) -> None:
    """Name the code under test, not the bench commits on top of it: the last commit that
    changed kvservice/ in each checkout served; this checkout's HEAD is the bench commit.
    `versions` must come from tools.versions(REPO)."""
    if plan.kvservice_repo != REPO or plan.compare_repo is not None:
        snapshot.systems_for(plan.kvservice_repo, plan.compare_repo)  # refuses a wrong import
    versions["bench commit"] = versions["kvservice commit"]
    versions["kvservice commit"] = snapshot.kvservice_commit(plan.kvservice_repo)
    if plan.compare_repo is not None:
        label = f"{plan.compare_label} kvservice commit"
        versions[label] = snapshot.kvservice_commit(plan.compare_repo)


def run_snapshot_gc(plan: Plan, out: Path, settings: throughput.Settings) -> list[Path]:
    """The opt-in snapshot and GC cases -> snapshot-gc.md (smoke: snapshot-gc-smoke.md)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvbench-") as tmp:
        work = Path(tmp)
        results = snapgc_report.SnapGcResults(
            started=datetime.now(UTC),
            smoke=plan.smoke,
            argv=sys.argv,
            machine=tools.machine(work),
            versions=tools.versions(REPO),
            settings=settings,
        )
        name_checkouts(plan, results.versions)
        if plan.opted("snapshot"):
            systems = snapshot.systems_for(
                plan.kvservice_repo, plan.compare_repo, plan.compare_label
            )
            results.snapshot = snapshot.measure(work, systems, plan.keys, plan.rounds)
        if plan.opted("gc"):
            results.gc = gclatency.measure(
                work, plan.keys, settings, plan.kvservice_repo, plan.gc_modes
            )
    results.elapsed_seconds = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("snapshot-gc-smoke.md" if plan.smoke else "snapshot-gc.md")
    path.write_text(snapgc_report.render(results))
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        paths = run(Plan.from_args(args), args.out)
    except BenchError as exc:
        log.error("benchmark failed: %s", exc)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
