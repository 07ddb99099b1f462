"""Throughput cases: which requests, against which server, in alternating rounds.

Every system runs as one process for the whole run; each round runs every case
once, starting one case later than the previous round, so slow drift of the
machine (page cache, thermal, neighbours) spreads over all cases instead of
landing on whichever ran last.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import dataset
from bench.load import HttpLoad, LoadResult, RedisLoad, run_http, run_redis
from bench.procs import BenchError, http_post
from bench.servers import Server

log = logging.getLogger("bench.throughput")

CONNECT_JSON = "application/json"
CONNECT_PROTO = "application/proto"
KV_PATH = "/kvservice.v1.KVStore/"


@dataclass(frozen=True)
class Case:
    """One measured workload; `key` is stable and used by ratios and targets."""

    key: str
    label: str
    system: str
    op: str  # "get" or "set": which peer figure it is compared with
    pid: int  # the server process
    run: Callable[[int], LoadResult] = field(compare=False)  # argument: seconds


@dataclass
class Settings:
    seconds: int
    rounds: int
    connections: int
    warmup_seconds: int
    generator: str  # "wrk" or "python"
    redis_rps_guess: int  # sizes redis-benchmark's request count to about `seconds`


# kvservice's group-commit counters (see kvservice/metrics.py); absent ones read as 0.
WAL_COUNTERS = {
    "fsyncs": "kvservice_wal_fsync_duration_seconds_count",
    "fsync_seconds": "kvservice_wal_fsync_duration_seconds_sum",
    "batched_writes": "kvservice_wal_group_commit_writes_sum",
    "batches": "kvservice_wal_group_commit_writes_count",
}


def wal_counters(server: Server) -> dict[str, float]:
    """Unlabelled WAL counters from kvservice's /metrics (empty if unreadable)."""
    try:
        with urllib.request.urlopen(server.url("/metrics"), timeout=5) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    found = {}
    for short, metric in WAL_COUNTERS.items():
        try:
            found[short] = float(values[metric])
        except (KeyError, ValueError):
            continue
    return found


@dataclass(frozen=True)
class HttpSpec:
    """What an HTTP case sends, and where."""

    key: str
    label: str
    op: str
    server: Server
    path: str
    body: bytes
    content_type: str = CONNECT_JSON


def http_case(spec: HttpSpec, work: Path, settings: Settings, *, probe: bool = False) -> Case:
    """A case that POSTs one fixed body; sent once up front so a misconfigured case
    fails loudly instead of measuring error replies. With `probe`, each run also
    reads kvservice's WAL counters before and after."""
    body_path = work / f"{spec.key}.body"
    body_path.write_bytes(spec.body)
    server, url = spec.server, spec.server.url(spec.path)
    reply = http_post(url, spec.body, spec.content_type)
    log.debug("%s first reply: %r", spec.key, reply[:200])

    def run(seconds: int) -> LoadResult:
        load = HttpLoad(url, body_path, spec.content_type, settings.connections, seconds)
        if not probe:
            return run_http(load, server.pid, settings.generator)
        before = wal_counters(server)
        result = run_http(load, server.pid, settings.generator)
        after = wal_counters(server)
        delta = {k: after[k] - before[k] for k in after.keys() & before.keys()}
        return dataclasses.replace(result, extra=delta)

    return Case(spec.key, spec.label, server.system, spec.op, server.pid, run)


CODECS = {"json": ("JSON", CONNECT_JSON), "proto": ("proto", CONNECT_PROTO)}


def python_specs(servers: dict[str, Server]) -> list[HttpSpec]:
    """The bare ASGI ceiling, the connect-python floor, then kvservice Get and Set."""
    get = KV_PATH + "Get"
    specs = [
        HttpSpec(
            "asgi",
            "bare ASGI app, fixed body",
            "get",
            servers["bare-asgi"],
            "/",
            dataset.kv_body("Get", "json"),
        ),
    ]
    for system, name in (("bare-connect", "connect"), ("kvservice", "kv")):
        label = "bare connect-python" if name == "connect" else "kvservice"
        for codec, (shown, content_type) in CODECS.items():
            specs.append(
                HttpSpec(
                    f"{name}-get-{codec}",
                    f"{label} Get, {shown}",
                    "get",
                    servers[system],
                    get,
                    dataset.kv_body("Get", codec),
                    content_type,
                )
            )
    for fsync, system in (("always", "kvservice"), ("no", "kvservice-fsync-no")):
        for codec, (shown, content_type) in CODECS.items():
            specs.append(
                HttpSpec(
                    f"kv-set-{codec}-{fsync}",
                    f"kvservice Set, {shown}, fsync={fsync}",
                    "set",
                    servers[system],
                    KV_PATH + "Set",
                    dataset.kv_body("Set", codec),
                    content_type,
                )
            )
    return specs


