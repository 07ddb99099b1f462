"""What one replication push costs the primary: connect-python's client against
the replication channel (kvservice/replication/channel.py), side by side.

    python -m bench.pushcost [--pushes 2000] [--rounds 5]

One replica node (a real process, fsync=always) answers empty pushes (the
probe a session starts with: no entries, so the replica does no disk work and
the figure is the calls' own cost). This process sends them with each client
in alternating rounds, one at a time and then 3 in flight (PUSH_WINDOW), and
measures its own CPU time (user + system, all threads: pyqwest does its I/O
on Rust threads) and the wall time per push. Medians (min-max) over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.replication import start_node
from bench.stats import summarize
from kvservice.replication.channel import ReplicaChannel
from kvservice.replication.primary import PUSH_TIMEOUT_MS, PUSH_WINDOW
from kvservice.v1.replication_connect import ReplicationClient
from kvservice.v1.replication_pb2 import PrimaryInfo, PushRequest

Push = Callable[[PushRequest], Awaitable[object]]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _pushes(push: Push, count: int, in_flight: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per push, `count` pushes with `in_flight` at a time."""
    request = PushRequest(
        primary=PrimaryInfo(url="http://127.0.0.1:1", node_id="bench", epoch=0), prev_revision=0
    )
    await push(request)  # (connects)

    async def worker(n: int) -> None:
        for _ in range(n):
            await push(request)

    cpu, wall = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker(count // in_flight) for _ in range(in_flight)))
    done = count // in_flight * in_flight
    return (_cpu() - cpu) / done * 1e6, (time.perf_counter() - wall) / done * 1e6


async def _connect_python(url: str, count: int, in_flight: int) -> tuple[float, float]:
    async with ReplicationClient(url, timeout_ms=PUSH_TIMEOUT_MS, send_compression=None) as client:
        return await _pushes(client.push, count, in_flight)


async def _channel(url: str, count: int, in_flight: int) -> tuple[float, float]:
    channel = ReplicaChannel(url, timeout_ms=PUSH_TIMEOUT_MS)
    try:
        return await _pushes(channel.push, count, in_flight)
    finally:
        await channel.close()


CLIENTS = {"connect-python client": _connect_python, "replication channel": _channel}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pushcost-") as tmp:
        work = Path(tmp)
        # A replica of a primary that does not exist: it answers every push (refusing
        # this unknown one with its position), which is all a probe needs.
        replica = start_node(work, "replica", work / "data", "--role", "replica",
                             "--primary-url", "http://127.0.0.1:1")  # fmt: skip
        try:
            runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for i in range(args.rounds):
                order = list(CLIENTS.items()) if i % 2 == 0 else list(CLIENTS.items())[::-1]
                for name, client in order:
                    for in_flight in (1, PUSH_WINDOW):
                        figure = asyncio.run(client(replica.url(), args.pushes, in_flight))
                        runs.setdefault((name, in_flight), []).append(figure)
        finally:
            replica.stop()
    print(f"{args.rounds} alternating rounds of {args.pushes:,} empty pushes per case")
    print("| client | in flight | CPU µs / push, median (min-max) | wall µs / push, median |")
    print("|---|---|---|---|")
    medians: dict[tuple[str, int], float] = {}
    for (name, in_flight), figures in runs.items():
        cpu = summarize([c for c, _ in figures])
        medians[name, in_flight] = cpu.median
        wall = statistics.median(w for _, w in figures)
        print(f"| {name} | {in_flight} | {cpu.median:.0f} ({cpu.low:.0f}-{cpu.high:.0f}) | "
              f"{wall:.0f} |")  # fmt: skip
    for in_flight in (1, PUSH_WINDOW):
        ratio = (
            medians["replication channel", in_flight] / medians["connect-python client", in_flight]
        )
        print(f"channel / connect-python, {in_flight} in flight: {ratio:.2f}x CPU per push")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
