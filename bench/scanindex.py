"""The Scan index candidates measured in one process (bench/results/scan.md).

    python -m bench.scanindex [--keys 1000000] [--ops 100000] [--rounds 5] [--base-ref main]
                              [--parts apply,candidates,page,memory]

For a store of `--keys` keys of the bench's shape it reports, per candidate:
- the cost of `Store.apply` for a Set that creates a key and for one that
  overwrites, against the engine of `--base-ref` (no index), loaded from git,
  in rotating rounds, with the index not built yet (no Scan so far) and built;
- the candidates' own insert cost and what a Scan then pays;
- the time to build the index from the keys (recovery, snapshot install), in
  sorted and in shuffled insertion order;
- memory per key of the index (RSS growth in a fresh interpreter);
- the time to read one 100-key page (`kvservice.scan.read_page`).
Times are CPU time of this process (time.process_time), so neighbours that
preempt it do not inflate them (their cache pressure still does).
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

from sortedcontainers import SortedList

from bench import dataset
from bench.procs import rss_bytes
from bench.servers import REPO
from kvservice import engine
from kvservice.keyindex import KeyIndex
from kvservice.scan import ScanLimits, read_page
from kvservice.v1.kv_pb2 import ScanRequest
from kvservice.v1.log_pb2 import LogEntry


def base_engine(ref: str) -> Any:
    """kvservice/engine.py as of git `ref` (the store without an index), as a module."""
    source = subprocess.run(
        ["git", "show", f"{ref}:kvservice/engine.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    module = types.ModuleType(f"engine_{ref}")
    exec(compile(source, f"{ref}:kvservice/engine.py", "exec"), module.__dict__)
    return module


def snapshot_data(keys: int, order: str) -> dict[str, bytes]:
    """The bench's data set as a snapshot dict, in sorted or shuffled insertion order."""
    ids = list(range(keys))
    if order == "shuffled":
        random.Random(1).shuffle(ids)
    return {dataset.key(i): engine.pack(i + 1, dataset.value(i)) for i in ids}


def new_keys(count: int, seed: int) -> list[str]:
    """Keys that are not in the data set, landing all over the sorted order."""
    rng = random.Random(seed)
    return [f"user:{rng.randrange(10**6):06d}:typing:{n}" for n in range(count)]


def apply_micros(store: Any, keys: Iterable[str]) -> float:
    """Mean µs of Store.apply for one Set of each key."""
    entries = []
    revision = store.revision
    for key in keys:
        revision += 1
        entries.append(LogEntry(revision=revision, operation=engine.SET, key=key, value=b"v" * 100))
    gc.disable()
    started = time.process_time()  # CPU time: preemption by the neighbours does not count
    for entry in entries:
        store.apply(entry)
    elapsed = time.process_time() - started
    gc.enable()
    return elapsed / len(entries) * 1e6


def measure_apply(args: argparse.Namespace) -> dict[str, list[float]]:
    """Alternating rounds: base engine vs this one, creating keys and overwriting them."""
    base = base_engine(args.base_ref)
    data = snapshot_data(args.keys, "shuffled")
    found: dict[str, list[float]] = {}
    for n in range(args.rounds):
        created = new_keys(args.ops, seed=n)
        overwritten = random.Random(n).sample(list(data), args.ops)
        sides = [("base", base.Store, False), ("unbuilt", engine.Store, False)]
        sides.append(("built", engine.Store, True))
        for side, factory, build in sides[n % 3 :] + sides[: n % 3]:
            store = factory()
            store.load(dict(data), args.keys, 0)
            if build:
                first_key(store.key_index)
            found.setdefault(f"{side} create", []).append(apply_micros(store, created))
            found.setdefault(f"{side} overwrite", []).append(apply_micros(store, overwritten))
            del store
            gc.collect()
    return found


def first_key(index: KeyIndex) -> str | None:
    """Ask for one key: builds the index if it is not built yet."""
    return next(index.keys_from(""), None)


def timed(action: Callable[[], object], repeat: int = 1) -> float:
    started = time.process_time()
    for _ in range(repeat):
        action()
    return (time.process_time() - started) / repeat


