"""The replication channel needs a `replication` credential: a replica refuses a
pusher without one and a primary refuses an announcement without one; with
`repl_token_file` the nodes link and replicate."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import ReplicationStatusRequest
from kvservice.v1.kv_connect import KVStoreClientSync
from kvservice.v1.kv_pb2 import GetRequest, SetRequest
from tests.integration.conftest import wait_for
from tests.securitykit import write_tokens

pytestmark = pytest.mark.integration
FAST = ("--repl-heartbeat-seconds", "0.2", "--repl-retry-max-seconds", "0.5")
NODE, ADMIN, CLIENT = "node-secret-1", "admin-secret-1", "client-secret-1"


def status(url: str):  # type: ignore[no-untyped-def]
    with AdminClientSync(url, timeout_ms=5000) as admin:
        return admin.replication_status(
            ReplicationStatusRequest(), headers={"authorization": f"Bearer {ADMIN}"}
        )


def test_replication_needs_a_replication_credential(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tokens = write_tokens(tmp_path / "tokens.yaml", {
        NODE: {"name": "nodes", "roles": ["replication", "admin"]},
        ADMIN: {"name": "ops", "roles": ["admin"]},
        CLIENT: {"name": "chat-backend", "roles": ["read", "write"]},
    })  # fmt: skip
    node_token = tmp_path / "node.token"
    node_token.write_text(NODE + "\n")
    secured = ("--auth", "token", "--tokens-file", str(tokens), *FAST)
    primary = make_server(*secured, data_dir=tmp_path / "p").start()
    # A replica that presents no credential: its announcement is refused...
    replica = make_server(
        *secured, "--role", "replica", "--primary-url", primary.url, data_dir=tmp_path / "r"
    ).start()  # fmt: skip
    wait_for(
        "the announcement refused", lambda: "unauthenticated" in status(replica.url).link.last_error
    )
    assert not status(primary.url).replicas
    # ...and a primary that presents none (told of the replica by its config) has its
    # pushes refused.
    replica.stop()
    primary.stop()
    primary = make_server(
        *secured, "--replicas", f"http://127.0.0.1:{replica.port}", data_dir=tmp_path / "p",
        port=primary.port,
    ).start()  # fmt: skip
    replica = make_server(*secured, "--role", "replica", data_dir=tmp_path / "r",
                          port=replica.port).start()  # fmt: skip
    wait_for(
        "the pushes refused",
        lambda: "unauthenticated" in status(primary.url).replicas[0].last_error,
    )
    assert status(replica.url).revision == 0

    # With the node token on both sides they link, and writes replicate.
    replica.stop()
    primary.stop()
    with_token = (*secured, "--repl-token-file", str(node_token))
    primary = make_server(*with_token, data_dir=tmp_path / "p", port=primary.port).start()
    replica = make_server(
        *with_token, "--role", "replica", "--primary-url", primary.url,
        data_dir=tmp_path / "r", port=replica.port,
    ).start()  # fmt: skip
    client_headers = {"authorization": f"Bearer {CLIENT}"}
    with KVStoreClientSync(primary.url, timeout_ms=5000) as client:
        revision = client.set(SetRequest(key="k", value=b"v"), headers=client_headers).revision
    with KVStoreClientSync(replica.url, timeout_ms=5000) as client:
        got = client.get(GetRequest(key="k", min_revision=revision), headers=client_headers)
    assert got.value == b"v"

    # Rotating the node token with SIGHUP, no restart: once the replica only accepts
    # the new token, the primary's pushes are refused; once the primary presents it
    # (its repl_token_file re-read), writes replicate again.
    rotated = "node-secret-2"
    write_tokens(tokens, {
        rotated: {"name": "nodes", "roles": ["replication", "admin"]},
        ADMIN: {"name": "ops", "roles": ["admin"]},
        CLIENT: {"name": "chat-backend", "roles": ["read", "write"]},
    })  # fmt: skip
    os.kill(replica.proc.pid, signal.SIGHUP)
    with KVStoreClientSync(primary.url, timeout_ms=5000) as client:
        client.set(SetRequest(key="k", value=b"v2"), headers=client_headers)
    wait_for(
        "the old token refused",
        lambda: "unauthenticated" in status(primary.url).replicas[0].last_error,
    )
    node_token.write_text(rotated + "\n")
    os.kill(primary.proc.pid, signal.SIGHUP)
    os.kill(replica.proc.pid, signal.SIGHUP)  # (its announcements present the new one too)
    with KVStoreClientSync(primary.url, timeout_ms=5000) as client:
        revision = client.set(SetRequest(key="k", value=b"v3"), headers=client_headers).revision
    with KVStoreClientSync(replica.url, timeout_ms=10_000) as client:
        got = client.get(GetRequest(key="k", min_revision=revision), headers=client_headers)
    assert got.value == b"v3"
    assert status(primary.url).replicas[0].state == "streaming"
