"""Why one watch dispatcher per node: CPU of fanning the commit feed out to 1,000 streams.

    python -m bench.watch_fanout_micro             # about a minute
    python -m bench.watch_fanout_micro --smoke

In one process, no network: a commit feed gets ENTRIES Set entries in group
commits of BATCH, yielding to the event loop after each; 1,000 consumers turn
what they receive into WatchResponse messages and serialize them (what a
stream does before its bytes reach the socket). Two designs:
- per-stream: each consumer has its own feed subscription and filters and
  translates every entry itself;
- dispatcher: kvservice.watch.WatchHub (one subscription, an index of targets,
  shared chunks), consumed through WatchHub.stream as the RPC does.
Two workloads: every stream on the one prefix every write matches, and every
stream on its own key (each write matches one stream). Printed: CPU seconds
of the process and microseconds per delivered event.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from kvservice.config import Settings
from kvservice.feed import CommitFeed
from kvservice.storage import record
from kvservice.v1.kv_pb2 import WatchRequest, WatchResponse
from kvservice.v1.log_pb2 import LogEntry
from kvservice.watch import WatchHub, events_of

STREAMS = 1000


def entries(count: int) -> list[tuple[LogEntry, bytes]]:
    made = []
    for revision in range(1, count + 1):
        entry = LogEntry(
            revision=revision, operation=LogEntry.OPERATION_SET,
            key=f"fan:{revision % STREAMS}", value=b"x" * 100,
        )  # fmt: skip
        made.append((entry, record.encode(entry.SerializeToString())))
    return made


def requests(shape: str) -> list[WatchRequest]:
    if shape == "one-prefix":
        return [WatchRequest(prefix="fan:") for _ in range(STREAMS)]
    return [WatchRequest(key=f"fan:{i}") for i in range(STREAMS)]


async def produce(feed: CommitFeed, made: list[tuple[LogEntry, bytes]], batch: int) -> None:
    for start in range(0, len(made), batch):
        for entry, data in made[start : start + batch]:
            feed.stage(entry, data)
        feed.advance(made[min(len(made), start + batch) - 1][0].revision)
        await asyncio.sleep(0)


async def per_stream(feed: CommitFeed, request: WatchRequest, total: int, got: list[int]) -> None:
    subscription = feed.subscribe()
    prefix, key = request.prefix, request.key
    seen = 0
    while seen < total:
        items = subscription.get_nowait(10_000) or await subscription.get(10_000)
        seen = items[-1].revision
        events = [
            event
            for item in items
            for event in events_of(item.entry)
            if (event.key == key if key else event.key.startswith(prefix))
        ]
        if events:
            WatchResponse(events=events).SerializeToString()
            got[0] += len(events)


async def dispatched(hub: WatchHub, request: WatchRequest, total: int, got: list[int]) -> None:
    expected = total if request.prefix else total // STREAMS
    mine = 0
    async for response in hub.stream(request):
        response.SerializeToString()
        got[0] += len(response.events)
        mine += len(response.events)
        if mine >= expected:
            return


async def run(design: str, shape: str, made: list[tuple[LogEntry, bytes]], batch: int) -> Any:
    feed = CommitFeed(0)
    total = len(made)
    got = [0]
    if design == "per-stream":
        consumers = [per_stream(feed, r, total, got) for r in requests(shape)]
    else:
        node = SimpleNamespace(feed=feed)
        settings = Settings.model_validate({"watch_buffer_events": 10_000_000})
        hub = WatchHub(node, settings)  # type: ignore[arg-type]  # a stand-in node: feed only
        consumers = [dispatched(hub, r, total, got) for r in requests(shape)]
    tasks = [asyncio.create_task(c) for c in consumers]
    await asyncio.sleep(0.05)  # every stream subscribed / joined
    started = time.process_time()
    await produce(feed, made, batch)
    await asyncio.wait_for(asyncio.gather(*tasks), 600)
    cpu = time.process_time() - started
    return cpu, got[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.watch_fanout_micro")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=10, help="entries per group commit")
    args = parser.parse_args(argv)
    count = 2 * STREAMS if args.smoke else args.entries // STREAMS * STREAMS
    made = entries(count)
    print(f"{STREAMS} streams, {count} Set entries, group commits of {args.batch}")
    print("| workload | design | CPU s | events delivered | µs per delivered event |")
    print("|---|---|---|---|---|")
    for shape in ("one-prefix", "own-key"):
        for design in ("per-stream", "dispatcher"):
            cpu, delivered = asyncio.run(run(design, shape, made, args.batch))
            per = cpu / delivered * 1e6 if delivered else float("nan")
            print(f"| {shape} | {design} | {cpu:.2f} | {delivered:,} | {per:.2f} |", flush=True)


if __name__ == "__main__":
    main()
