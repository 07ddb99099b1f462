"""The results file: tables of medians, ranges and ratios, targets, method and commands."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from bench.load import RESULT_TAG, WRK_SCRIPT, LoadResult
from bench.memory import KvMemory, RedisMemory
from bench.profile import Profile
from bench.recovery import RecoveryResult
from bench.stats import DASH, TIMES, Summary, ratio, summarize
from bench.targets import Verdict
from bench.throughput import COMPARE_SUFFIX, Case, Settings
from bench.tools import Machine


@dataclass
class Results:
    """Everything one run measured; the report is rendered from this alone."""

    started: datetime
    smoke: bool
    partial: bool
    machine: Machine
    versions: dict[str, str]
    settings: Settings
    cases: list[Case] = field(default_factory=list)
    throughput: dict[str, list[LoadResult]] = field(default_factory=dict)
    kv_memory: KvMemory | None = None
    redis_memory: RedisMemory | None = None
    recovery: RecoveryResult | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    commands: dict[str, list[str]] = field(default_factory=dict)
    elapsed_seconds: float = 0.0
    compare_label: str | None = None  # name of --compare-repo's kvservice, if any

    def rps(self, key: str) -> Summary | None:
        runs = self.throughput.get(key)
        return summarize([r.rps for r in runs]) if runs else None

    def median_rps(self, key: str) -> float | None:
        found = self.rps(key)
        return found.median if found else None


def fmt_num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{TIMES}"


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render(results: Results) -> str:
    parts = [
        _header(results),
        _targets(results),
        _throughput(results),
        _before_after(results),
        _vs_peers(results),
        _profiles(results),
        _memory(results),
        _recovery(results),
        _method(results),
        _machine(results),
        _commands(results),
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _header(r: Results) -> str:
    if r.smoke:
        kind = "a SMOKE run: tiny counts, figures prove the harness works, not speed"
    else:
        kind = "a PARTIAL run (--only)" if r.partial else "the full run"
    lines = [
        f"# kvservice benchmarks, {r.started:%Y-%m-%d %H:%M} UTC",
        "",
        f"Produced by `python -m bench.run`, {kind}, in {r.elapsed_seconds:.0f} s on "
        f"{r.machine.cores} cores / {r.machine.memory_gib:.1f} GiB; kvservice commit "
        f"`{r.versions.get('kvservice commit', '?')}`.",
        "",
    ]
    if r.skipped:
        lines += ["**Skipped:**", ""] + [f"- {s}" for s in r.skipped] + [""]
    return "\n".join(lines)


def _targets(r: Results) -> str:
    rows = [
        [
            v.name,
            v.target,
            v.measured,
            "**met**" if v.met else ("not measured" if v.met is None else "**MISSED**"),
        ]
        for v in r.verdicts
    ]
    out = "## Targets (issue 4)\n\n" + _table(["target", "goal", "measured", "verdict"], rows)
    notes = [v for v in r.verdicts if v.explanation]
    if notes:
        out += "\n### Why, and what would reach it\n\n"
        out += "\n".join(f"- **{v.name}**: {v.explanation}" for v in notes) + "\n"
    return out


def _throughput(r: Results) -> str:
    ceiling = r.median_rps("asgi")
    rows = []
    for case in r.cases:
        runs = r.throughput.get(case.key)
        if not runs:
            continue
        rps = summarize([x.rps for x in runs])
        server = summarize([x.server_cpu for x in runs]).median
        generator = summarize([x.generator_cpu for x in runs]).median
        other = summarize([x.other_cpu for x in runs]).median
        p99 = summarize([x.p99_ms or 0.0 for x in runs]).median
        errors = sum(x.errors for x in runs)
        rows.append(
            [
                case.label,
                f"**{fmt_num(rps.median)}**",
                f"{fmt_num(rps.low)}{DASH}{fmt_num(rps.high)}",
                str(rps.n),
                f"{p99:.1f}",
                f"{server:.2f}",
                f"{generator:.2f}",
                f"{other:.2f}",
                fmt_ratio(ratio(rps.median, ceiling)),
                str(errors),
            ]
        )
    head = [
        "case",
        "median req/s",
        f"range (min{DASH}max)",
        "rounds",
        "p99 ms",
        "server CPU",
        "generator CPU",
        "other CPU",
        "vs bare ASGI",
        "errors",
    ]
    return (
        f"## Throughput ({r.settings.connections} connections, {r.settings.seconds} s per run, "
        f"generator: {r.settings.generator})\n\n"
        + _table(head, rows)
        + "\n"
        + _bottleneck_note(r)
        + _group_commit(r)
    )


def _before_after(r: Results) -> str:
    """--compare-repo: each kvservice case against its twin on the other checkout. The
    twins ran back to back in every round, so per-round ratios pair like with like."""
    if r.compare_label is None:
        return ""
    rows = []
    for case in r.cases:
        base, other = r.throughput.get(case.key), r.throughput.get(case.key + COMPARE_SUFFIX)
        if not base or not other:
            continue
        before = summarize([x.rps for x in base])
        after = summarize([x.rps for x in other])
        paired = summarize([b.rps / a.rps for a, b in zip(base, other, strict=True)])
        others = summarize([x.other_cpu for x in base + other])
        # Server CPU per request: what the code costs, whatever share of a core it got.
        cost_before = summarize([x.server_cpu / x.rps * 1e6 for x in base]).median
        cost_after = summarize([x.server_cpu / x.rps * 1e6 for x in other]).median
        rows.append(
            [
                case.label,
                f"{fmt_num(before.median)} ({fmt_num(before.low)}{DASH}{fmt_num(before.high)})",
                f"{fmt_num(after.median)} ({fmt_num(after.low)}{DASH}{fmt_num(after.high)})",
                f"**{fmt_ratio(ratio(after.median, before.median))}**",
                f"{fmt_ratio(paired.median)} ({fmt_ratio(paired.low)}{DASH}"
                f"{fmt_ratio(paired.high)})",
                f"{cost_before:,.0f} / {cost_after:,.0f} "
                f"(**{fmt_ratio(ratio(cost_after, cost_before))}**)",
                f"{others.median:.2f} ({others.low:.2f}{DASH}{others.high:.2f})",
            ]
        )
    if not rows:
        return ""
    label = r.compare_label
    before_commit = r.versions.get("kvservice commit", "?")
    after_commit = r.versions.get(f"{label} kvservice commit", "?")
    head = [
        "case (fsync=always)",
        f"before `{before_commit}` req/s, median (min{DASH}max)",
        f"{label} `{after_commit}` req/s",
        f"{label} / before (medians)",
        f"per-round {label} / before, median (min{DASH}max)",
        f"server CPU µs per request, before / {label} (ratio)",
        "other CPU",
    ]
    return (
        f"## Before / {label} (the same cases against two checkouts, back to back in each "
        "round)\n\n"
        + _table(head, rows)
        + "\nPer-round ratios pair the two runs of one round (back to back); CPU per request "
        "is the server's utime+stime over a run divided by its requests, which preemption by "
        "other processes inflates less than it cuts throughput. Other CPU: the rest of the "
        "machine, median (min" + DASH + "max) over both sides' runs.\n"
    )


def _group_commit(r: Results) -> str:
    rows = []
    for case in r.cases:
        runs = [x for x in r.throughput.get(case.key, []) if x.extra.get("fsyncs") is not None]
        if not runs:
            continue
        fsyncs = sum(x.extra["fsyncs"] for x in runs)
        seconds = sum(x.seconds for x in runs)
        writes = sum(x.requests for x in runs)
        fsync_time = sum(x.extra.get("fsync_seconds", 0.0) for x in runs)
        rows.append(
            [
                case.label,
                fmt_num(fsyncs / seconds),
                fmt_num(writes / fsyncs, 1) if fsyncs else "—",
                f"{fsync_time / fsyncs * 1e6:,.0f}" if fsyncs else "—",
            ]
        )
    if not rows:
        return ""
    head = ["kvservice Set case", "fsyncs/s", "writes per fsync", "mean fsync round trip, µs"]
    return (
        "\nGroup commit, from kvservice's own /metrics over the same runs (fsync=no makes none; "
        "the round trip is the fsync as the event loop waits for it, thread hand-offs included):"
        "\n\n" + _table(head, rows)
    )


# A generator at this many cores is (nearly) saturating a core of its own.
GENERATOR_LIMIT = 0.9


def _bottleneck_note(r: Results) -> str:
    generator = {
        case.label: summarize([x.generator_cpu for x in runs]).median
        for case in r.cases
        if (runs := r.throughput.get(case.key))
    }
    if not generator:
        return ""
    python = [
        c.label for c in r.cases if c.system not in ("redis", "etcd") and c.label in generator
    ]
    worst = max(python or generator, key=generator.__getitem__)
    if r.settings.generator != "wrk":
        verdict = (
            "but the Python generator (no wrk here) competes with the server for the cores: "
            "these figures only show that the harness and the server work."
        )
    else:
        verdict = "so the generator is not the bottleneck for the Python servers."
    saturated = [label for label, cores in generator.items() if cores >= GENERATOR_LIMIT]
    if saturated:
        verdict += (
            f" It is for {', '.join(saturated)} (generator at or above {GENERATOR_LIMIT} core): "
            "those figures are lower bounds of the server's capacity on this machine."
        )
    return (
        "CPU columns are medians in cores over each run: server = utime+stime of the one server "
        "process, all threads (/proc/PID/stat); generator = wrk, redis-benchmark or bench.pyload "
        "(wait4 rusage); other = the rest of the machine (/proc/stat busy time minus both), i.e. "
        "noise from other processes. A Python server near 1.00 core is the bottleneck; the "
        f"generator's highest median there is {generator[worst]:.2f} cores ({worst}) out of "
        f"{r.machine.cores}, {verdict}\n"
    )


PEER_COLUMNS: list[tuple[str, Callable[[Case], str | None]]] = [
    ("bare ASGI", lambda case: "asgi"),
    (
        "bare connect (same codec)",
        lambda case: "connect-get-" + case.key.split("-")[2] if case.op == "get" else None,
    ),
    ("etcd (lin.)", lambda case: "etcd-range" if case.op == "get" else "etcd-put"),
    ("etcd (serial.)", lambda case: "etcd-range-serializable" if case.op == "get" else None),
    ("redis", lambda case: f"redis-{case.op}"),
    ("redis P16", lambda case: f"redis-{case.op}-p16"),
]


def _vs_peers(r: Results) -> str:
    rows = []
    for case in r.cases:
        mine = r.median_rps(case.key)
        if case.system.startswith("kvservice") and mine is not None:
            row = [case.label, fmt_num(mine)]
            for _, peer_key in PEER_COLUMNS:
                peer = peer_key(case)
                row.append(fmt_ratio(ratio(mine, r.median_rps(peer) if peer else None)))
            rows.append(row)
    if not rows:
        return ""
    head = ["kvservice case", "median req/s", *(f"vs {name}" for name, _ in PEER_COLUMNS)]
    return (
        "## kvservice against each peer (ratio of medians; Get against reads, Set against writes)"
        "\n\n" + _table(head, rows)
    )


def _profiles(r: Results) -> str:
    if not r.profiles:
        return ""
    out = [
        "## Profiles (py-spy, extra runs outside the tables)",
        "",
        "Share of samples of the server's threads; own time = the function itself, inclusive = "
        "with what it calls (kvservice and connectrpc frames only).",
        "",
    ]
    for p in r.profiles:
        rows = [[f"`{name}`", f"{share:.1%}"] for name, share in p.top_self]
        out += [f"**{p.case}** ({p.samples:,} samples)", "", _table(["own time", "share"], rows)]
        rows = [[f"`{name}`", f"{share:.1%}"] for name, share in p.top_total]
        out += [_table(["inclusive", "share"], rows)]
    return "\n".join(out)


def _memory(r: Results) -> str:
    kv, rd = r.kv_memory, r.redis_memory
    if kv is None:
        return ""
    rows = [
        ["kvservice RSS, empty node", mib(kv.empty_rss), ""],
        [
            "kvservice RSS, loaded node",
            mib(kv.loaded_rss),
            f"peak during recovery {mib(kv.loaded_peak_rss)}",
        ],
        ["**kvservice RSS growth per key**", f"**{kv.per_key:,.0f} B**", ""],
        [
            "engine dict alone, fresh interpreter",
            f"{kv.dict_floor_per_key:,.0f} B/key",
            "the CPython floor for this data",
        ],
    ]
    if rd is not None:
        rows += [
            [
                "redis used_memory, empty → loaded",
                f"{mib(rd.used_before)} → {mib(rd.used_after)}",
                f"load with redis-cli --pipe: {rd.load_seconds:.1f} s",
            ],
            ["**redis used_memory per key**", f"**{rd.per_key:,.0f} B**", ""],
            [
                "redis RSS growth per key",
                f"{rd.rss_per_key:,.0f} B",
                "RSS against RSS, for reference",
            ],
            [
                "**kvservice / redis per key**",
                f"**{fmt_ratio(ratio(kv.per_key, rd.per_key))}**",
                f"RSS/RSS: {fmt_ratio(ratio(kv.per_key, rd.rss_per_key))}",
            ],
        ]
    return f"## Memory ({kv.keys:,} keys `user:NNNNNN:session`, 100-byte values)\n\n" + _table(
        ["figure", "value", "note"], rows
    )


def _recovery(r: Results) -> str:
    rec = r.recovery
    if rec is None:
        return ""
    kv_ready = summarize([x.ready_seconds for x in rec.kv_restarts])
    own = [x.recovered_seconds for x in rec.kv_restarts if x.recovered_seconds is not None]
    rows = [
        [
            f"kvservice: snapshot of {rec.keys:,} keys + {rec.wal_records:,}-record WAL tail "
            f"({mib(rec.kv_disk_bytes)} on disk)",
            f"**{kv_ready.median:.2f}**",
            f"{kv_ready.low:.2f}{DASH}{kv_ready.high:.2f}",
            f"{summarize(own).median:.2f}" if own else "—",
        ]
    ]
    if rec.redis_restarts:
        rd = summarize([x.ready_seconds for x in rec.redis_restarts])
        rows.append(
            [
                f"redis-server: RDB of the same {rec.keys:,} keys ({mib(rec.rdb_bytes)})",
                f"**{rd.median:.2f}**",
                f"{rd.low:.2f}{DASH}{rd.high:.2f}",
                "—",
            ]
        )
        rows.append(["kvservice / redis", fmt_ratio(ratio(kv_ready.median, rd.median)), "", ""])
    head = [
        "restart",
        "start → serving, median s",
        "range s",
        "kvservice `recovered` log, median s",
    ]
    return (
        f"## Recovery ({len(rec.kv_restarts)} restarts each, warm page cache)\n\n"
        + _table(head, rows)
        + "\nServing = first `/readyz` 200 for kvservice, first `PONG` for redis (it answers "
        f"`-LOADING` until the RDB is in), polled every 5{DASH}10 ms from process start, so Python "
        "start-up and imports count.\n"
    )


METHOD = """\
## Method

