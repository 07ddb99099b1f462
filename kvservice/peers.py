"""How a node calls other nodes (replication, announcements, a switchover's Admin
calls): the bearer token it presents (`repl_token_file`) and TLS.

With `tls_ca_file` the peer's certificate is verified against it; a node that
serves TLS itself (`tls_cert_file`/`tls_key_file`) presents that certificate as
its client certificate too, so peers that require mTLS (`tls_client_ca_file`)
accept it. One pyqwest client (one connection pool) serves all of a node's
calls to its peers.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from pyqwest import Client, HTTPTransport

from kvservice.config import ConfigError, Settings


@dataclass
class Peers:
    headers: dict[str, str] = field(default_factory=dict)
    http_client: Client | None = None
    # The same TLS material for the replication channel (replication/channel.py).
    ssl_context: ssl.SSLContext | None = None


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
        peers.ssl_context = _ssl_context(settings)
    return peers


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    """A client context that verifies peers against tls_ca_file and presents the node's
    own certificate when it has one."""
    try:
        context = ssl.create_default_context(cafile=settings.tls_ca_file)
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS material for peer calls: {exc}") from exc
    return context
