"""How the CLI's `--url` commands (and later replication) call a node: credential and TLS."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from pyqwest import SyncClient, SyncHTTPTransport

from kvservice import tls
from kvservice.config import ConfigError, Settings

TOKEN_ENV = "KVSERVICE_TOKEN"


@dataclass
class Remote:
    headers: dict[str, str] = field(default_factory=dict)
    http_client: SyncClient | None = None


def add_remote_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file", default=None,
        help=f"file holding the bearer token to send (default: env {TOKEN_ENV})",
    )  # fmt: skip
    parser.add_argument(
        "--tls-ca-file", dest="tls_ca_file", default=None,
        help="PEM CA bundle to verify the node's certificate (https URLs)",
    )  # fmt: skip


def remote_transport(settings: Settings, token_file: str | None) -> Remote:
    """Headers and client for calling a node: --token-file or KVSERVICE_TOKEN, tls_ca_file."""
    remote = Remote()
    token = os.environ.get(TOKEN_ENV, "")
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
    if token:
        remote.headers["authorization"] = f"Bearer {token}"
    ca = tls.client_ca_bytes(settings)
    if ca is not None:
        remote.http_client = SyncClient(SyncHTTPTransport(tls_ca_cert=ca))
    return remote
