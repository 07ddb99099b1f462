"""A small HTTP/1.1 load generator for machines without wrk (the smoke run on a fresh CI box).

`python -m bench.pyload URL --body-file F --content-type T --connections N --seconds S`
keeps N keep-alive connections busy with one POST each at a time for S seconds
and prints the same result line as the wrk script. It is far slower than wrk
(it is Python, and shares the machine's cores), so its figures only prove that
the harness and the server work, not how fast the server is.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from urllib.parse import urlsplit

from bench.load import RESULT_TAG


class Counters:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: list[float] = []


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length or chunked, as connect-python sends); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                return status
    await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status


async def _connection(host: str, port: int, request: bytes, deadline: float, out: Counters) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        out.errors += 1
        return
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            writer.write(request)
            status = await read_response(reader)
            out.latencies.append(time.monotonic() - started)
            out.requests += 1
            if not 200 <= status < 400:
                out.errors += 1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        out.errors += 1
    finally:
        writer.close()


async def run(url: str, body: bytes, content_type: str, connections: int, seconds: float) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    out = Counters()
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(
        *(_connection(host, port, request, deadline, out) for _ in range(connections))
    )
    elapsed = time.monotonic() - started
    ordered = sorted(out.latencies) or [0.0]
    p50 = ordered[len(ordered) // 2] * 1e6
    p99 = ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] * 1e6
    return f"{RESULT_TAG} {out.requests} {elapsed * 1e6:.0f} {out.errors} {p50:.0f} {p99:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--content-type", required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read()
    print(asyncio.run(run(args.url, body, args.content_type, args.connections, args.seconds)))


if __name__ == "__main__":
    main()