def measure_candidates(args: argparse.Namespace) -> dict[str, float]:
    """What each candidate costs on a write, and what a Scan then pays."""
    keys = list(snapshot_data(args.keys, "shuffled"))
    created = new_keys(args.ops, seed=99)
    out: dict[str, float] = {}
    # SortedList, maintained on every created/removed key (the choice).
    index = SortedList(keys)
    out["SortedList add µs"] = timed(lambda: [index.add(k) for k in created]) / args.ops * 1e6
    out["SortedList discard µs"] = (
        timed(lambda: [index.discard(k) for k in created]) / args.ops * 1e6
    )
    # A sorted list plus an unsorted buffer of new keys, merged when a Scan comes:
    # cheap writes, but the first Scan after n new keys sorts them and merges.
    pending: list[str] = []
    out["buffer append µs"] = timed(lambda: [pending.append(k) for k in created]) / args.ops * 1e6
    out["buffer merge at Scan, ms per 1k new keys"] = (
        timed(lambda: index.update(created[:1000]), repeat=1) * 1e3
    )
    # A plain sorted Python list: every insert moves the tail (8 bytes a key).
    plain = sorted(keys)
    sample = created[:2000]
    out["plain list insort µs"] = timed(lambda: [bisect.insort(plain, k) for k in sample]) / len(
        sample
    ) * 1e6  # fmt: skip
    # Building from scratch: at load (eager) or on the first Scan (lazy).
    for order in ("sorted", "shuffled"):
        source = sorted(keys) if order == "sorted" else keys
        out[f"build from {order} keys s"] = statistics.median(
            timed(lambda source=source: first_key(KeyIndex(source))) for _ in range(3)
        )
    return out


def measure_page(args: argparse.Namespace) -> dict[str, float]:
    """µs to read one 100-key page of a store of `--keys` keys, values and keys only."""
    store = engine.Store()
    store.load(snapshot_data(args.keys, "shuffled"), args.keys, 0)
    first_key(store.key_index)
    limits = ScanLimits(max_bytes=4 << 20, max_key_bytes=1024)
    rng = random.Random(7)
    starts = [dataset.key(rng.randrange(args.keys)) for _ in range(2000)]
    out = {}
    for keys_only in (False, True):
        requests = [
            ScanRequest(prefix="user:", start_after=s, limit=100, keys_only=keys_only)
            for s in starts
        ]
        seconds = timed(lambda requests=requests: [read_page(store, r, limits) for r in requests])
        out[f"page of 100, keys_only={keys_only}, µs"] = seconds / len(starts) * 1e6
    return out


def memory_per_key(keys: int, order: str) -> float:
    """RSS growth per key of building the index, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.scanindex", "--memory-child", str(keys), order],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return float(json.loads(done.stdout)["per_key"])


def _memory_child(keys: int, order: str) -> None:
    data = snapshot_data(keys, order)
    gc.collect()
    before = rss_bytes(os.getpid())
    index = KeyIndex(data)
    first_key(index)
    gc.collect()
    grown = rss_bytes(os.getpid()) - before
    print(json.dumps({"keys": len(index), "per_key": grown / keys}))


PARTS = ("apply", "candidates", "page", "memory")


def report(args: argparse.Namespace) -> dict[str, object]:
    parts = set(args.parts.split(","))
    found: dict[str, object] = {"load average at start": os.getloadavg()}
    if "apply" in parts:
        applied = measure_apply(args)
        medians = {name: statistics.median(values) for name, values in applied.items()}
        found["apply µs CPU (median of rounds)"] = medians
        found["apply µs CPU (every round)"] = applied
        for side in ("built", "unbuilt"):
            for kind in ("create", "overwrite"):
                found[f"{side} / base, {kind}"] = (
                    medians[f"{side} {kind}"] / medians[f"base {kind}"]
                )
    if "candidates" in parts:
        found["candidates"] = measure_candidates(args)
    if "page" in parts:
        found["page"] = measure_page(args)
    if "memory" in parts:
        found["index bytes per key"] = {
            order: memory_per_key(args.keys, order) for order in ("sorted", "shuffled")
        }
    found["load average at end"] = os.getloadavg()
    return found


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-child":
        _memory_child(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.scanindex", description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--ops", type=int, default=100_000, help="Sets per measured round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--base-ref", default="main", help="git ref of the engine without index")
    parser.add_argument("--parts", default=",".join(PARTS), help="of " + ",".join(PARTS))
    args = parser.parse_args()
    print(json.dumps(report(args), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
