"""Memory per key: kvservice RSS growth against redis `used_memory` for the same keys.

kvservice is loaded offline: the data dir is written as one snapshot with
kvservice's own snapshot writer (dataset.build_snapshot_dir), so loading a
million keys takes seconds instead of a million RPCs; the server then loads it
through its normal recovery path. Growth is RSS of that server minus RSS of the
same server started on an empty data dir, both after /readyz and one Get.

Also measured, to explain the figure: the same dict built directly in a fresh
interpreter (the floor any CPython store of this data pays) and the server's
peak RSS (VmHWM) during recovery.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench import dataset
from bench.peers import redis_info, start_redis
from bench.procs import BenchError, http_post, peak_rss_bytes, rss_bytes, run_measured
from bench.servers import REPO, Server, start_kvservice
from bench.throughput import CONNECT_JSON, KV_PATH
from kvservice.engine import HEADER


@dataclass(frozen=True)
class KvMemory:
    keys: int
    empty_rss: int
    loaded_rss: int
    loaded_peak_rss: int
    dict_floor_per_key: float

    @property
    def per_key(self) -> float:
        return (self.loaded_rss - self.empty_rss) / self.keys


@dataclass(frozen=True)
class RedisMemory:
    keys: int
    used_before: int
    used_after: int
    rss_before: int
    rss_after: int
    load_seconds: float

    @property
    def per_key(self) -> float:
        return (self.used_after - self.used_before) / self.keys

    @property
    def rss_per_key(self) -> float:
        return (self.rss_after - self.rss_before) / self.keys


def settled_rss(server: Server) -> int:
    """RSS after one served Get, so both servers have run their request path once."""
    http_post(server.url(KV_PATH + "Get"), dataset.kv_body("Get", "json"), CONNECT_JSON)
    return rss_bytes(server.pid)


def measure_kvservice(work: Path, data_dir: Path, keys: int) -> KvMemory:
    """RSS of an empty node and of one that recovered `data_dir` (`keys` keys)."""
    empty = start_kvservice(work, "kvservice-empty", work / "kv-empty")
    try:
        empty_rss = settled_rss(empty)
    finally:
        empty.stop()
    loaded = start_kvservice(work, "kvservice-loaded", data_dir)
    try:
        loaded_rss = settled_rss(loaded)
        peak = peak_rss_bytes(loaded.pid)
    finally:
        loaded.stop()
    return KvMemory(keys, empty_rss, loaded_rss, peak, dict_floor_per_key(keys))


def dict_floor_per_key(keys: int) -> float:
    """Bytes per key of the engine's dict alone, built in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", "floor", str(keys)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=REPO,
    )
    return float(json.loads(done.stdout)["per_key"])


def measure_redis(
    work: Path, keys: int, commands: Iterable[bytes] | None = None, name: str = "redis-memory"
) -> tuple[RedisMemory, Server]:
    """Load `keys` keys with `redis-cli --pipe` (`commands`, default the bench's SETs);
    return the figures and the running server (the recovery case saves its RDB next)."""
    redis = start_redis(work, name)
    try:
        before = redis_info(redis.port, "memory")
        resp = dataset.write_resp_file(work / f"{name}.resp", keys, commands)
        argv = ["redis-cli", "-h", "127.0.0.1", "-p", str(redis.port), "--pipe"]
        done = run_measured(argv, timeout=300, stdin_path=resp)
        resp.unlink()
        if done.returncode != 0 or "errors: 0" not in done.stdout:
            raise BenchError(f"redis-cli --pipe failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        after = redis_info(redis.port, "memory")
    except BaseException:
        redis.stop()
        raise
    figures = RedisMemory(
        keys,
        int(before["used_memory"]),
        int(after["used_memory"]),
        int(before["used_memory_rss"]),
        int(after["used_memory_rss"]),
        done.wall_seconds,
    )
    return figures, redis


def _floor_main(keys: int) -> None:
    before = rss_bytes(os.getpid())
    data = {dataset.key(i): HEADER.pack(i + 1) + dataset.value(i) for i in range(keys)}
    grown = rss_bytes(os.getpid()) - before
    print(json.dumps({"keys": len(data), "per_key": grown / keys}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "floor":
        _floor_main(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m bench.memory floor KEYS")