- One server process per system, all started before the first run and kept for
  the whole run, on 127.0.0.1 free ports with temporary data dirs ({filesystem}).
- {rounds} rounds; each round runs every case once, the order rotated by one
  case per round, so drift spreads over all cases; {warmup} s warm-up per case
  first (discarded). Medians are reported, with min{dash}max.
- HTTP cases: `wrk -t1 -c{connections}` POSTing one fixed body (Lua script
  below) with `Content-Type: application/json` (Connect JSON, etcd gateway) or
  `application/proto`. kvservice Set writes one fixed key with a 100-byte value;
  Get reads a key holding 100 bytes.
- The bare ASGI app (`bench/apps/bare_asgi.py`) and the bare connect-python app
  (`bench/apps/bare_connect.py`: the generated `KVStoreASGIApplication`, stock
  codecs, a dict lookup) run under uvicorn with uvloop + httptools, as kvservice.
- redis: `redis-benchmark -c {connections} -d 100`, GET and SET, without and
  with `-P 16`; the request count is sized to last about as long as a wrk run.
- Memory: the kvservice data dir is written offline as one snapshot by
  kvservice's own `write_snapshot` and loaded by normal recovery; RSS from /proc
  after `/readyz` and one Get, minus the RSS of an empty node. redis: the same
  SETs through `redis-cli --pipe`, `INFO memory` used_memory before and after.
