"""Prometheus metrics: one registry per node (no global state), and the ASGI
middleware that counts every RPC by method and Connect code."""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvservice.audit import SecurityStats

if TYPE_CHECKING:
    from collections.abc import Awaitable, MutableMapping

    from kvservice.storage.recovery import Recovery

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("kvservice.access")

# Latency buckets from 50 µs (an in-memory read) to 10 s (a stalled disk).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Per replicated entry, from its writer's acknowledgement on the primary to the
# replica's durable acknowledgement: fine steps around the 25 ms lag target.
REPLICATION_LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03,
    0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Connect's mapping for error responses that carry no JSON body.
_STATUS_CODES = {400: "invalid_argument", 404: "unimplemented", 405: "unimplemented",
                 408: "deadline_exceeded", 413: "resource_exhausted", 415: "invalid_argument",
                 429: "resource_exhausted", 503: "unavailable"}  # fmt: skip


class Buckets:
    """A histogram in plain lists: counts per bucket (the last one is +Inf) and their
    sum. Updated on the event loop thread only, so it needs none of the locks that
    prometheus-client's Histogram takes on every update (see RpcStats)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (bucket bounds are inclusive, as `le` says)."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, observations at or below it) pairs, as HistogramMetricFamily takes them."""
        bounds = [*(str(b) for b in self.bounds), "+Inf"]
        return list(zip(bounds, accumulate(self.counts), strict=True))


@dataclass(frozen=True)
class NodeGauges:
    """What the node's gauges read at scrape time (small callables, no node import)."""

    keys: Callable[[], int]
    revision: Callable[[], int]
    durable_revision: Callable[[], int]
    wal_written_bytes: Callable[[], int]
    writes_accepted: Callable[[], int]
    wal_segments: Callable[[], int]
    wal_dir: Path
    last_snapshot_unix: Callable[[], float | None]
    expired_keys: Callable[[], int] = lambda: 0


@dataclass(frozen=True)
class ReplicationGauges:
    """What the replication metrics read at scrape time."""

    role: Callable[[], str]
    epoch: Callable[[], int]
    applied_revision: Callable[[], int]
    replica_lag_seconds: Callable[[], float | None]
    # Per replica: (url, connected, lag revisions, lag seconds, full, partial, retries).
    senders: Callable[[], list[tuple[str, bool, int, float, int, int, int]]]
    digest_mismatches: Callable[[], int]
    # Per replica: (url, lag of each entry from its ack here to the replica's durable ack).
    durable_lags: Callable[[], list[tuple[str, Buckets]]] = lambda: []


class ReplicationStats(Collector):
    """Replication metrics (names fixed by DESIGN.md), read from the node when scraped."""

    def __init__(self, gauges: ReplicationGauges) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        g = self.gauges
        role = GaugeMetricFamily(
            "kvservice_replication_role", "1 for the node's current role", labels=["role"]
        )
        for name in ("primary", "replica"):
            role.add_metric([name], 1 if g.role() == name else 0)
        yield role
        yield GaugeMetricFamily(
            "kvservice_replication_epoch", "Epoch of the node's replication history",
            value=g.epoch(),
        )  # fmt: skip
        senders = g.senders()
        families = {
            "connected": GaugeMetricFamily(
                "kvservice_replica_connected", "1 while the link to the replica works",
                labels=["replica"]),
            "lag_revisions": GaugeMetricFamily(
                "kvservice_replica_lag_revisions",
                "Revisions the replica has not acknowledged", labels=["replica"]),
            "lag_seconds": GaugeMetricFamily(
                "kvservice_replica_lag_seconds",
                "Age of the oldest durable entry the replica has not acknowledged",
                labels=["replica"]),
        }  # fmt: skip
        resyncs = CounterMetricFamily(
            "kvservice_replication_resyncs", "Resyncs started, by replica and kind",
            labels=["replica", "kind"],
        )  # fmt: skip
        retries = CounterMetricFamily(
            "kvservice_replication_retries", "Retries of a failed replication link",
            labels=["replica"],
        )  # fmt: skip
        for url, connected, lag_revisions, lag_seconds, full, partial, tries in senders:
            families["connected"].add_metric([url], 1 if connected else 0)
            families["lag_revisions"].add_metric([url], lag_revisions)
            families["lag_seconds"].add_metric([url], lag_seconds)
            resyncs.add_metric([url, "full"], full)
            resyncs.add_metric([url, "partial"], partial)
            retries.add_metric([url], tries)
        yield from families.values()
        yield resyncs
        yield retries
        durable_lag = HistogramMetricFamily(
            "kvservice_replica_durable_lag_seconds",
            "Per entry: seconds from its writer's acknowledgement here (durable on this"
            " primary) until the replica acknowledged it durable",
            labels=["replica"],
        )  # fmt: skip
        for url, lags in g.durable_lags():
            durable_lag.add_metric([url], lags.cumulative(), sum_value=lags.sum)
        yield durable_lag
        yield GaugeMetricFamily(
            "kvservice_replication_applied_revision",
            "Last revision this node applied (on a replica: of its primary's log)",
            value=g.applied_revision(),
        )  # fmt: skip
        yield CounterMetricFamily(
            "kvservice_replication_digest_mismatches",
            "State digests that differed from the primary's at the same revision",
            value=g.digest_mismatches(),
        )  # fmt: skip
        lag = g.replica_lag_seconds()
        yield GaugeMetricFamily(
            "kvservice_replication_lag_seconds",
            "How far this replica is behind its primary, in seconds (0 on a primary)",
            value=lag if lag is not None else 0.0,
        )  # fmt: skip


