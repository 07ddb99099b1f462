"""Watch fan-out (issue 10): 1,000 streams on one prefix against Redis pub/sub.

    python -m bench.watch            # about 3 minutes: bench/results/watch.md
    python -m bench.watch --smoke    # seconds, 20 streams: bench/results/watch-smoke.md
    python -m bench.run --only watch # the same from the harness

1. The node's maximum Set rate: wrk, binary protobuf Sets of the benchmark's
   value size, 64 connections, fsync=always, no watcher open.
2. kvservice: `streams` Watch streams on the prefix `fan:` (binary protobuf,
   split over subscriber processes), then a writer at half that maximum rate
   (fixed schedule over a few keep-alive connections) for `seconds`.
3. redis-server: the same number of subscribers to one channel, a publisher
   at the same rate with payloads of the same size.

Every payload starts with (sequence number, send time on the machine-wide
monotonic clock). A write's *commit* lies between its send and its
acknowledgement, so delivery latency is reported from both ends: from the
send (an upper bound of commit -> receipt) and from the writer's receipt of
the acknowledgement (a lower bound; it can be negative, a watcher may hear of
a write before its writer does). Latencies come from a sample of the streams,
which parse every event; all streams count what they get and check that
revisions are consecutive (kvservice) or the count is complete (Redis).
Server CPU per delivered event = the server process's CPU time over the
window, divided by the events it delivered (writes x streams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import uvloop

from bench.load import HttpLoad, run_http
from bench.peers import start_redis
from bench.procs import BenchError, cpu_seconds, machine_busy_seconds
from bench.servers import REPO, Server, start_kvservice
from bench.stats import TIMES
from kvservice.v1.kv_pb2 import SetRequest, SetResponse, WatchRequest, WatchResponse

log = logging.getLogger("bench.watch")
OUT = REPO / "bench" / "results"
PREFIX = "fan:"
CHANNEL = b"fan"
HEADER = struct.Struct(">QQ")  # sequence number, send time (monotonic ns)


# A rate both systems sustain on this rig, so that latency compares delivery
# rather than clients starved of CPU (see "How to read it" in the results).
LOW_RATE = 100.0


@dataclass
class Plan:
    smoke: bool
    streams: int
    processes: int
    sampled: int  # streams (in all) that time every event
    seconds: float
    max_rate_seconds: int
    value_bytes: int
    writer_connections: int

    @classmethod
    def make(cls, smoke: bool) -> Plan:
        if smoke:
            return cls(True, 20, 2, 4, 3, 2, 100, 4)
        return cls(False, 1000, 2, 50, 20, 5, 100, 128)


# -- the write side -----------------------------------------------------------------


@dataclass
class Writes:
    """What the writer did: per sequence number, send and acknowledgement times."""

    sent_ns: dict[int, int] = field(default_factory=dict)
    acked_ns: dict[int, int] = field(default_factory=dict)
    failed: int = 0
    started: float = 0.0
    ended: float = 0.0


def payload(seq: int, size: int) -> bytes:
    head = HEADER.pack(seq, time.monotonic_ns())
    return head + b"x" * max(0, size - len(head))


async def write_at_rate(port: int, system: str, plan: Plan, rate: float) -> Writes:
    """Sets (kvservice) or PUBLISHes (redis) due at start + n / rate, on `connections`."""
    writes = Writes()
    size = plan.value_bytes
    start = time.monotonic() + 0.1
    end = start + plan.seconds
    issued = 0

    def next_seq() -> int | None:
        nonlocal issued
        # Stop at the end of the window even when behind schedule: the run stays
        # bounded, and the rate achieved is reported.
        if start + issued / rate >= end or time.monotonic() >= end:
            return None
        issued += 1
        return issued

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (seq := next_seq()) is not None:
                await asyncio.sleep(max(0.0, start + (seq - 1) / rate - time.monotonic()))
                body = payload(seq, size)
                writes.sent_ns[seq] = HEADER.unpack_from(body)[1]
                writer.write(_kv_set(port, seq, body) if system == "kvservice" else _publish(body))
                ok = await (_kv_reply(reader) if system == "kvservice" else _redis_reply(reader))
                if ok:
                    writes.acked_ns[seq] = time.monotonic_ns()
                else:
                    writes.failed += 1
        finally:
            writer.close()

    writes.started = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(plan.writer_connections)))
    writes.ended = time.monotonic()
    return writes


def _kv_set(port: int, seq: int, value: bytes) -> bytes:
    body = SetRequest(key=f"{PREFIX}{seq % 1000}", value=value).SerializeToString()
    return (
        f"POST /kvservice.v1.KVStore/Set HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/proto\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _kv_reply(reader: asyncio.StreamReader) -> bool:
    head = await reader.readuntil(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    if length is not None:
        body = await reader.readexactly(length)
    else:  # chunked (uvicorn's choice for connect-python's replies)
        body = b""
        while size := int((await reader.readline()).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
    if not head.startswith(b"HTTP/1.1 200"):
        return False
    return SetResponse.FromString(body).revision > 0


def _publish(message: bytes) -> bytes:
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(CHANNEL), CHANNEL, len(message), message,
    )  # fmt: skip


async def _redis_reply(reader: asyncio.StreamReader) -> bool:
    line = await reader.readline()
    return line.startswith(b":")


# -- the subscriber processes ---------------------------------------------------------


class KvStream(asyncio.Protocol):
    """One Watch stream over raw HTTP/1.1 (chunked body, Connect envelopes)."""

    def __init__(self, sampled: bool) -> None:
        self.sampled = sampled
        self.buffer = bytearray()
        self.body = bytearray()
        self.headers_done = False
        self.live = asyncio.get_running_loop().create_future()
        self.events = 0
        self.last_revision = -1
        self.gaps = 0
        self.receipts: list[tuple[int, int]] = []  # (seq, receipt ns)
        self.error = ""

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.buffer += data
        if not self.headers_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            del self.buffer[: end + 4]
            self.headers_done = True
        self._chunks()
        self._messages(now)

    def _chunks(self) -> None:
        # Offsets, and one deletion per call: trimming the front per chunk would
        # copy the rest of the buffer each time.
        buffer, at = self.buffer, 0
        while (line_end := buffer.find(b"\r\n", at)) >= 0:
            size = int(buffer[at:line_end], 16)
            if len(buffer) < line_end + 2 + size + 2:
                break
            self.body += buffer[line_end + 2 : line_end + 2 + size]
            at = line_end + 2 + size + 2
        del buffer[:at]

    def _messages(self, now: int) -> None:
        body, at = self.body, 0
        while len(body) - at >= 5:
            flags, size = struct.unpack_from(">BI", body, at)
            if len(body) - at < 5 + size:
                break
            message = bytes(body[at + 5 : at + 5 + size])
            at += 5 + size
            if flags & 2:
                self.error = message.decode(errors="replace")
                continue
            self._message(WatchResponse.FromString(message), now)
        del body[:at]

    def _message(self, response: WatchResponse, now: int) -> None:
        events = response.events
        if not events:
            if not self.live.done():
                self.live.set_result(None)
                self.last_revision = response.progress_revision
            return
        first, last = events[0].revision, events[-1].revision
        if first != self.last_revision + 1 or last - first + 1 != len(events):
            self.gaps += 1
        self.last_revision = last
        self.events += len(events)
        if self.sampled:
            self.receipts.extend((HEADER.unpack_from(e.value)[0], now) for e in events)


class RedisStream(asyncio.Protocol):
    """One SUBSCRIBE connection; every message has one size, so bytes count messages."""

    def __init__(self, sampled: bool, value_bytes: int) -> None:
        self.sampled = sampled
        self.head = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n" % (
            len(CHANNEL), CHANNEL, value_bytes,
        )  # fmt: skip
        self.size = len(self.head) + value_bytes + 2
        self.confirm = b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(CHANNEL), CHANNEL)
        self.live = asyncio.get_running_loop().create_future()
        self.pending = b""
        self.bytes = 0
        self.receipts: list[tuple[int, int]] = []
        self.gaps = 0
        self.error = ""

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.live.done():
            data = self.pending + data
            if len(data) < len(self.confirm):
                self.pending = data
                return
            data = data[len(self.confirm) :]
            self.live.set_result(None)
        self.bytes += len(data)
        if self.sampled:
            data = self.pending + data
            whole = len(data) // self.size * self.size
            for offset in range(0, whole, self.size):
                self.receipts.append((HEADER.unpack_from(data, offset + len(self.head))[0], now))
            self.pending = data[whole:]

    @property
    def events(self) -> int:
        return self.bytes // self.size


async def _connect(protocol: asyncio.Protocol, port: int) -> asyncio.WriteTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(lambda: protocol, "127.0.0.1", port)
    return transport


async def subscribe(args: argparse.Namespace) -> None:
    """Open the streams, say "ready" once all are live, run until stdin closes."""
    loop = asyncio.get_running_loop()
    streams: list[KvStream | RedisStream] = []
    for i in range(args.streams):
        sampled = i < args.sampled
        if args.system == "kvservice":
            kv = KvStream(sampled)
            transport = await _connect(kv, args.port)
            request = WatchRequest(prefix=PREFIX).SerializeToString()
            body = struct.pack(">BI", 0, len(request)) + request
            transport.write(
                b"POST /kvservice.v1.KVStore/Watch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/connect+proto\r\nConnect-Protocol-Version: 1\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            streams.append(kv)
        else:
            redis = RedisStream(sampled, args.value_bytes)
            transport = await _connect(redis, args.port)
            transport.write(b"SUBSCRIBE %s\r\n" % CHANNEL)
            streams.append(redis)
    await asyncio.wait_for(asyncio.gather(*(s.live for s in streams)), 120)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # the harness closes it when done
    result = {
        "events": [s.events for s in streams],
        "gaps": sum(s.gaps for s in streams),
        "errors": [s.error for s in streams if s.error],
        "receipts": [r for s in streams for r in s.receipts],
    }
    await asyncio.to_thread(Path(args.out).write_text, json.dumps(result))


# -- the harness --------------------------------------------------------------------


@dataclass
class Run:
    system: str
    rate: float
    achieved_rate: float
    writes: int
    acked: int
    failed: int
    streams: int
    complete_streams: int
    delivered: int
    gaps: int
    errors: list[str]
    from_send_ms: tuple[float, float]
    from_ack_ms: tuple[float, float]
    server_cpu_seconds: float
    window_seconds: float
    other_cpu_cores: float

    @property
    def cpu_us_per_event(self) -> float:
        return self.server_cpu_seconds / self.delivered * 1e6 if self.delivered else 0.0


def percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


def fan_out(plan: Plan, server: Server, system: str, rate: float, work: Path) -> Run:
    """Subscribers in child processes, the writer here; measured over the write window."""
    per = plan.streams // plan.processes
    children = []
    for n in range(plan.processes):
        out = work / f"{system}-sub{n}.json"
        argv = [
            sys.executable, "-m", "bench.watch", "--subscriber", system,
            "--port", str(server.port), "--streams", str(per),
            "--sampled", str(plan.sampled // plan.processes),
            "--value-bytes", str(plan.value_bytes), "--out", str(out),
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True
        )
        children.append((proc, out))
    for proc, _ in children:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise BenchError(f"{system}: a subscriber process did not get its streams live")
    cpu0, machine0, wall0 = cpu_seconds(server.pid), machine_busy_seconds(), time.monotonic()
    writes = uvloop.run(write_at_rate(server.port, system, plan, rate))
    time.sleep(2)  # deliveries still in flight
    cpu = cpu_seconds(server.pid) - cpu0
    wall = time.monotonic() - wall0
    machine = machine_busy_seconds() - machine0
    results = []
    for proc, out in children:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(60)
        results.append(json.loads(out.read_text()))
    counts = [c for r in results for c in r["events"]]
    receipts = [(seq, at) for r in results for seq, at in r["receipts"]]
    from_send = [(at - writes.sent_ns[seq]) / 1e6 for seq, at in receipts if seq in writes.sent_ns]
    from_ack = [(at - writes.acked_ns[seq]) / 1e6 for seq, at in receipts if seq in writes.acked_ns]
    acked = len(writes.acked_ns)
    return Run(
        system=system, rate=rate, writes=len(writes.sent_ns), acked=acked,
        achieved_rate=len(writes.sent_ns) / max(1e-9, writes.ended - writes.started),
        failed=writes.failed, streams=len(counts),
        complete_streams=sum(c == acked for c in counts), delivered=sum(counts),
        gaps=sum(r["gaps"] for r in results),
        errors=[e for r in results for e in r["errors"]][:3],
        from_send_ms=percentiles(from_send), from_ack_ms=percentiles(from_ack),
        server_cpu_seconds=cpu, window_seconds=wall,
        other_cpu_cores=max(0.0, machine - cpu) / wall,
    )  # fmt: skip


def max_set_rate(plan: Plan, server: Server, work: Path) -> float:
    body = work / "set.body"
    body.write_bytes(SetRequest(key="max:1", value=b"x" * plan.value_bytes).SerializeToString())
    load = HttpLoad(server.url("/kvservice.v1.KVStore/Set"), body, "application/proto", 64,
                    plan.max_rate_seconds)  # fmt: skip
    result = run_http(load, server.pid, "wrk")
    if result.errors:
        raise BenchError(f"wrk saw {result.errors} errors measuring the maximum Set rate")
    return result.rps


SMOKE_NOTE = " (smoke: tiny counts, figures mean nothing)"
TABLE_HEAD = (
    "| system | rate asked /s | rate achieved /s | writes acked | streams"
    " | streams with every event | gaps"
    " | latency from send p50 / p99 ms | latency from ack p50 / p99 ms | server cores"
    " | server CPU \u00b5s per delivered event | other cores busy |\n" + "|---" * 12 + "|"
)


def _ratios(kv: Run, redis: Run) -> str:
    def of(a: float, b: float) -> str:
        return f"{a / b:.1f}{TIMES}" if b > 0 else "n/a"

    return (
        f"at {kv.rate:,.0f}/s asked: server CPU per delivered event"
        f" **{of(kv.cpu_us_per_event, redis.cpu_us_per_event)}**, latency from send p50"
        f" **{of(kv.from_send_ms[0], redis.from_send_ms[0])}**, p99"
        f" **{of(kv.from_send_ms[1], redis.from_send_ms[1])}**"
    )


def render(plan: Plan, max_rate: float, runs: list[Run], started: datetime) -> str:
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    ratios = ";\n".join(_ratios(kv, redis) for kv, redis in pairs)
    rows = "\n".join(
        f"| {r.system} | {r.rate:,.0f} | {r.achieved_rate:,.0f} | {r.acked:,} | {r.streams:,}"
        f" | {r.complete_streams:,}"
        f" | {r.gaps} | {r.from_send_ms[0]:.1f} / {r.from_send_ms[1]:.1f}"
        f" | {r.from_ack_ms[0]:.1f} / {r.from_ack_ms[1]:.1f}"
        f" | {r.server_cpu_seconds / r.window_seconds:.2f} | {r.cpu_us_per_event:.2f}"
        f" | {r.other_cpu_cores:.2f} |"
        for r in runs
    )
    errors = "; ".join(f"{r.system}: {r.errors}" for r in runs if r.errors) or "none"
    return f"""# Watch fan-out: kvservice Watch against Redis pub/sub

