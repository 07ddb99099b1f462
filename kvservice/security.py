"""Security of one node, assembled from the settings: who may call, how often, over what.

`Security` holds the reloadable parts (tokens, JWT keys) and builds the
middleware and interceptor; `check_settings` refuses an unsafe or inconsistent
configuration before anything starts (protected mode included); `harden`
applies TLS, the hardened HTTP protocol and SIGHUP reloading to uvicorn.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.middleware import Middleware

from kvservice import tls, transport
from kvservice.access import AccessInterceptor
from kvservice.audit import SecurityStats
from kvservice.auth import Principal, TokenTable, bearer_token
from kvservice.config import ConfigError, Settings
from kvservice.credentials import Credential, CredentialCache
from kvservice.errors import Unauthenticated
from kvservice.jwt_auth import JwtVerifier, looks_like_jwt
from kvservice.middleware import GrpcGuard, SecurityMiddleware
from kvservice.ratelimit import ConcurrencyLimit, RateLimiter, parse_role_limits

log = logging.getLogger("kvservice.security")


class Security:
    """The authenticator, limits and audit counters of a node."""

    def __init__(self, settings: Settings, stats: SecurityStats) -> None:
        self.settings = settings
        self.stats = stats
        self.auth_on = settings.auth == "token"
        self.metrics_auth = settings.metrics_auth
        self.tokens = TokenTable.load(settings.tokens_file) if settings.tokens_file else None
        jwt_on = bool(settings.jwt_hs256_secret_file or settings.jwt_jwks_file)
        self.jwt = JwtVerifier(settings) if jwt_on else None
        role_limits = parse_role_limits(settings.rate_limit_roles or "")
        limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst, role_limits)
        self.limiter = limiter if limiter.enabled else None
        limit = settings.max_concurrent_requests
        self.concurrency = ConcurrencyLimit(limit) if limit else None
        self.verified = CredentialCache()

    @property
    def active(self) -> bool:
        """Whether the middleware has anything to do (plain nodes skip it entirely)."""
        return bool(self.auth_on or self.limiter or self.concurrency or self.metrics_auth)

    def middleware(self) -> list[Middleware]:
        guard = [Middleware(GrpcGuard)]
        return [*guard, Middleware(SecurityMiddleware, security=self)] if self.active else guard

    def interceptors(self) -> list[AccessInterceptor]:
        return [AccessInterceptor(self.stats)] if self.auth_on else []

    def authenticate(self, authorization: bytes | None) -> Credential | tuple[str, str]:
        """The caller, or (reason, message) saying why not."""
        if authorization is not None:
            known = self.verified.get(authorization, time.time())
            if known is not None:
                return known
        found = self._verify(authorization)
        if not isinstance(found, Principal):
            return found
        credential = self.credential(found, f"{found.kind}:{found.name}")
        if authorization is not None:  # (always, when verified: it held the credential)
            self.verified.put(authorization, credential)
        return credential

    def credential(self, principal: Principal, identity: str) -> Credential:
        """What each request of `principal` needs: its rate-limit identity and limit, and
        when it stops being valid."""
        limiter = self.limiter
        return Credential(
            principal, identity, limiter.limit_for(principal) if limiter else None,
            -math.inf if principal.not_before is None else principal.not_before,
            math.inf if principal.not_after is None else principal.not_after,
        )  # fmt: skip

    def _verify(self, authorization: bytes | None) -> Principal | tuple[str, str]:
        try:
            token = bearer_token(authorization)
        except Unauthenticated as exc:
            return "missing_credential", str(exc)
        if self.tokens is not None:
            principal = self.tokens.match(token)
            if principal is not None:
                return principal
        if self.jwt is not None and looks_like_jwt(token):
            try:
                return self.jwt.verify(token)
            except Unauthenticated as exc:
                reason = "expired_jwt" if "expired" in str(exc) else "invalid_jwt"
                return reason, str(exc)
        return "unknown_token", "the bearer token is not one this node knows"

    def reload(self) -> None:
        """Re-read tokens_file and the JWT key files; on any error keep what was loaded."""
        try:
            tokens = (
                TokenTable.load(self.settings.tokens_file) if self.settings.tokens_file else None
            )
            if self.jwt is not None:
                self.jwt.reload()
        except ConfigError as exc:
            log.error(
                "reload refused; still using the previous credentials", extra={"error": str(exc)}
            )
            return
        self.tokens = tokens
        self.verified.clear()  # a removed token or a rotated key stops working now
        keys = len(self.jwt.keys) if self.jwt else 0
        log.info("credentials reloaded", extra={"tokens": len(tokens or ()), "jwks_keys": keys})


def protected_mode_refusal(settings: Settings) -> str | None:
    """Why a node must not start as configured (Redis's protected mode), or None."""
    if settings.auth != "none" or settings.insecure or settings.tls_client_ca_file:
        return None
    if is_loopback(settings.host):
        return None
    return (
        f"refusing to listen on {settings.host} with auth: none (protected mode): anyone who"
        " can reach the port could read and write every key. Set auth: token with tokens_file"
        " or jwt_* settings, require client certificates with tls_client_ca_file, listen on"
        " 127.0.0.1, or pass --insecure if the network itself is trusted."
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_settings(settings: Settings) -> None:
    """Refuse (ConfigError) unsafe or inconsistent security settings before start-up."""
    refusal = protected_mode_refusal(settings)
    if refusal:
        raise ConfigError(refusal)
    jwt_on = bool(settings.jwt_hs256_secret_file or settings.jwt_jwks_file)
    if settings.auth == "token" and not (settings.tokens_file or jwt_on):
        raise ConfigError("auth: token needs tokens_file, jwt_hs256_secret_file or jwt_jwks_file")
    if settings.auth == "none" and (settings.tokens_file or jwt_on or settings.metrics_auth):
        raise ConfigError(
            "tokens_file, jwt_* and metrics_auth only take effect with auth: token;"
            " set auth: token (or remove them)"
        )
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ConfigError("tls_cert_file and tls_key_file go together")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        raise ConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
    # Load everything once, so a bad file stops start-up with its name.
    Security(settings, SecurityStats())
    tls.check(settings)


def harden(
    config: uvicorn.Config, settings: Settings, also_on_sighup: Callable[[], None] | None = None
) -> None:
    """TLS, the hardened HTTP protocol and connection limit; SIGHUP reloads credentials
    (and runs `also_on_sighup`: the node's own credentials for calling its peers)."""
    tls.configure(config, settings)
    config.http = transport.protocol_class(settings)
    if settings.max_connections:
        config.limit_concurrency = settings.max_connections
    config.load()
    tls.after_load(config)
    security: Security | None = getattr(getattr(config.app, "state", None), "security", None)

    def on_sighup(signum: int, frame: Any) -> None:
        log.info("SIGHUP: reloading credentials and certificates")
        if security is not None:
            security.reload()
        tls.reload(config, settings)
        if also_on_sighup is not None:
            also_on_sighup()

    signal.signal(signal.SIGHUP, on_sighup)
