"""Restart time with the memory case's keys: kvservice (snapshot + WAL tail)
against redis-server loading an RDB of the same data.

The WAL tail is written offline with kvservice's own record codec and LogEntry
(dataset.write_wal_tail): Sets that overwrite existing keys, so the key count,
and so the data, stays that of the redis RDB. The time is from process start to
the first /readyz 200 (kvservice) or PONG (redis, which answers -LOADING while
it loads), polled every few milliseconds; kvservice's own `recovered ... seconds`
log figure is reported beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from bench.peers import redis_cli, redis_info, start_redis
from bench.procs import BenchError
from bench.servers import Server, start_kvservice


@dataclass(frozen=True)
class Restart:
    ready_seconds: float  # process start -> serving
    recovered_seconds: float | None  # the server's own figure (kvservice log line)


@dataclass(frozen=True)
class RecoveryResult:
    keys: int
    wal_records: int
    kv_restarts: list[Restart]
    kv_disk_bytes: int
    redis_restarts: list[Restart]
    rdb_bytes: int


def recovered_seconds(log_path: Path) -> float | None:
    """The `seconds` field of kvservice's JSON `recovered` log line, if logged."""
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("message") == "recovered":
            return float(entry["seconds"])
    return None


def restart_kvservice(work: Path, data_dir: Path, rounds: int) -> list[Restart]:
    restarts = []
    for n in range(rounds):
        server = start_kvservice(work, f"kvservice-restart-{n}", data_dir)
        ready = time.monotonic() - server.child.started_at
        server.stop()
        restarts.append(Restart(ready, recovered_seconds(server.child.log_path)))
    return restarts


def save_rdb(redis: Server) -> Path:
    """SAVE the running redis' data to its dump.rdb and stop it."""
    redis_cli(redis.port, "SAVE", timeout=300)
    data_dir = Path(redis_cli(redis.port, "CONFIG", "GET", "dir").splitlines()[-1])
    redis.stop()
    return data_dir / "dump.rdb"


def restart_redis(work: Path, rdb: Path, keys: int, rounds: int) -> list[Restart]:
    restarts = []
    for n in range(rounds):
        server = start_redis(work, f"redis-restart-{n}", data_dir=rdb.parent)
        ready = time.monotonic() - server.child.started_at
        loaded = int(redis_info(server.port, "keyspace").get("db0", "keys=0").split(",")[0][5:])
        server.stop()
        if loaded != keys:
            raise BenchError(f"redis loaded {loaded} keys from {rdb}, expected {keys}")
        restarts.append(Restart(ready, None))
    return restarts


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