Run {started:%Y-%m-%d %H:%M} UTC{SMOKE_NOTE if plan.smoke else ""}
on this machine ({os.cpu_count()} cores, shared with other work: see the last column).

Command: `python -m bench.watch{" --smoke" if plan.smoke else ""}` (about 3 minutes).

Conditions: one kvservice node (fsync=always, defaults otherwise) and one
redis-server (no persistence), both on 127.0.0.1. The node's maximum Set rate,
wrk with 64 connections and {plan.value_bytes}-byte values, no watcher open:
**{max_rate:,.0f}/s**; both systems then get writes at half of it,
{max_rate / 2:,.0f}/s, and at {LOW_RATE:.0f}/s, for {plan.seconds:.0f} s each, from
{plan.writer_connections} keep-alive connections on a fixed schedule, {plan.value_bytes}-byte values
(kvservice: Sets of 1,000 keys under `{PREFIX}`; Redis: PUBLISH to one
channel). {plan.streams:,} streams (kvservice: `Watch(prefix="{PREFIX}")`,
binary protobuf; Redis: SUBSCRIBE), in {plan.processes} subscriber processes of
raw asyncio connections; {plan.sampled} of them time every event.

{TABLE_HEAD}
{rows}

Ratios, kvservice / Redis, {ratios}.

