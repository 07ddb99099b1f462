"""The snapshot-gc.md results file: snapshot cost (before/after when two checkouts
ran) and request latency under each GC mode, with the commands that produced them."""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from bench.gclatency import GcResult
from bench.load import LoadResult
from bench.report import fmt_ratio, mib
from bench.servers import shell_command
from bench.snapshot import Latencies, SnapshotResult, SnapshotRun, SystemResult
from bench.stats import DASH, ratio, summarize
from bench.throughput import Settings
from bench.tools import Machine


@dataclass
class SnapGcResults:
    started: datetime
    smoke: bool
    argv: list[str]
    machine: Machine
    versions: dict[str, str]
    settings: Settings
    snapshot: SnapshotResult | None = None
    gc: GcResult | None = None
    elapsed_seconds: float = 0.0


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _spread(values: Sequence[float | None], fmt: Callable[[float], str], bold: bool = False) -> str:
    """median (min-max) of the measured values, or a dash."""
    found = [v for v in values if v is not None]
    if not found:
        return "—"
    s = summarize(found)
    mid = f"**{fmt(s.median)}**" if bold else fmt(s.median)
    return mid if s.n == 1 else f"{mid} ({fmt(s.low)}{DASH}{fmt(s.high)})"


def _ms(v: float) -> str:
    return f"{v:,.1f}"


def _s(v: float) -> str:
    return f"{v:.2f}"


def _mib(v: float) -> str:
    return mib(v).removesuffix(" MiB")


def render(r: SnapGcResults) -> str:
    parts = [_header(r), _snapshot(r), _snapshot_load(r), _gc(r), _machine(r), _commands(r)]
    return "\n".join(p for p in parts if p) + "\n"


def _header(r: SnapGcResults) -> str:
    kind = "a SMOKE run (tiny counts: figures prove the harness works)" if r.smoke else "a run"
    others = [runs for runs in _all_other_cpu(r) if runs is not None]
    other = (
        f"The rest of the machine (other agents' test suites) used {min(others):.2f}{DASH}"
        f"{max(others):.2f} cores (median {statistics.median(others):.2f}) of the 2 during the "
        'measured windows (column "other CPU"): compare figures side by side in this file, '
        "not with other runs."
        if others
        else ""
    )
    return "\n".join(
        [
            f"# kvservice snapshot cost and GC under load, {r.started:%Y-%m-%d %H:%M} UTC",
            "",
            f"Produced by `{_shell(['python', '-m', 'bench.run', *r.argv[1:]])}`, {kind}, in "
            f"{r.elapsed_seconds:.0f} s on {r.machine.cores} cores / "
            f"{r.machine.memory_gib:.1f} GiB.",
            "",
            other,
            "",
        ]
    )


def _all_other_cpu(r: SnapGcResults) -> list[float | None]:
    found: list[float | None] = []
    if r.snapshot:
        for s in r.snapshot.systems:
            found += [q.other_cpu for q in s.quiet] + [x.snapshot.other_cpu for x in s.loaded]
    if r.gc:
        found += [x.other_cpu for runs in r.gc.runs.values() for x in runs]
    return found


