"""Expiry lateness under a write load: how long after its `expiresAtMs` a key's removal
reaches a watcher (an EXPIRE event), while writers keep the node busy.

    python -m bench.expiry                 # 5,000 keys expiring over 5 s, 8 writer threads
    python -m bench.expiry --keys 500 --writers 2      # smaller

Lateness = the watcher's receipt time minus the key's expiry (both wall clock, one
machine). It covers the expiry cycle's period (`expiry_cycle_ms`), the wheel's
100 ms slot, the cycle's per-cycle bound, the WAL's fsync and the Watch delivery.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.servers import start_kvservice
from kvservice.v1.kv_connect import KVStoreClientSync
from kvservice.v1.kv_pb2 import Event, GetRequest, SetRequest, WatchRequest


def measure(keys: int, writers: int, spread_ms: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = start_kvservice(work, "kv-expiry", work / "data")
        try:
            return _run(server.url(), keys, writers, spread_ms)
        finally:
            server.stop()


def _run(url: str, keys: int, writers: int, spread_ms: int) -> dict[str, float]:
    lateness: list[float] = []
    expired = threading.Event()
    stop = threading.Event()
    live = threading.Event()

    def watcher() -> None:
        with KVStoreClientSync(url, timeout_ms=120_000) as kv:
            for response in kv.watch(WatchRequest(prefix="presence:")):
                live.set()
                now = time.time() * 1000
                for event in response.events:
                    if event.type == Event.EVENT_TYPE_EXPIRE:
                        lateness.append(now - expiries[event.key])
                if len(lateness) >= keys:
                    expired.set()
                    return

    def writer(n: int) -> None:
        with KVStoreClientSync(url) as kv:
            while not stop.is_set():
                kv.set(SetRequest(key=f"load:{n}", value=b"x" * 100))

    expiries: dict[str, float] = {}
    threading.Thread(target=watcher, daemon=True).start()
    live.wait(10)
    # The first key expires once all are written (about 2 ms a key here, with room).
    start = time.time() * 1000 + 1000 + keys * 3
    with KVStoreClientSync(url) as kv:
        for i in range(keys):
            key = f"presence:{i}"
            ttl = int(start + i * spread_ms / keys - time.time() * 1000)
            kv.set(SetRequest(key=key, value=b"online", ttl_ms=max(ttl, 1)))
            expiries[key] = float(kv.get(GetRequest(key=key)).expires_at_ms)
    loaders = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(writers)]
    for thread in loaders:
        thread.start()
    expired.wait(spread_ms / 1000 + 30)
    stop.set()
    for thread in loaders:
        thread.join(10)
    if len(lateness) < keys:
        raise SystemExit(f"only {len(lateness)} of {keys} expiries seen")
    ordered = sorted(lateness)
    return {
        "keys": keys,
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[int(len(ordered) * 0.99) - 1],
        "max_ms": ordered[-1],
        "min_ms": ordered[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=5000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--spread-ms", type=int, default=5000)
    args = parser.parse_args()
    figures = measure(args.keys, args.writers, args.spread_ms)
    print(
        f"{figures['keys']:.0f} keys expiring over {args.spread_ms} ms, {args.writers} writers:"
        f" lateness p50 {figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms,"
        f" max {figures['max_ms']:.0f} ms (min {figures['min_ms']:.0f} ms)"
    )


if __name__ == "__main__":
    main()
