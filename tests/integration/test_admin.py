"""Admin/Snapshot: an operator can ask a running node for a snapshot now."""

from __future__ import annotations

from kvservice.storage.recovery import recover
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import SnapshotRequest
from kvservice.v1.kv_pb2 import SetRequest
from tests.integration.conftest import ServerProcess, run_cli


def test_snapshot_on_demand_over_connect(server: ServerProcess) -> None:
    """The reply names a durable snapshot holding every write so far."""
    with server.client() as kv:
        for i in range(20):
            last = kv.set(SetRequest(key=f"k{i}", value=b"v")).revision
    with AdminClientSync(server.url, proto_json=True) as admin:
        reply = admin.snapshot(SnapshotRequest())
    assert (reply.revision, reply.key_count) == (last, 20)
    path = server.data_dir / "snap" / f"{last:016x}.snap"
    assert reply.path == str(path)
    assert path.exists()
    assert server.stop() == 0
    result = recover(server.data_dir)
    assert result.snapshot_revision == last
    assert result.records_replayed == 0


def test_snapshot_command(server: ServerProcess) -> None:
    """`kvservice snapshot --url` prints the revision and path and exits 0."""
    with server.client() as kv:
        revision = kv.set(SetRequest(key="k", value=b"v")).revision
    done = run_cli("snapshot", "--url", server.url)
    assert done.returncode == 0, done.stderr
    assert f"snapshot at revision {revision}:" in done.stdout


def test_snapshot_command_names_an_unreachable_node() -> None:
    done = run_cli("snapshot", "--url", "http://127.0.0.1:9")
    assert done.returncode == 1
    assert "snapshot failed: unavailable" in done.stderr
