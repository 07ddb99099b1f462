"""How a node calls other nodes (replication, announcements, a switchover's Admin
calls): the bearer token it presents (`repl_token_file`) and TLS.

With `tls_ca_file` the peer's certificate is verified against it; a node that
serves TLS itself (`tls_cert_file`/`tls_key_file`) presents that certificate as
its client certificate too, so peers that require mTLS (`tls_client_ca_file`)
accept it. One pyqwest client (one connection pool) serves all of a node's
calls to its peers; replication pushes go over the replication channel, with
an ssl context of the same material.

SIGHUP reloads all of it (`Peers.reload`): the token in place (every call reads
`headers` when it is made), the certificate and CA into the same ssl context
(new connections use them; open ones keep their session, as on the server
side), and a new pyqwest client. A file that cannot be read keeps the old
material and is logged.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

from pyqwest import Client, HTTPTransport

from kvservice.config import ConfigError, Settings

log = logging.getLogger("kvservice.peers")


@dataclass
class Peers:
    headers: dict[str, str] = field(default_factory=dict)
    http_client: Client | None = None
    # The same TLS material for the replication channel (replication/channel.py).
    ssl_context: ssl.SSLContext | None = None

    def reload(self, settings: Settings) -> None:
        """SIGHUP: read the token and TLS material again (see the module's docstring)."""
        try:
            fresh = peer_access(settings)
            if self.ssl_context is not None:
                _load(self.ssl_context, settings)
        except ConfigError as exc:
            log.error("peer credentials not reloaded; the old ones stay", extra={"error": str(exc)})
            return
        self.headers.clear()
        self.headers.update(fresh.headers)
        self.http_client = fresh.http_client
        log.info("peer credentials reloaded")


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
    context = ssl.create_default_context()
    _load(context, settings)
    return context


def _load(context: ssl.SSLContext, settings: Settings) -> None:
    """tls_ca_file's CAs and the node's own certificate into `context` (a CA loaded
    before stays trusted, so a rotation can overlap)."""
    try:
        context.load_verify_locations(cafile=settings.tls_ca_file)
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS material for peer calls: {exc}") from exc
