"""How long the first Scan's index build holds the event loop: the one-piece sort
(`KeyIndex._build`, what a Scan did before) against the stepped build the
service now awaits (`KeyIndex.ready`), alternating, in this process.

    python -m bench.scanstall [--keys 2000000] [--rounds 2]

Keys are random, chat-session-like strings in a dict, as the store holds them;
the server's GC settings apply (kvservice.server.tune_gc). A ticker task
measures the longest gap between its turns while each build runs: what every
other request on the node would wait at worst.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from kvservice.keyindex import KeyIndex
from kvservice.server import tune_gc


async def _measure(build: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(seconds the build took, longest event-loop stall in seconds)."""
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    began = time.perf_counter()
    await build()
    took = time.perf_counter() - began
    done = True
    await ticking
    return took, max(gaps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    rng = random.Random(7)
    data = dict.fromkeys(f"user:{rng.getrandbits(40):012x}:session" for _ in range(args.keys))
    tune_gc()

    async def one_piece() -> None:
        KeyIndex(data)._build()

    async def stepped() -> None:
        await KeyIndex(data).ready()

    print(f"{len(data):,} keys, {args.rounds} alternating rounds")
    print("| build | seconds | longest event-loop stall ms |")
    print("|---|---|---|")
    for _ in range(args.rounds):
        for name, build in (("one sort (before)", one_piece), ("stepped (now)", stepped)):
            took, stall = asyncio.run(_measure(build))
            print(f"| {name} | {took:.2f} | {stall * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