def _shell(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


# -- snapshot ----------------------------------------------------------------------------------


def _snap_cols(runs: list[SnapshotRun]) -> dict[str, list[float | None]]:
    return {
        "wall": [q.wall_seconds for q in runs],
        "logged": [q.logged_seconds for q in runs],
        "server": [float(q.server_peak) for q in runs],
        "children": [float(q.peak_children_rss) for q in runs],
        "total": [float(q.peak_total_rss) for q in runs],
        "pss": [float(q.peak_total_pss) for q in runs],
        "server_cpu": [q.server_cpu for q in runs],
        "children_cpu": [q.children_cpu for q in runs],
        "other": [q.other_cpu for q in runs],
    }


def _children(s: SystemResult, runs: list[SnapshotRun]) -> str:
    server = " ".join(s.server_argv)[:120]
    names = sorted({c for q in runs for c in q.children})
    if not names:
        return "none"
    shown = ["fork of the server" if n == server else f"`{n}`" for n in names]
    return ", ".join(shown)


def _snapshot(r: SnapGcResults) -> str:
    res = r.snapshot
    if res is None:
        return ""
    rows = []
    for s in res.systems:
        c = _snap_cols(s.quiet)
        before, after = (
            s.quiet[0].rss_before if s.quiet else 0,
            _median([float(q.rss_after) for q in s.quiet]),
        )
        rows.append(
            [
                f"{s.system.label} `{s.system.commit}`",
                _spread(c["wall"], _s, bold=True),
                _spread(c["logged"], _s),
                _spread(c["server"], _mib),
                _spread(c["children"], _mib, bold=True),
                _spread(c["total"], _mib, bold=True),
                _spread(c["pss"], _mib),
                f"{_mib(before)} → {_mib(after or 0)}",
                _spread(c["server_cpu"], _s),
                _spread(c["children_cpu"], _s),
                _spread(c["other"], _s),
                _children(s, s.quiet),
            ]
        )
    head = [
        "system",
        "snapshot wall s",
        "server's own log s",
        "server peak RSS MiB",
        "children peak RSS MiB",
        "server + children peak RSS MiB",
        "server + children peak PSS MiB",
        "server RSS before → after",
        "server CPU s",
        "children CPU s",
        "other CPU",
        "children seen",
    ]
    out = (
        f"## Snapshot of {res.keys:,} keys, no other load ({res.rounds} rounds, medians "
        f"and min{DASH}max)\n\n" + _table(head, rows) + _snapshot_ratio(res) + "\n"
    )
    return out + _SNAPSHOT_METHOD.format(keys=res.keys)


def _snapshot_ratio(res: SnapshotResult) -> str:
    if len(res.systems) != 2:
        return ""
    base, other = (_snap_cols(s.quiet) for s in res.systems)
    names = {
        "wall": "snapshot wall",
        "server": "server peak RSS",
        "children": "children peak RSS",
        "total": "server + children peak RSS",
        "pss": "server + children peak PSS",
        "children_cpu": "children CPU",
    }
    rows = [
        [label, fmt_ratio(ratio(_median(other[key]), _median(base[key])))]
        for key, label in names.items()
    ]
    after, before = res.systems[1].system, res.systems[0].system
    return (
        f"\n{after.label} / {before.label} (ratio of medians, measured in the same rounds):\n\n"
        + _table(["figure", f"{after.label} / {before.label}"], rows)
    )


_SNAPSHOT_METHOD = """\
How: the node recovers a {keys:,}-key snapshot (bench/dataset.py) plus a short WAL tail,
makes one Set (so each snapshot has a new revision), and is asked for a snapshot over
`Admin/Snapshot` (Connect JSON, as `kvservice snapshot --url`); wall = that call.
Peak RSS: VmRSS of the server and of every descendant (/proc/PID/task/*/children,
recursively) every 10 ms; the server column is the larger of that and its VmHWM reset just
before the call. A forked child's RSS counts the pages it still shares with the server,
so "server + children RSS" double counts them; PSS (smaps_rollup, every 50 ms) splits
shared pages between sharers and is the memory the machine really had to find.
CPU: server = its utime+stime over the call; children = cutime+cstime of the children it
waited for plus the CPU of those still running; other = the rest of the machine in cores.
One snapshot per node first is discarded (warm-up).
"""


def _lat_cols(runs: list[Latencies]) -> tuple[list[float | None], ...]:
    return (
        [x.p50_ms for x in runs],
        [x.p99_ms for x in runs],
        [x.max_ms for x in runs],
    )


def _snapshot_load(r: SnapGcResults) -> str:
    res = r.snapshot
    if res is None or not any(s.loaded for s in res.systems):
        return ""
    rows = []
    for s in res.systems:
        windows = (
            ("during the snapshot", [x.during for x in s.loaded]),
            ("same run, outside it", [x.outside for x in s.loaded]),
            ("run without snapshot", [x.baseline for x in s.loaded]),
        )
        for name, lats in windows:
            p50, p99, top = _lat_cols(lats)
            rows.append(
                [
                    f"{s.system.label} `{s.system.commit}`",
                    name,
                    str(sum(x.requests for x in lats)),
                    str(sum(x.errors for x in lats)),
                    _spread(p50, _ms),
                    _spread(p99, _ms, bold=True),
                    _spread(top, _ms),
                    _spread([x.snapshot.wall_seconds for x in s.loaded], _s)
                    if name.startswith("during")
                    else "",
                    _spread([x.snapshot.other_cpu for x in s.loaded], _s)
                    if name.startswith("during")
                    else "",
                ]
            )
    head = [
        "system",
        "requests due",
        "count",
        "errors",
        "p50 ms",
        "p99 ms",
        "max ms",
        "snapshot wall s",
        "other CPU",
    ]
    return (
        f"## Set latency while a snapshot runs (fixed rate {res.load_rate:g}/s, 8 connections, "
        "random existing keys)\n\n"
        + _table(head, rows)
        + "\nLatency counts from when a request was due (bench/rateload.py), so a stall of "
        "the event loop shows in every request it delays. Requests are grouped by when "
        "they were due: inside the snapshot call, or before/after it in the same run; a "
        "second run of the same length without a snapshot follows. Medians over rounds "
        f"(min{DASH}max); requests and errors are totals. On 2 cores the snapshot writer "
        "(a forked child at 52f1e93, a spawned `kvservice.storage.compact` process since) "
        'takes one core for the whole call; "other CPU" is what the '
        "rest of the machine took in the same window. Near 1 core, the node shares the "
        "remaining core with the load generator, so a p50 that rises with the p99 during "
        "the snapshot means CPU contention, not one stall; it applies to both checkouts "
        "alike, which is why they alternate in the same run.\n"
    )


# -- GC ---------------------------------------------------------------------------------------


@dataclass
class _GcRow:
    runs: list[LoadResult] = field(default_factory=list)

    def per_second(self, key: str) -> float:
        seconds = sum(x.seconds for x in self.runs)
        return sum(x.extra.get(key, 0.0) for x in self.runs) / seconds if seconds else 0.0

    def longest(self, key: str) -> float:
        return max((x.extra.get(key, 0.0) for x in self.runs), default=0.0)


def _gc(r: SnapGcResults) -> str:
    res = r.gc
    if res is None:
        return ""
    return _gc_startup(res) + "\n" + _gc_latency(res) + _gc_reading(res)


def _gc_startup(res: GcResult) -> str:
    rows = []
    for node in res.nodes:
        st = node.startup
        full = st.get("full_collect_ms", [])
        rows.append(
            [
                node.mode,
                f"{st.get('keys', 0):,}",
                "yes" if st.get("store_dict_tracked") else "no",
                f"{st.get('tracked_objects', 0):,}",
                _spread(full, _ms, bold=True),
                _spread(st.get("full_collect_after_mode_ms", []), lambda v: f"{v:,.3f}"),
                "/".join(str(t) for t in st.get("thresholds", [])),
                f"{st.get('frozen', 0):,}",
            ]
        )
    head = [
        "node (GC mode)",
        "keys",
        "store dict tracked by GC",
        "GC-tracked objects",
        "full gc.collect() ms, 3 in a row",
        "full gc.collect() ms after the mode",
        "thresholds",
        "frozen objects",
    ]
    return (
        f"## GC with {res.keys:,} keys loaded\n\nMeasured inside each node right after "
        "recovery (bench/gcserve.py), before its mode was applied, then once after:\n\n"
        + _table(head, rows)
    )


def _gc_latency(res: GcResult) -> str:
    by_key = {case.key: case for case in res.cases}
    rows = []
    defaults: dict[str, tuple[float | None, float | None]] = {}
    for key, runs in res.runs.items():
        op = by_key[key].op
        if key.startswith("gc-default-"):
            defaults[op] = (_median([x.p99_ms for x in runs]), _median([x.rps for x in runs]))
    for case in res.cases:
        runs = res.runs.get(case.key, [])
        if not runs:
            continue
        g = _GcRow(runs)
        gc_ms_per_s = sum(g.per_second(f"gen{n}_ms") for n in range(3))
        gc_cpu_per_s = sum(g.per_second(f"gen{n}_cpu_ms") for n in range(3))
        longest = max(g.longest(f"gen{n}_max_ms") for n in range(3))
        longest_cpu = max(g.longest(f"gen{n}_cpu_max_ms") for n in range(3))
        base_p99, base_rps = defaults.get(case.op, (None, None))
        p99 = _median([x.p99_ms for x in runs])
        rps = _median([x.rps for x in runs])
        rows.append(
            [
                case.label,
                _spread([x.rps for x in runs], lambda v: f"{v:,.0f}", bold=True),
                _spread([x.p50_ms for x in runs], _ms),
                _spread([x.p99_ms for x in runs], _ms, bold=True),
                f"{g.per_second('gen0'):,.1f} / {g.per_second('gen1'):,.2f} / "
                f"{g.per_second('gen2'):,.2f}",
                f"{gc_ms_per_s:,.1f} / {gc_cpu_per_s:,.1f}",
                f"{g.longest('gen0_count'):,.0f}",
                f"{g.longest('gen2_max_ms'):,.1f} / {g.longest('gen2_cpu_max_ms'):,.1f}",
                f"{longest:,.1f} / {longest_cpu:,.1f}",
                _spread([x.server_cpu for x in runs], _s),
                _spread([x.other_cpu for x in runs], _s),
                fmt_ratio(ratio(rps, base_rps)),
                fmt_ratio(ratio(p99, base_p99)),
            ]
        )
    head = [
        "case",
        "req/s",
        "p50 ms",
        "p99 ms",
        "collections/s gen0 / gen1 / gen2",
        "GC ms per s, wall / CPU",
        "max gen0 count at run end",
        "longest gen2 ms, wall / CPU",
        "longest GC pause ms, wall / CPU",
        "server CPU",
        "other CPU",
        "req/s vs default",
        "p99 vs default",
    ]
    s = res.settings
    return (
        f"### Latency under load ({s.rounds} alternating rounds of {s.seconds} s, "
        f"`wrk -t1 -c{s.connections}`, one fixed key, Connect JSON, fsync=always)\n\n"
        + _table(head, rows)
        + f"\nMedians over rounds (min{DASH}max). GC columns come from a `gc.callbacks` hook in "
        "the node, read before and after each run (SIGUSR1): collections per second of "
        "load, milliseconds spent collecting per second, the number of young objects pending "
        "when the run ended (gc.get_count()[0], the highest over rounds: a young collection "
        "runs when it passes the first threshold), and the longest single pause. Wall time "
        "includes any time the node was preempted by other processes during a collection; "
        "CPU time (the collecting thread's, time.thread_time) does not.\n"
    )


def _gc_reading(res: GcResult) -> str:
    fulls = [ms for node in res.nodes for ms in node.startup.get("full_collect_ms", [])]
    tracked = [node.startup.get("store_dict_tracked") for node in res.nodes]
    objects = _median([node.startup.get("tracked_objects") for node in res.nodes])
    if not fulls:
        return ""
    why = (
        "the store's dict holds only `str` keys and `bytes` values, which the collector "
        "does not track, so CPython untracks the dict itself: a full collection scans the "
        f"~{objects or 0:,.0f} other container objects (modules, classes, protobuf and "
        "uvicorn state), not the keys"
        if not any(tracked)
        else "the store's dict is tracked: a full collection walks every key"
    )
    return (
        f"\nA full collection with {res.keys:,} keys loaded took {_ms(statistics.median(fulls))} "
        f"ms (median of {len(fulls)}, {_ms(min(fulls))}{DASH}{_ms(max(fulls))}): {why}.\n"
    )


# -- machine, commands ---------------------------------------------------------------------------


def _machine(r: SnapGcResults) -> str:
    m = r.machine
    rows = [
        ["cores (usable)", str(m.cores)],
        ["CPU", m.cpu_model],
        ["kernel", m.kernel],
        ["data dir filesystem", m.filesystem],
    ] + [[k, f"`{v}`"] for k, v in r.versions.items() if v != "not installed"]
    return "## Machine and versions\n\n" + _table(["what", "value"], rows)


def _commands(r: SnapGcResults) -> str:
    lines = [_shell(["python", "-m", "bench.run", *r.argv[1:]])]
    if r.snapshot:
        for s in r.snapshot.systems:
            lines.append(f"# {s.system.label}: {s.system.repo} @ {s.system.commit}")
            lines.append(s.server_command)
            if s.loaded:
                lines.append(_shell(s.loaded[-1].argv))
        lines.append("# snapshot: POST /kvservice.v1.Admin/Snapshot, body {} (Connect JSON)")
    if r.gc:
        for node in r.gc.nodes:
            lines.append(shell_command(node.server))
        first = next(iter(r.gc.runs.values()), [])
        if first:
            lines.append(_shell(first[-1].argv))
    return "## Exact commands\n\n```\n" + "\n".join(lines) + "\n```\n"