class Metrics:
    """Every metric kvservice exports, registered in its own registry."""

    def __init__(self) -> None:
        # The *_created series double the output and no alert or dashboard here uses them.
        # (prometheus-client only offers this switch process-wide.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.rpcs = RpcStats()
        r.register(self.rpcs)
        self.security = SecurityStats()
        r.register(self.security)
        self.fsync_seconds = Histogram(
            "kvservice_wal_fsync_duration_seconds", "Time of one WAL fsync",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "kvservice_wal_group_commit_writes", "Writes made durable by one group-commit fsync",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.snapshot_seconds = Histogram(
            "kvservice_snapshot_duration_seconds", "Time to write a snapshot",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )  # fmt: skip
        self.snapshot_failures = Counter(
            "kvservice_snapshot_failures", "Snapshots that failed", registry=r
        )
        self.keys = Gauge("kvservice_keys", "Keys in the store", registry=r)
        self.revision = Gauge("kvservice_revision", "Current (last committed) revision", registry=r)
        self.durable_revision = Gauge(
            "kvservice_durable_revision",
            "Durable watermark: the highest revision durable per the fsync policy", registry=r,
        )  # fmt: skip
        self.wal_bytes = Gauge(
            "kvservice_wal_size_bytes", "Bytes in WAL segments on disk", registry=r
        )
        self.wal_segments = Gauge("kvservice_wal_segments", "WAL segment files on disk", registry=r)
        self.wal_written = Gauge(
            "kvservice_wal_written_bytes", "Bytes appended to the WAL by this process", registry=r
        )
        self.writable = Gauge(
            "kvservice_writes_accepted", "1 while the node accepts writes, 0 after a disk failure",
            registry=r,
        )  # fmt: skip
        self.snapshot_age = Gauge(
            "kvservice_snapshot_age_seconds",
            "Seconds since the newest snapshot was written (since start when there is none)",
            registry=r,
        )
        self.recovery_seconds = Gauge(
            "kvservice_recovery_duration_seconds", "Time start-up recovery took", registry=r
        )
        self.recovery_records = Gauge(
            "kvservice_recovery_replayed_records", "WAL records replayed at start-up", registry=r
        )
        self.watch_streams = Gauge(
            "kvservice_watch_streams", "Watch streams open (live or reading the backlog)",
            registry=r,
        )  # fmt: skip
        self.watch_too_slow = Counter(
            "kvservice_watch_too_slow",
            "Watch streams ended with resource_exhausted: their consumer read too slowly",
            registry=r,
        )  # fmt: skip
        self.started = time.time()

    def observe_fsync(self, seconds: float, batch: int) -> None:
        self.fsync_seconds.observe(seconds)
        if batch:
            self.batch_size.observe(batch)

    def observe_recovery(self, recovery: Recovery) -> None:
        self.recovery_seconds.set(recovery.seconds)
        self.recovery_records.set(recovery.records_replayed)

    def watch_replication(self, gauges: ReplicationGauges) -> None:
        self.registry.register(ReplicationStats(gauges))

    def watch(self, node: NodeGauges) -> None:
        """Read gauges from the node at scrape time instead of on every write."""
        self.keys.set_function(node.keys)
        self.revision.set_function(node.revision)
        self.durable_revision.set_function(node.durable_revision)
        self.wal_written.set_function(node.wal_written_bytes)
        self.writable.set_function(node.writes_accepted)
        self.wal_segments.set_function(node.wal_segments)
        self.wal_bytes.set_function(lambda: _dir_bytes(node.wal_dir))
        self.snapshot_age.set_function(
            lambda: time.time() - (node.last_snapshot_unix() or self.started)
        )
        self.registry.register(ExpiryStats(node.expired_keys))


class ExpiryStats(Collector):
    """Keys the expiry cycle removed (a counter read at scrape time)."""

    def __init__(self, expired: Callable[[], int]) -> None:
        self.expired = expired

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kvservice_expired_keys",
            "Keys removed because their TTL passed (by this node as primary)",
        )
        family.add_metric([], self.expired())
        yield family


