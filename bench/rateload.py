"""A light fixed-rate Set load that records every request, for latency in a time window.

    python -m bench.rateload URL --rate 500 --connections 8 --seconds 6 --keys 1000000 --out F

Request n is due at start + n / rate and overwrites a random existing key
(`user:NNNNNN:session`, 100-byte value, Connect protobuf). Its latency counts
from when it was due, not from when it was sent, so a server stall shows up in
every request it delays (no coordinated omission) as long as the connections
keep up with the rate. One line per request goes to the output file:
`due_monotonic latency_seconds http_status`, on the machine-wide monotonic
clock, so the harness can pick the requests that were due during a snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bench import dataset
from bench.pyload import read_response
from kvservice.v1.kv_pb2 import SetRequest

CONTENT_TYPE = "application/proto"


@dataclass
class Schedule:
    start: float
    rate: float
    end: float
    issued: int = 0
    records: list[tuple[float, float, int]] = field(default_factory=list)

    def next_due(self) -> float | None:
        due = self.start + self.issued / self.rate
        if due >= self.end:
            return None
        self.issued += 1
        return due


def set_request(head: bytes, keys: int, rng: random.Random) -> bytes:
    i = rng.randrange(keys)
    body = SetRequest(key=dataset.key(i), value=dataset.value(i, 2)).SerializeToString()
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def _connection(host: str, port: int, head: bytes, keys: int, plan: Schedule) -> None:
    rng = random.Random()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (due := plan.next_due()) is not None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(set_request(head, keys, rng))
            try:
                status = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                plan.records.append((due, time.monotonic() - due, 0))
                return
            plan.records.append((due, time.monotonic() - due, status))
    finally:
        writer.close()


async def run(url: str, rate: float, connections: int, seconds: float, keys: int) -> Schedule:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {CONTENT_TYPE}\r\n"
    ).encode()
    start = time.monotonic() + 0.05  # connections open before the first request is due
    plan = Schedule(start, rate, start + seconds)
    await asyncio.gather(*(_connection(host, port, head, keys, plan) for _ in range(connections)))
    return plan


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rateload", description=__doc__)
    parser.add_argument("url", help="the Set endpoint, .../kvservice.v1.KVStore/Set")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second (500)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections (8)")
    parser.add_argument("--seconds", type=float, default=6.0, help="duration (6)")
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys to overwrite (1e6)")
    parser.add_argument("--out", required=True, help="file for one line per request")
    args = parser.parse_args(argv)
    plan = asyncio.run(run(args.url, args.rate, args.connections, args.seconds, args.keys))
    with open(args.out, "w") as out:
        for due, latency, status in plan.records:
            out.write(f"{due:.6f} {latency:.6f} {status}\n")


if __name__ == "__main__":
    main()
