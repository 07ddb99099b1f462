"""How a node calls other nodes (replication, announcements, a switchover's Admin
calls): the bearer token it presents (`repl_token_file`) and TLS.

With `tls_ca_file` the peer's certificate is verified against it; a node that
serves TLS itself (`tls_cert_file`/`tls_key_file`) presents that certificate as
its client certificate too, so peers that require mTLS (`tls_client_ca_file`)
accept it. One pyqwest client (one connection pool) serves all of a node's
calls to its peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyqwest import Client, HTTPTransport

from kvservice.config import ConfigError, Settings


@dataclass
class Peers:
    headers: dict[str, str] = field(default_factory=dict)
    http_client: Client | None = None


def peer_access(settings: Settings) -> Peers:
    """Read the node's outbound credential and TLS material (ConfigError if unreadable)."""
    peers = Peers()
    if settings.repl_token_file is not None:
        try:
            token = settings.repl_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read repl_token_file {settings.repl_token_file}: {exc.strerror}"
            ) from exc
        if not token:
            raise ConfigError(f"repl_token_file {settings.repl_token_file} is empty")
        peers.headers["authorization"] = f"Bearer {token}"
    if settings.tls_ca_file is not None:
        try:
            ca = settings.tls_ca_file.read_bytes()
            cert = settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None
            key = settings.tls_key_file.read_bytes() if settings.tls_key_file else None
        except OSError as exc:
            raise ConfigError(f"cannot read TLS material for peer calls: {exc}") from exc
        peers.http_client = Client(HTTPTransport(tls_ca_cert=ca, tls_cert=cert, tls_key=key))
    return peers
