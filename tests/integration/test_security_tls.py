"""HTTPS and mTLS with a CA made in the test: Connect client, curl, buf curl, CLI, rotation."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from connectrpc.errors import ConnectError
from pyqwest import SyncClient, SyncHTTPTransport

from kvservice.v1.kv_connect import KVStoreClientSync
from kvservice.v1.kv_pb2 import GetRequest, SetRequest
from tests.integration.conftest import REPO, ServerProcess, free_port, run_cli
from tests.securitykit import Pki, write_tokens

pytestmark = pytest.mark.integration

BUF = REPO / "node_modules" / ".bin" / "buf"


class TlsServer(ServerProcess):
    """A node serving HTTPS; readiness is probed over TLS with the test CA."""

    ca_file: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with contextlib.closing(
                    socket_to(self.port, self.ca_file, self.client_cert)
                ) as conn:
                    conn.request("GET", "/healthz")
                    if conn.getresponse().status == 200:
                        return
            except (OSError, ssl.SSLError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise AssertionError(f"TLS server not up after {timeout}s:\n{self.log()}")

    client_cert: tuple[Path, Path] | None = None


def socket_to(
    port: int, ca_file: Path, client_cert: tuple[Path, Path] | None = None
) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if client_cert:
        ctx.load_cert_chain(*map(str, client_cert))
    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)


def tls_server(tmp_path: Path, pki: Pki, *args: str, mtls: bool = False) -> TlsServer:
    cert, key = pki.issue("server", server=True)
    flags = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), *args]
    if mtls:
        flags += ["--tls-client-ca-file", str(pki.ca_file)]
    server = TlsServer(data_dir=tmp_path / "data", port=free_port(), args=flags)
    server.ca_file = pki.ca_file
    if mtls:
        server.client_cert = pki.issue("prober", server=False)
    return server


def connect_client(
    server: TlsServer, pki: Pki, client_cert: tuple[Path, Path] | None = None
) -> KVStoreClientSync:
    transport = SyncHTTPTransport(
        tls_ca_cert=pki.ca_file.read_bytes(),
        tls_cert=client_cert[0].read_bytes() if client_cert else None,
        tls_key=client_cert[1].read_bytes() if client_cert else None,
    )
    return KVStoreClientSync(
        server.url, proto_json=True, timeout_ms=10_000, http_client=SyncClient(transport)
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    directory.mkdir()
    return Pki.make(directory)


@pytest.fixture
def stop_later():  # type: ignore[no-untyped-def]
    servers: list[ServerProcess] = []
    yield servers.append
    for server in servers:
        server.kill()


def test_https_with_connect_client_curl_and_buf_curl(tmp_path: Path, pki: Pki, stop_later) -> None:  # type: ignore[no-untyped-def]
    """HTTPS works for clients that trust the CA and fails cleanly for those that do not."""
    server = tls_server(tmp_path, pki)
    stop_later(server)
    server.start()
    with connect_client(server, pki) as kv:
        assert kv.set(SetRequest(key="k", value=b"v")).revision == 1
        assert kv.get(GetRequest(key="k")).value == b"v"
    # Without the CA the client refuses the server's certificate.
    untrusting = KVStoreClientSync(
        server.url, proto_json=True, timeout_ms=5000,
        http_client=SyncClient(SyncHTTPTransport(tls_include_system_certs=True)),
    )  # fmt: skip
    with untrusting, pytest.raises(ConnectError):
        untrusting.get(GetRequest(key="k"))
    get = f"{server.url}/kvservice.v1.KVStore/Get"
    if shutil.which("curl"):
        ok = _curl("--cacert", str(pki.ca_file), "-H", "content-type: application/json",
                   "-d", '{"key":"k"}', get)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["value"] == "dg=="
        refused = _curl("-d", "{}", get)
        assert refused.returncode == 60  # curl: peer certificate cannot be authenticated
    done = _buf_curl("--cacert", str(pki.ca_file), "--data", '{"key":"k"}', get)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["value"] == "dg=="
    assert _buf_curl("--data", '{"key":"k"}', get).returncode != 0


def test_mtls_refuses_clients_without_a_certificate(tmp_path: Path, pki: Pki, stop_later) -> None:  # type: ignore[no-untyped-def]
    """With tls_client_ca_file the handshake needs a client certificate signed by the CA."""
    server = tls_server(tmp_path, pki, mtls=True)
    stop_later(server)
    server.start()
    client_cert = pki.issue("chat-backend", server=False)
    with connect_client(server, pki, client_cert) as kv:
        assert kv.set(SetRequest(key="k", value=b"v")).revision == 1
    with connect_client(server, pki) as kv, pytest.raises(ConnectError):
        kv.get(GetRequest(key="k"))
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    stranger = Pki.make(stranger_dir).issue("stranger", server=False)
    with connect_client(server, pki, stranger) as kv, pytest.raises(ConnectError):
        kv.get(GetRequest(key="k"))
    get = f"{server.url}/kvservice.v1.KVStore/Get"
    if shutil.which("curl"):
        ok = _curl("--cacert", str(pki.ca_file), "--cert", str(client_cert[0]),
                   "--key", str(client_cert[1]), "-H", "content-type: application/json",
                   "-d", '{"key":"k"}', get)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        refused = _curl("--cacert", str(pki.ca_file), "-d", "{}", get)
        assert refused.returncode != 0
    done = _buf_curl("--cacert", str(pki.ca_file), "--cert", str(client_cert[0]),
                     "--key", str(client_cert[1]), "--data", '{"key":"k"}', get)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert server.proc is not None
    assert server.proc.poll() is None


def test_sighup_rotates_the_certificate_without_dropping_connections(
    tmp_path: Path, pki: Pki, stop_later
) -> None:  # type: ignore[no-untyped-def]
    """After SIGHUP new handshakes get the new certificate; an open connection keeps working."""
    server = tls_server(tmp_path, pki)
    stop_later(server)
    server.start()
    cert_file = tmp_path / "pki" / "server.pem"
    old_cert = cert_file.read_bytes()
    conn = socket_to(server.port, pki.ca_file)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read()
    assert conn.sock is not None
    old_der = conn.sock.getpeercert(binary_form=True)
    pki.issue("server", server=True)  # a new key and certificate over the same files
    assert cert_file.read_bytes() != old_cert
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS certificate reloaded" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The connection opened before the reload is still served.
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    assert conn.sock.getpeercert(binary_form=True) == old_der
    conn.close()
    fresh = socket_to(server.port, pki.ca_file)
    fresh.request("GET", "/healthz")
    assert fresh.getresponse().status == 200
    assert fresh.sock is not None
    assert fresh.sock.getpeercert(binary_form=True) != old_der
    fresh.close()


def test_cli_snapshot_verifies_tls_and_sends_a_token(tmp_path: Path, pki: Pki, stop_later) -> None:  # type: ignore[no-untyped-def]
    """`kvservice snapshot --url https://…` uses tls_ca_file and KVSERVICE_TOKEN/--token-file."""
    tokens = write_tokens(
        tmp_path / "tokens.yaml", {"ops-token": {"name": "ops", "roles": ["admin"]}}
    )
    server = tls_server(tmp_path, pki, "--auth", "token", "--tokens-file", str(tokens))
    stop_later(server)
    server.start()
    token_file = tmp_path / "token"
    token_file.write_text("ops-token\n")
    done = run_cli("snapshot", "--url", server.url, "--tls-ca-file", str(pki.ca_file),
                   "--token-file", str(token_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "snapshot at revision 0" in done.stdout
    done = run_cli("snapshot", "--url", server.url, "--tls-ca-file", str(pki.ca_file),
                   env={"KVSERVICE_TOKEN": "ops-token"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = run_cli("snapshot", "--url", server.url, "--tls-ca-file", str(pki.ca_file))
    assert done.returncode == 1
    assert "unauthenticated" in done.stderr
    done = run_cli("snapshot", "--url", server.url, "--token-file", str(token_file))
    assert done.returncode == 1  # the node's certificate is not trusted without tls_ca_file


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args],
        check=False, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def _buf_curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), f"{BUF} is missing: run `make setup` (npm install)"
    return subprocess.run(
        [str(BUF), "curl", "--schema", "proto", "--protocol", "connect", *args],
        check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip


def tls_node(
    tmp_path: Path, pki: Pki, name: str, *args: str, valid_seconds: float = 86_400
) -> TlsServer:
    """A node serving HTTPS with mTLS that calls its peers over TLS too (tls_ca_file),
    presenting its own certificate (issued for both usages)."""
    cert, key = pki.issue(name, server=True, node=True, valid_seconds=valid_seconds)
    port = free_port()
    flags = ["--tls-cert-file", str(cert), "--tls-key-file", str(key),
             "--tls-client-ca-file", str(pki.ca_file), "--tls-ca-file", str(pki.ca_file),
             "--advertise-url", f"https://127.0.0.1:{port}", "--repl-heartbeat-seconds", "0.2",
             "--repl-retry-max-seconds", "0.5", *args]  # fmt: skip
    node = TlsServer(data_dir=tmp_path / name, port=port, args=flags)
    node.ca_file = pki.ca_file
    node.client_cert = pki.issue(f"{name}-prober", server=False)
    return node


def test_replication_over_mtls_and_a_node_certificate_rotated_by_sighup(
    tmp_path: Path, pki: Pki, stop_later
) -> None:  # type: ignore[no-untyped-def]
    """A primary and a replica that both require client certificates replicate over
    HTTPS. The primary's certificate (serving, and presented to the replica) is
    short-lived: replaced on disk and reloaded by SIGHUP, it is what the primary
    presents on its new connections after the old one expired, so replication
    goes on with no restart of the primary."""
    lifetime = 25.0  # (long enough for two node starts on a slow machine)
    issued = time.monotonic()
    primary = tls_node(tmp_path, pki, "primary", valid_seconds=lifetime)
    stop_later(primary)
    primary.start()
    replica = tls_node(tmp_path, pki, "replica", "--role", "replica",
                       "--primary-url", primary.url)  # fmt: skip
    stop_later(replica)
    replica.start()

    def replicated(key: bytes) -> None:
        with connect_client(primary, pki, primary.client_cert) as kv:
            revision = kv.set(SetRequest(key=key.decode(), value=key)).revision
        with connect_client(replica, pki, replica.client_cert) as kv:
            got = kv.get(GetRequest(key=key.decode(), min_revision=revision))
        assert got.value == key

    replicated(b"before-rotation")
    pki.issue("primary", server=True, node=True)  # a new key and certificate, same files
    assert primary.proc is not None
    os.kill(primary.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "peer credentials reloaded" not in primary.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "peer credentials reloaded" in primary.log()
    time.sleep(max(0.0, issued + lifetime + 1 - time.monotonic()))  # the old one expired
    # New connections both ways: the replica restarts (the primary does not).
    replica.stop()
    replica.start()
    replicated(b"after-rotation")
