"""Backup and restore against real nodes, and the runbook's disaster-recovery drill
executed command by command."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import ReplicationStatusRequest
from kvservice.v1.kv_pb2 import GetRequest, SetRequest
from tests.integration.conftest import REPO, ServerProcess, free_port, run_cli

pytestmark = pytest.mark.integration
RUNBOOK = REPO / "docs" / "runbook.md"
FAST = ("--repl-heartbeat-seconds", "0.2", "--repl-retry-max-seconds", "0.5")


def drill_commands() -> list[str]:
    section = RUNBOOK.read_text(encoding="utf-8").split("## Disaster recovery drill", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_the_disaster_recovery_drill_in_the_runbook(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Primary and replica hold data; a backup is taken from the replica; both are
    lost; the runbook's commands bring the data back on new nodes."""
    primary = make_server(*FAST, data_dir=tmp_path / "old-p").start()
    old_replica = make_server(
        "--role", "replica", "--primary-url", primary.url, *FAST, data_dir=tmp_path / "old-r"
    ).start()  # fmt: skip
    with primary.client() as client:
        revisions = {f"k{i}": client.set(SetRequest(key=f"k{i}", value=b"v%d" % i)).revision
                     for i in range(50)}  # fmt: skip
        last = max(revisions.values())
    with old_replica.client() as client:
        client.get(GetRequest(key="k0", min_revision=last))  # the replica has it all

    new_primary_port, new_replica_port = free_port(), free_port()
    values = {
        "REPLICA_URL": old_replica.url,
        "BACKUP": str(tmp_path / "backup.snap"),
        "NEW_PRIMARY_DATA": str(tmp_path / "new-p"),
        "NEW_PRIMARY_PORT": str(new_primary_port),
        "NEW_PRIMARY_URL": f"http://127.0.0.1:{new_primary_port}",
        "NEW_REPLICA_PORT": str(new_replica_port),
        "NEW_REPLICA_DATA": str(tmp_path / "new-r"),
    }
    started: list[ServerProcess] = []
    commands = drill_commands()
    assert [c.split()[1] for c in commands] == ["backup", "restore", "serve", "status", "serve"]
    for i, command in enumerate(commands):
        words = [values.get(w[1:], w) if w.startswith("$") else w for w in shlex.split(command)]
        assert words[0] == "kvservice"
        if words[1] == "serve":
            port = int(words[words.index("--port") + 1])
            data_dir = Path(words[words.index("--data-dir") + 1])
            placed = ("--port", "--data-dir")  # given to make_server separately
            rest = [w for j, w in enumerate(words[2:], 2)
                    if w not in placed and words[j - 1] not in placed]  # fmt: skip
            started.append(make_server(*rest, *FAST, data_dir=data_dir, port=port).start())
        else:
            done = run_cli(*words[1:])
            assert done.returncode == 0, (command, done.stdout, done.stderr)
        if i == 0:  # the backup is taken: now every node is lost
            primary.kill()
            old_replica.kill()
    new_primary, new_replica = started
    for node in (new_primary, new_replica):
        with node.client() as client:
            for key, revision in revisions.items():
                got = client.get(GetRequest(key=key, min_revision=last))
                assert (got.revision, got.value) == (revision, b"v%d" % int(key[1:])), node.url
    with new_primary.client() as client:
        client.set(SetRequest(key="after", value=b"!"))
    with AdminClientSync(new_primary.url) as admin:
        status = admin.replication_status(ReplicationStatusRequest())
    assert status.role == "primary"
    assert status.prev_end_revision == last  # the new history continues the backup's


def test_restore_refuses_a_non_empty_data_dir_and_a_damaged_file(
    make_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    node = make_server(data_dir=tmp_path / "p").start()
    with node.client() as client:
        client.set(SetRequest(key="k", value=b"v"))
    backup = tmp_path / "b.snap"
    done = run_cli("backup", "--url", node.url, "--out", str(backup))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revision"] == 1
    target = tmp_path / "restored"
    assert run_cli("restore", "--in", str(backup), "--data-dir", str(target)).returncode == 0
    again = run_cli("restore", "--in", str(backup), "--data-dir", str(target))
    assert again.returncode == 3
    assert "not empty" in again.stderr
    forced = run_cli("restore", "--in", str(backup), "--data-dir", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(list(target.glob("pre-restore-*"))) == 1  # set aside, not deleted
    raw = bytearray(backup.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.snap"
    damaged.write_bytes(bytes(raw))
    bad = run_cli("restore", "--in", str(damaged), "--data-dir", str(tmp_path / "x"))
    assert bad.returncode == 3
    assert "corrupt" in bad.stderr
    assert not (tmp_path / "x" / "snap").exists()