class RpcStats(Collector):
    """RPC counts and latencies, kept in plain dicts and exported at scrape time.

    Updated on the event loop thread only, so it needs none of the locks that
    prometheus-client's Counter and Histogram take on every update — the
    difference is a measurable share of a ~100 µs request.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Buckets] = {}

    def record(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self.counts[key] = self.counts.get(key, 0) + 1
        latency = self.latency.get(method)
        if latency is None:
            latency = self.latency[method] = Buckets(LATENCY_BUCKETS)
        latency.observe(seconds)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "kvservice_rpc_requests", "RPCs served, by method and Connect code",
            labels=["method", "code"],
        )  # fmt: skip
        for (method, code), count in sorted(self.counts.items()):
            requests.add_metric([method, code], count)
        yield requests
        latency = HistogramMetricFamily(
            "kvservice_rpc_duration_seconds", "Time to serve an RPC, by method", labels=["method"]
        )
        for method, buckets in sorted(self.latency.items()):
            latency.add_metric([method], buckets.cumulative(), sum_value=buckets.sum)
        yield latency


def _dir_bytes(wal_dir: Path) -> int:
    total = 0
    for path in wal_dir.glob("*.wal"):
        try:
            total += path.stat().st_size
        except OSError:
            continue  # deleted by a purge between glob and stat
    return total


class RpcMetricsMiddleware:
    """Counts and times every RPC under `prefix`, reading the Connect code from the reply."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        prefix: str,
        *,
        methods: frozenset[str],
        streaming: frozenset[str] = frozenset(),
        log_access: bool,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.prefix = prefix
        # Made-up method names are counted as "unknown": one series each would be unbounded.
        self.methods = methods
        # Their answers are 200 whatever happens: the code is in the end-of-stream message.
        self.streaming = streaming
        self.log_access = log_access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        method = path[len(self.prefix) :]
        if method not in self.methods:
            method = "unknown"
        started = time.perf_counter()
        status = 0
        error_body = b""
        streaming = method in self.streaming
        last_chunk = b""

        async def observing_send(message: Message) -> None:
            nonlocal status, error_body, last_chunk
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if streaming:
                    last_chunk = message.get("body", b"") or last_chunk
                elif status != 200:
                    error_body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            if status != 200:
                code = _connect_code(status, error_body)
            else:
                code = _end_of_stream_code(last_chunk) if streaming else "ok"
            seconds = time.perf_counter() - started
            self.metrics.rpcs.record(method, code, seconds)
            if self.log_access:
                client = scope.get("client")
                access_log.info(
                    "rpc",
                    extra={
                        "method": method, "code": code, "status": status,
                        "ms": round(seconds * 1000, 3), "http_method": scope.get("method"),
                        "client": f"{client[0]}:{client[1]}" if client else None,
                    },
                )  # fmt: skip


def _end_of_stream_code(chunk: bytes) -> str:
    """The Connect code in a stream's end-of-stream message (flag 0x02), which
    connect-python sends as the last body chunk: its `error.code`, or "ok" without
    one; "canceled" when the stream ended without it (the client went away)."""
    offset = 0
    while offset + 5 <= len(chunk):
        flags, size = chunk[offset], int.from_bytes(chunk[offset + 1 : offset + 5], "big")
        if flags & 0x02:
            try:
                error = json.loads(chunk[offset + 5 : offset + 5 + size]).get("error")
            except (ValueError, AttributeError):
                return "unknown"
            return str(error.get("code", "unknown")) if isinstance(error, dict) else "ok"
        offset += 5 + size
    return "canceled"


def _connect_code(status: int, body: bytes) -> str:
    if status == 0:
        return "canceled"
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        code = None
    return str(code) if code else _STATUS_CODES.get(status, "unknown")
