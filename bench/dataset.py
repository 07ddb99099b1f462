"""The data every case uses: keys `user:NNNNNN:session` with 100-byte values,
as kvservice data dirs (snapshot + WAL tail, written with kvservice's own
storage code) and as a Redis protocol stream for `redis-cli --pipe`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

from kvservice.engine import SET, pack
from kvservice.storage import record
from kvservice.storage.segments import segment_name
from kvservice.storage.snapshot import write_snapshot
from kvservice.v1.kv_pb2 import GetRequest, SetRequest
from kvservice.v1.log_pb2 import LogEntry

VALUE_BYTES: Final = 100
HOT_KEY: Final = "user:000001:session"
HOT_VALUE: Final = b"v" * VALUE_BYTES


def key(i: int) -> str:
    return f"user:{i:06d}:session"


def value(i: int, generation: int = 0) -> bytes:
    """A distinct 100-byte value per key (and per overwrite), so nothing is shared."""
    return f"{generation}:{i}:".encode().ljust(VALUE_BYTES, b"x")


# -- request bodies -------------------------------------------------------------


def kv_body(method: str, codec: str) -> bytes:
    """The fixed body of a kvservice Get or Set on HOT_KEY, as Connect JSON or protobuf."""
    if codec == "json":
        fields: dict[str, str] = {"key": HOT_KEY}
        if method == "Set":
            fields["value"] = base64.b64encode(HOT_VALUE).decode()
        return json.dumps(fields, separators=(",", ":")).encode()
    if method == "Set":
        return SetRequest(key=HOT_KEY, value=HOT_VALUE).SerializeToString()
    return GetRequest(key=HOT_KEY).SerializeToString()


def etcd_body(method: str) -> bytes:
    """Body of an etcd v3 JSON gateway call: keys and values are base64 in JSON."""
    fields = {"key": base64.b64encode(HOT_KEY.encode()).decode()}
    if method == "put":
        fields["value"] = base64.b64encode(HOT_VALUE).decode()
    return json.dumps(fields).encode()


# -- kvservice data dirs ------------------------------------------------------------


def build_snapshot_dir(
    data_dir: Path, keys: int, expiry: Callable[[int], int] | None = None
) -> int:
    """Write a kvservice data dir holding `keys` keys as one snapshot; return its revision.

    Key i was last written at revision i + 1, as if loaded by `keys` Sets in order;
    with `expiry`, key i carries the expiry `expiry(i)` (Unix ms), as if Set with a TTL.
    """
    if expiry is None:
        data = {key(i): pack(i + 1, value(i)) for i in range(keys)}
    else:
        data = {key(i): pack(i + 1, value(i), expiry(i)) for i in range(keys)}
    return write_data_dir(data_dir, data)


def write_data_dir(data_dir: Path, data: dict[str, bytes]) -> int:
    """Write a data dir whose one snapshot holds `data` (key -> stored bytes, whose
    revisions must not exceed len(data)); return the snapshot's revision."""
    snap_dir = data_dir / "snap"
    snap_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "wal").mkdir(exist_ok=True)
    write_snapshot(snap_dir, data, len(data))
    return len(data)


def write_wal_tail(data_dir: Path, after_revision: int, records: int, keys: int) -> Path:
    """Write one WAL segment of `records` Sets that overwrite existing keys, starting
    right after the snapshot; replaces the (empty) segment a start-up may have made."""
    path = data_dir / "wal" / segment_name(after_revision + 1)
    with open(path, "wb") as out:
        for n in range(records):
            i = n % keys
            entry = LogEntry(
                revision=after_revision + 1 + n, operation=SET, key=key(i), value=value(i, 1)
            )
            out.write(record.encode(entry.SerializeToString()))
    return path


# -- redis ----------------------------------------------------------------------------------


def resp_set(k: bytes, v: bytes, px_ms: int = 0) -> bytes:
    """One SET in the Redis protocol; with `px_ms`, `SET k v PX px_ms` (a TTL)."""
    if not px_ms:
        return b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v)
    ttl = b"%d" % px_ms
    return b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (
        len(k), k, len(v), v, len(ttl), ttl,
    )  # fmt: skip


def resp_sets(keys: int, ttl_ms: Callable[[int], int] | None = None) -> Iterator[bytes]:
    """SET commands in the Redis protocol, for `redis-cli --pipe`; with `ttl_ms`,
    key i is set with the TTL `ttl_ms(i)` (PX)."""
    for i in range(keys):
        yield resp_set(key(i).encode(), value(i), ttl_ms(i) if ttl_ms else 0)


def write_resp_file(path: Path, keys: int, commands: Iterable[bytes] | None = None) -> Path:
    """The protocol stream of `commands` (default: resp_sets(keys)) in a file."""
    with open(path, "wb") as out:
        for command in resp_sets(keys) if commands is None else commands:
            out.write(command)
    return path
