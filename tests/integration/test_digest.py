"""Continuous consistency checks: a replica whose state was altered behind its back
is detected by the digest comparison, named by `kvservice check`, and repaired by
exactly one full resync."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from kvservice.storage import record
from kvservice.storage.segments import list_segments
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import ReplicationStatusRequest
from kvservice.v1.kv_pb2 import GetRequest, SetRequest
from kvservice.v1.log_pb2 import LogEntry
from tests.integration.conftest import ServerProcess, run_cli, wait_for

pytestmark = pytest.mark.integration
FAST = ("--repl-heartbeat-seconds", "0.2", "--repl-retry-max-seconds", "0.5")


def alter_value(data_dir: Path, key: str, new_value: bytes) -> int:
    """Rewrite the WAL record of `key`'s last Set with another value of the same
    length and valid checksums; return its revision."""
    for segment in reversed(list_segments(data_dir / "wal")):
        buf = bytearray(segment.read_bytes())
        found = None
        for offset, payload in record.scan(bytes(buf)):
            entry = LogEntry.FromString(payload)
            if entry.key == key and entry.operation == LogEntry.OPERATION_SET:
                found = (offset, entry)
        if found is not None:
            offset, entry = found
            assert len(new_value) == len(entry.value)
            entry.value = new_value
            buf[offset : offset + record.HEADER_SIZE + entry.ByteSize()] = record.encode(
                entry.SerializeToString()
            )
            segment.write_bytes(bytes(buf))
            return entry.revision
    raise AssertionError(f"no Set of {key!r} in {data_dir}")


def metric(node: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{node.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def full_resyncs(primary: ServerProcess) -> int:
    with AdminClientSync(primary.url) as admin:
        replicas = admin.replication_status(ReplicationStatusRequest()).replicas
    return sum(r.full_resyncs for r in replicas)


def test_an_altered_replica_is_detected_named_and_repaired(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    primary = make_server(*FAST, data_dir=tmp_path / "p").start()
    replica_dir = tmp_path / "r"
    replica_args = ("--role", "replica", "--primary-url", primary.url, *FAST)
    replica = make_server(*replica_args, data_dir=replica_dir).start()
    with primary.client() as client:
        last = 0
        for i in range(20):
            last = client.set(SetRequest(key=f"k{i}", value=b"good-%02d" % i)).revision
    with replica.client() as client:
        client.get(GetRequest(key="k0", min_revision=last))
    assert run_cli("check", "--primary", primary.url, "--replica", replica.url).returncode == 0

    replica.stop()
    alter_value(replica_dir, "k7", b"evil-07")
    # First without repair: the difference is reported and named, nothing repaired.
    replica = make_server(
        *replica_args, "--no-repair-on-mismatch", data_dir=replica_dir, port=replica.port
    ).start()  # fmt: skip
    wait_for(
        "the digest mismatch counted",
        lambda: metric(replica, "kvservice_replication_digest_mismatches_total") >= 1,
    )
    ready = httpx.get(f"{replica.url}/readyz", timeout=5)
    assert ready.status_code == 503
    assert "digest mismatch" in ready.json()["reason"]
    checked = run_cli("check", "--primary", primary.url, "--replica", replica.url)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "'k7'" in checked.stdout
    assert "'k8'" not in checked.stdout
    assert full_resyncs(primary) == 0

    # With repair (the default): one full resync puts it right.
    replica.stop()
    replica = make_server(*replica_args, data_dir=replica_dir, port=replica.port).start()
    wait_for("one full resync", lambda: full_resyncs(primary) == 1)
    with replica.client() as client:
        wait_for("k7 repaired", lambda: client.get(GetRequest(key="k7")).value == b"good-07")
    time.sleep(1.0)  # more heartbeats with digests: no further mismatch, no second resync
    assert full_resyncs(primary) == 1
    assert run_cli("check", "--primary", primary.url, "--replica", replica.url).returncode == 0
    assert httpx.get(f"{replica.url}/readyz", timeout=5).status_code == 200