- Recovery: the same data dir plus one WAL segment of Sets (overwrites of
  existing keys) written offline with kvservice's record codec and `LogEntry`;
  redis loads an RDB made by `SAVE` of the same keys.
"""


def _method(r: Results) -> str:
    s = r.settings
    return METHOD.format(
        filesystem=r.machine.filesystem,
        rounds=s.rounds,
        warmup=s.warmup_seconds,
        dash=DASH,
        connections=s.connections,
    )


def _machine(r: Results) -> str:
    m = r.machine
    rows = [
        ["cores (usable)", str(m.cores)],
        ["memory", f"{m.memory_gib:.1f} GiB"],
        ["CPU", m.cpu_model],
        ["kernel", m.kernel],
        ["data dir filesystem", m.filesystem],
    ]
    rows += [[name, f"`{version}`"] for name, version in r.versions.items()]
    return "## Machine and versions\n\n" + _table(["what", "value"], rows)


def _commands(r: Results) -> str:
    lines = ["## Exact commands", "", "Servers:", "", "```"]
    lines += [f"{shlex.join(argv)}" for argv in r.commands.values()]
    lines += ["```", "", "Load generators (one line per case, from its last round):", "", "```"]
    lines += list(_load_commands(r))
    lines += [
        "```",
        "",
        "The wrk script (`BODY_FILE` holds the case's request body):",
        "",
        "```lua",
    ]
    lines += [
        WRK_SCRIPT.format(
            content_type="CONTENT_TYPE", extra_headers="", body_path="BODY_FILE", tag=RESULT_TAG
        )
    ]
    lines += ["```", ""]
    return "\n".join(lines)


def _load_commands(r: Results) -> Iterator[str]:
    for case in r.cases:
        runs = r.throughput.get(case.key)
        if runs:
            yield shlex.join(runs[-1].argv)