# The second checkout of a before/after run (--compare-repo): its server's name, and
# the suffix of its cases' keys (so `--only kv-get` selects both sides).
COMPARE_SYSTEM = "kvservice-compare"
COMPARE_SUFFIX = "-cmp"
# kvservice cases that are repeated against the second checkout: the hot path.
COMPARED = ("kv-get-json", "kv-get-proto", "kv-set-json-always", "kv-set-proto-always")


def compare_specs(specs: list[HttpSpec], other: Server, label: str) -> list[HttpSpec]:
    """`specs`, with a twin of each COMPARED case against `other` right after it, so that
    the two sides of a pair run back to back in every round."""
    out = []
    for spec in specs:
        out.append(spec)
        if spec.key in COMPARED:
            out.append(
                dataclasses.replace(
                    spec,
                    key=spec.key + COMPARE_SUFFIX,
                    label=spec.label.replace("kvservice", f"kvservice ({label})", 1),
                    server=other,
                )
            )
    return out


def python_cases(
    servers: dict[str, Server], work: Path, settings: Settings, compare_label: str = "after"
) -> list[Case]:
    """The Python cases; with a COMPARE_SYSTEM server, also its twins of COMPARED."""
    specs = python_specs(servers)
    # Get must find its key in kvservice: write it once through the API.
    kvs = [servers["kvservice"]]
    if COMPARE_SYSTEM in servers:
        kvs.append(servers[COMPARE_SYSTEM])
        specs = compare_specs(specs, servers[COMPARE_SYSTEM], compare_label)
    for kv in kvs:
        http_post(kv.url(KV_PATH + "Set"), dataset.kv_body("Set", "json"), CONNECT_JSON)
    # Set cases also read the WAL counters, to show how well group commit batches.
    return [http_case(spec, work, settings, probe=spec.op == "set") for spec in specs]


def etcd_cases(etcd: Server, work: Path, settings: Settings) -> list[Case]:
    """etcd's v3 JSON gateway, driven by the same wrk script as kvservice."""
    put, rng = dataset.etcd_body("put"), dataset.etcd_body("range")
    serializable = rng[:-1] + b', "serializable": true}'
    http_post(etcd.url("/v3/kv/put"), put, CONNECT_JSON)  # range must find the key
    gateway = "JSON gateway"
    specs = [
        HttpSpec(
            "etcd-range", f"etcd range (linearizable), {gateway}", "get", etcd, "/v3/kv/range", rng
        ),
        HttpSpec(
            "etcd-range-serializable",
            f"etcd range (serializable), {gateway}",
            "get",
            etcd,
            "/v3/kv/range",
            serializable,
        ),
        HttpSpec("etcd-put", f"etcd put, {gateway}", "set", etcd, "/v3/kv/put", put),
    ]
    return [http_case(spec, work, settings) for spec in specs]


def redis_cases(redis: Server, settings: Settings) -> list[Case]:
    """redis-benchmark GET and SET, one request at a time and pipelined 16 deep."""
    cases = []
    for command in ("get", "set"):
        for pipeline in (1, 16):
            suffix = "" if pipeline == 1 else f"-p{pipeline}"
            label = f"redis {command.upper()}" + ("" if pipeline == 1 else f", pipeline {pipeline}")
            run = _redis_runner(redis, command, pipeline, settings)
            cases.append(Case(f"redis-{command}{suffix}", label, "redis", command, redis.pid, run))
    # SET once so GET reads a 100-byte value, as every other Get case does.
    run_redis(RedisLoad(redis.port, "set", 1, settings.connections, 1000), redis.pid)
    return cases


def _redis_runner(
    redis: Server, command: str, pipeline: int, settings: Settings
) -> Callable[[int], LoadResult]:
    # redis-benchmark runs a request count, not a duration: scale the count so a
    # run lasts about as long as a wrk run.
    per_second = settings.redis_rps_guess * (8 if pipeline > 1 else 1)

    def run(seconds: int) -> LoadResult:
        requests = max(1000, per_second * seconds)
        load = RedisLoad(redis.port, command, pipeline, settings.connections, requests)
        return run_redis(load, redis.pid)

    return run


def run_rounds(cases: list[Case], settings: Settings) -> dict[str, list[LoadResult]]:
    """Run every case `rounds` times, rotating the order each round."""
    if settings.warmup_seconds:
        for case in cases:
            case.run(settings.warmup_seconds)  # discarded: connections, caches, lazy imports
    rounds = settings.rounds
    results: dict[str, list[LoadResult]] = {case.key: [] for case in cases}
    for round_no in range(rounds):
        shift = round_no % len(cases)
        for case in cases[shift:] + cases[:shift]:
            result = case.run(settings.seconds)
            if result.requests == 0:
                raise BenchError(f"{case.label}: no request completed")
            results[case.key].append(result)
            log.info(
                "round %d/%d %-42s %9.0f req/s  server %.2f cores  generator %.2f cores",
                round_no + 1,
                rounds,
                case.label,
                result.rps,
                result.server_cpu,
                result.generator_cpu,
            )
    return results