Stream errors: {errors}.

How to read it: a write's commit lies between its send and its
acknowledgement, so "from send" is an upper bound of commit -> receipt
(kvservice's includes the fsync of fsync=always; Redis pub/sub persists
nothing) and "from ack" a lower bound (negative: a watcher heard of the write
before its writer did). "Server CPU per delivered event" is the server
process's CPU time over the window divided by writes {TIMES} streams. kvservice
batches: under load a stream's message carries every event queued for it since
its last one, so its cost per event falls as the rate rises; Redis writes every
message to every subscriber's socket buffer.
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.watch", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="seconds, 20 streams")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/watch.md)")
    # The subscriber processes the harness starts:
    parser.add_argument("--subscriber", choices=["kvservice", "redis"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sampled", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--value-bytes", type=int, default=100, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.subscriber:
        args.system = args.subscriber
        uvloop.run(subscribe(args))  # the client's loop costs less per socket read
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = Plan.make(args.smoke)
    run(plan, args.out or OUT / ("watch-smoke.md" if plan.smoke else "watch.md"))


def run(plan: Plan, out: Path) -> Path:
    """Both systems at both rates -> `out` (also `python -m bench.run --only watch`)."""
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        work = Path(tmp)
        kv = start_kvservice(work, "kvservice", work / "kv-data")
        try:
            max_rate = max_set_rate(plan, kv, work)
            log.info("maximum Set rate %.0f/s; fan-out at half of it", max_rate)
            rates = (max_rate / 2, LOW_RATE)
            kv_runs = [fan_out(plan, kv, "kvservice", rate, work) for rate in rates]
            log.info("kvservice: %s", kv_runs)
        finally:
            kv.stop()
        redis = start_redis(work)
        try:
            redis_runs = [fan_out(plan, redis, "redis", rate, work) for rate in rates]
            log.info("redis: %s", redis_runs)
        finally:
            redis.stop()
    runs = [run for pair in zip(kv_runs, redis_runs, strict=True) for run in pair]
    out.write_text(render(plan, max_rate, runs, started))
    log.info("wrote %s", out)
    return out


if __name__ == "__main__":
    main()
