"""Start `kvservice serve` with CPython's garbage collector set one way, without
changing the package: the setting is applied between recovery and serving.

    python -P bench/gcserve.py --gc freeze --stats FILE -- serve --port 8080 --data-dir D

Run it as a file with -P (no script directory on sys.path), not as
`-m bench.gcserve`: it imports nothing else from bench/, so `kvservice` comes
from PYTHONPATH and the harness can point it at another checkout.

It wraps `kvservice.cli.serve` (called once recovery has built the store) and,
before applying the mode, times full collections with every key loaded. A
`gc.callbacks` hook counts collections per generation and
their time; SIGUSR1 writes those counters (and the maximum since the previous
dump) to the stats file as JSON, so the harness can read them around each run.

Modes:
- default: CPython's own thresholds (700, 10, 10).
- freeze: gc.collect() then gc.freeze(): everything alive after recovery moves to
  the permanent generation and is never scanned again.
- threshold: gc.set_threshold(50_000, 50, 100): young collections 70x rarer,
  full ones much rarer.
- freeze-threshold: both.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import kvservice
import kvservice.cli
import kvservice.server

MODES = ("default", "freeze", "threshold", "freeze-threshold")
RAISED_THRESHOLDS = (50_000, 50, 100)
FULL_COLLECTIONS_TIMED = 3


class GcClock:
    """Per generation: collections, total and longest pause, in wall time and in the
    collecting thread's CPU time (which a preemption by other processes does not
    inflate), kept in arrays so the hook allocates no object the collector tracks."""

    def __init__(self) -> None:
        self.counts = array.array("q", [0, 0, 0])
        self.total_ns = array.array("q", [0, 0, 0])
        self.max_ns = array.array("q", [0, 0, 0])  # since the previous dump
        self.cpu_total_ns = array.array("q", [0, 0, 0])
        self.cpu_max_ns = array.array("q", [0, 0, 0])  # since the previous dump
        self.started_ns = self.started_cpu_ns = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started_ns = time.perf_counter_ns()
            self.started_cpu_ns = time.thread_time_ns()
            return
        took = time.perf_counter_ns() - self.started_ns
        took_cpu = time.thread_time_ns() - self.started_cpu_ns
        generation = info["generation"]
        self.counts[generation] += 1
        self.total_ns[generation] += took
        self.max_ns[generation] = max(self.max_ns[generation], took)
        self.cpu_total_ns[generation] += took_cpu
        self.cpu_max_ns[generation] = max(self.cpu_max_ns[generation], took_cpu)


class Stats:
    """What the stats file holds: start-up figures, then the GcClock counters."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.clock = GcClock()
        self.seq = 0
        self.fields: dict[str, Any] = {"mode": mode, "pid": os.getpid()}

    def dump(self, *_: object) -> None:
        self.seq += 1
        clock = self.clock
        self.fields.update(
            seq=self.seq,
            collections=list(clock.counts),
            total_ms=[ns / 1e6 for ns in clock.total_ns],
            max_ms=[ns / 1e6 for ns in clock.max_ns],
            cpu_total_ms=[ns / 1e6 for ns in clock.cpu_total_ns],
            cpu_max_ms=[ns / 1e6 for ns in clock.cpu_max_ns],
            thresholds=list(gc.get_threshold()),
            counts=list(gc.get_count()),
            frozen=gc.get_freeze_count(),
        )
        for generation in range(3):
            clock.max_ns[generation] = clock.cpu_max_ns[generation] = 0
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.fields))
        os.replace(tmp, self.path)


def time_full_collections(times: int) -> list[float]:
    """Milliseconds of `times` consecutive gc.collect() calls (full, generation 2)."""
    took = []
    for _ in range(times):
        started = time.perf_counter()
        gc.collect()
        took.append((time.perf_counter() - started) * 1000)
    return took


def apply_mode(mode: str) -> None:
    if "threshold" in mode:
        gc.set_threshold(*RAISED_THRESHOLDS)
    if "freeze" in mode:
        gc.collect()
        gc.freeze()


def wrap_serve(serve: Callable[..., None], stats: Stats) -> Callable[..., None]:
    """`serve(settings, recovery)`, with the GC measured and set up first."""

    def serve_with_gc(settings: Any, recovery: Any) -> None:
        data = recovery.store.data
        stats.fields.update(
            keys=len(data),
            store_dict_tracked=gc.is_tracked(data),
            tracked_objects=len(gc.get_objects()),
            full_collect_ms=time_full_collections(FULL_COLLECTIONS_TIMED),
        )
        apply_mode(stats.fields["mode"])
        stats.fields["full_collect_after_mode_ms"] = time_full_collections(1)
        gc.callbacks.append(stats.clock)
        stats.dump()
        serve(settings, recovery)

    return serve_with_gc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gcserve.py", description=__doc__)
    parser.add_argument("--gc", choices=MODES, default="default", help="GC mode (default)")
    parser.add_argument("--stats", type=Path, required=True, help="JSON file for GC figures")
    parser.add_argument("kvservice_args", nargs=argparse.REMAINDER, help="-- then kvservice args")
    args = parser.parse_args(argv)
    rest = args.kvservice_args[1:] if args.kvservice_args[:1] == ["--"] else args.kvservice_args

    stats = Stats(args.stats, args.gc)
    stats.fields["kvservice"] = str(Path(kvservice.__file__).resolve().parent)

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        stats.dump()

    signal.signal(signal.SIGUSR1, on_usr1)
    # cli.py calls the `serve` it imported from kvservice.server: replace that name.
    setattr(kvservice.cli, "serve", wrap_serve(kvservice.server.serve, stats))  # noqa: B010
    # serve() tunes the collector itself since the GC findings were adopted: the mode
    # chosen here must be the one that runs.
    if hasattr(kvservice.server, "tune_gc"):
        setattr(kvservice.server, "tune_gc", lambda: None)  # noqa: B010
    return int(kvservice.cli.main(rest))


if __name__ == "__main__":
    sys.exit(main())
