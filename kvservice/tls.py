"""TLS for the server (HTTPS, optional mTLS, reload on SIGHUP) and for the CLI's calls.

Reload loads the new certificate chain into the live `SSLContext` the
listening socket uses: new handshakes get the new certificate, established
connections keep theirs and are not dropped. A new client CA bundle is added to
the trust store; removing a CA needs a restart.
"""

from __future__ import annotations

import logging
import ssl

import uvicorn

from kvservice.config import ConfigError, Settings

log = logging.getLogger("kvservice.tls")


def check(settings: Settings) -> None:
    """Load the configured files once, so a bad one stops start-up naming it."""
    if settings.tls_cert_file and settings.tls_key_file:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load tls_cert_file {settings.tls_cert_file} with tls_key_file"
                f" {settings.tls_key_file}: {exc}"
            ) from exc
        for name in ("tls_client_ca_file", "tls_ca_file"):
            path = getattr(settings, name)
            if path is not None:
                try:
                    ctx.load_verify_locations(cafile=path)
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(f"cannot load {name} {path}: {exc}") from exc


def configure(config: uvicorn.Config, settings: Settings) -> None:
    if not settings.tls_cert_file:
        return
    config.ssl_certfile = str(settings.tls_cert_file)
    config.ssl_keyfile = str(settings.tls_key_file)
    if settings.tls_client_ca_file:
        config.ssl_ca_certs = str(settings.tls_client_ca_file)
        config.ssl_cert_reqs = ssl.CERT_REQUIRED
    # uvicorn's default cipher string ("TLSv1") would also allow weak suites.
    config.ssl_ciphers = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS"


def after_load(config: uvicorn.Config) -> None:
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2


def reload(config: uvicorn.Config, settings: Settings) -> None:
    """Load the current certificate files into the live context; keep the old ones on error."""
    ctx = config.ssl
    if ctx is None or not settings.tls_cert_file:
        return
    try:
        ctx.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
        if settings.tls_client_ca_file:
            ctx.load_verify_locations(cafile=str(settings.tls_client_ca_file))
    except (OSError, ssl.SSLError) as exc:
        log.error(
            "TLS reload failed; still serving the previous certificate", extra={"error": str(exc)}
        )
        return
    log.info("TLS certificate reloaded", extra={"cert": str(settings.tls_cert_file)})


def client_ca_bytes(settings: Settings) -> bytes | None:
    """The CA bundle the CLI verifies a node with (tls_ca_file), as PEM bytes."""
    if settings.tls_ca_file is None:
        return None
    try:
        return settings.tls_ca_file.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read tls_ca_file {settings.tls_ca_file}: {exc.strerror}"
        ) from exc
