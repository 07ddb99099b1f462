"""Settings: one frozen object, the only place that reads flags, env vars or the file.

Precedence: command-line flag > environment variable `KVSERVICE_<NAME>` >
YAML config file (`--config FILE` or `KVSERVICE_CONFIG`) > default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "KVSERVICE_"
KiB = 1024
MiB = 1024 * KiB

FsyncMode = Literal["always", "everysec", "no"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["json", "text"]
Role = Literal["primary", "replica"]
AuthMode = Literal["none", "token"]
Compression = Literal["none", "zstd"]


class ConfigError(Exception):
    """Settings could not be loaded; the message names the setting and what is allowed."""


class Settings(BaseSettings):
    """Every setting of a node. Field descriptions double as `--help` and README text."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    config: Path | None = Field(None, description="YAML file with settings (flags and env win)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=1, le=65535, description="TCP port to listen on")
    data_dir: Path = Field(Path("data"), description="directory for wal/ and snap/")
    fsync: FsyncMode = Field(
        "always", description="when WAL records reach the disk before a write is acknowledged"
    )
    max_key_bytes: int = Field(1 * KiB, ge=1, le=64 * KiB, description="largest key, UTF-8 bytes")
    max_value_bytes: int = Field(1 * MiB, ge=0, le=64 * MiB, description="largest value, bytes")
    max_batch_ops: int = Field(
        1000, ge=1, le=100_000,
        description="most conditions + operations in one Txn, and keys in one MGet",
    )  # fmt: skip
    expiry_cycle_ms: int = Field(
        100, ge=10, le=10_000,
        description="how often the primary removes keys whose TTL has passed",
    )  # fmt: skip
    expiry_keys_per_cycle: int = Field(
        1000, ge=1, le=1_000_000,
        description="most expired keys removed per cycle (bounds the work of one cycle)",
    )  # fmt: skip
    compression: Compression = Field(
        "none", description="store values of compression_min_bytes or more as zstd frames"
    )
    compression_min_bytes: int = Field(
        512, ge=1, le=64 * MiB, description="smallest value that compression applies to"
    )
    wal_segment_bytes: int = Field(
        64 * MiB, ge=4 * KiB, description="rotate the WAL segment after this many bytes"
    )
    snapshot_threshold_bytes: int = Field(
        64 * MiB, ge=4 * KiB, description="take a snapshot after this many WAL bytes"
    )
    wal_retention_max_bytes: int = Field(
        1024 * MiB, ge=0,
        description="most WAL bytes kept behind the snapshots for consumers that still need"
        " them (replicas, watch streams); past it the oldest segments go and they resync",
    )  # fmt: skip
    scan_max_bytes: int = Field(
        4 * MiB, ge=1 * KiB, le=64 * MiB,
        description="a Scan page ends before its keys and values pass this many bytes"
        " (a page always holds at least one key)",
    )  # fmt: skip
    log_level: LogLevel = Field("info", description="lowest level logged")
    log_format: LogFormat = Field("json", description="json lines, or text for people")
    access_log: bool = Field(False, description="log every request")
    shutdown_timeout_seconds: float = Field(
        10.0, gt=0, le=3600, description="how long in-flight requests may run after SIGTERM"
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="browser origins allowed to call the API, comma-separated; * for any"
    )
    # -- replication (README, "Replication") --
    role: Role = Field("primary", description="primary (takes writes) or replica (read-only)")
    primary_url: str | None = Field(
        None, description="replica: base URL of its primary, to announce itself to"
    )
    replicas: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="primary: base URLs of replicas to push to, comma-separated"
        " (replicas that announce themselves are added too)",
    )  # fmt: skip
    advertise_url: str | None = Field(
        None, description="how other nodes reach this one (default: http://<host>:<port>)"
    )
    repl_batch_max_entries: int = Field(
        1000, ge=1, le=100_000, description="most log entries in one push to a replica"
    )
    repl_batch_max_bytes: int = Field(
        1 * MiB, ge=4 * KiB, le=64 * MiB,
        description="most record bytes in one push (a larger single entry goes alone)",
    )  # fmt: skip
    repl_backlog_bytes: int = Field(
        64 * MiB, ge=4 * KiB,
        description="primary: WAL kept behind the snapshots so a replica that was away"
        " can resume with a partial resync (as Redis repl-backlog-size)",
    )  # fmt: skip
    repl_heartbeat_seconds: float = Field(
        1.0, gt=0, le=60, description="primary: contact every replica at least this often"
    )
    repl_retry_max_seconds: float = Field(
        5.0, gt=0, le=300, description="cap of the exponential backoff between retries"
    )
    replica_max_lag_seconds: float = Field(
        10.0, ge=0.1, le=3600,
        description="replica: /readyz is 503 when the primary was not heard from, or the"
        " replica lags, for longer than this",
    )  # fmt: skip
    min_revision_max_wait_ms: int = Field(
        5000, ge=0, le=600_000, description="longest a Get with min_revision waits"
    )
    wait_replicas_max_wait_ms: int = Field(
        5000, ge=0, le=600_000,
        description="longest a write with wait_replicas waits for replica acknowledgements",
    )  # fmt: skip
    repair_on_mismatch: bool = Field(
        True, description="replica: a state digest that differs from the primary's at the"
        " same revision triggers one full resync",
    )  # fmt: skip
    min_replicas: int = Field(
        0, ge=0, le=100,
        description="primary: refuse writes (unavailable) while fewer replicas are healthy",
    )  # fmt: skip
    min_replicas_max_lag_seconds: float = Field(
        10.0, ge=0.1, le=3600,
        description="a replica counts as healthy for min_replicas when connected and"
        " lagging less than this",
    )  # fmt: skip
    # -- watch streams (README, "Watch") --
    watch_max_streams: int = Field(
        10_000, ge=1, le=1_000_000,
        description="most Watch streams open at once; more get resource_exhausted",
    )  # fmt: skip
    watch_buffer_events: int = Field(
        10_000, ge=10, le=10_000_000,
        description="events queued for one Watch stream before its consumer counts as too slow"
        " (the stream ends with resource_exhausted and resumes)",
    )  # fmt: skip
    watch_buffer_bytes: int = Field(
        8 * MiB, ge=64 * KiB, le=1024 * MiB,
        description="bytes of events queued for one Watch stream before it counts as too slow",
    )  # fmt: skip
    watch_batch_max_events: int = Field(
        1000, ge=1, le=100_000,
        description="most events in one Watch message (a Txn's events always go together)",
    )  # fmt: skip
    watch_batch_max_bytes: int = Field(
        1 * MiB, ge=4 * KiB, le=64 * MiB,
        description="most event bytes in one Watch message (a larger Txn or value goes alone)",
    )  # fmt: skip
    watch_progress_seconds: float = Field(
        5.0, ge=0.05, le=3600,
        description="a Watch stream gets a progress message (the current revision) at least"
        " this often",
    )  # fmt: skip
    watch_stall_seconds: float = Field(
        10.0, ge=0.1, le=3600,
        description="a Watch stream ended for being too slow whose client still reads nothing"
        " is cancelled (its slot freed) after this long",
    )  # fmt: skip

    # --- Security (README "Security"): TLS, authentication, limits, hostile input ---
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve HTTPS")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mTLS)"
    )
    tls_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle to verify the nodes this one calls (CLI --url, replication)",
    )
    repl_token_file: Path | None = Field(
        None,
        description="file holding the bearer token this node presents to other nodes"
        " (replication pushes and announcements: role replication; a switchover's Admin"
        " calls: role admin)",
    )  # fmt: skip
    auth: AuthMode = Field("none", description="none, or token: every RPC needs a bearer token")
    tokens_file: Path | None = Field(
        None, description="YAML file of static tokens (SHA-256 hashes) with roles and prefixes"
    )
    jwt_hs256_secret_file: Path | None = Field(
        None, description="file holding the HS256 secret that signs JWTs"
    )
    jwt_jwks_file: Path | None = Field(
        None, description="JWKS file with the RS256/ES256 public keys that sign JWTs"
    )
    jwt_issuer: str | None = Field(None, description="required `iss` claim of JWTs")
    jwt_audience: str | None = Field(None, description="required `aud` claim of JWTs")
    jwt_prefix_template: str = Field(
        "user:{sub}:", description="key prefix a JWT holder is confined to; empty = every key"
    )
    jwt_roles_claim: str = Field("roles", description="JWT claim holding the list of roles")
    jwt_default_roles: str = Field(
        "read,write", description="roles of a JWT without the roles claim, comma-separated"
    )
    jwt_shared_prefixes: str | None = Field(
        None, description="extra prefixes for JWT holders: prefix=role+role, comma-separated"
    )
    jwt_leeway_seconds: float = Field(
        30.0, ge=0, le=3600, description="clock skew allowed on exp and nbf"
    )
    metrics_auth: bool = Field(False, description="/metrics needs a token with the admin role")
    rate_limit_rps: float = Field(
        0.0, ge=0, description="requests per second per identity; 0 = no rate limit"
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="token bucket size per identity; 0 = rate_limit_rps rounded up"
    )
    rate_limit_roles: str | None = Field(
        None, description="per-role overrides: role=rps[:burst], comma-separated; rps 0 = no limit"
    )
    max_concurrent_requests: int = Field(
        0, ge=0, description="RPCs served at once before resource_exhausted; 0 = no limit"
    )
    max_connections: int = Field(
        0, ge=0, description="open connections before new requests get 503; 0 = no limit"
    )
    max_header_bytes: int = Field(
        32 * KiB, ge=1 * KiB, le=1 * MiB, description="largest request line + headers"
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, le=3600, description="time a client has to send its request headers"
    )
    body_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="time a client has to send a request body"
    )
    linger_seconds: float = Field(
        5.0, ge=0, le=600, description="how long an unread body is drained after an early reply"
    )
    insecure: bool = Field(
        False, description="allow a non-loopback host with auth none (protected mode off)"
    )

    @field_validator(
        "jwt_leeway_seconds", "rate_limit_rps", "rate_limit_burst", "max_concurrent_requests",
        "max_connections", "max_header_bytes", "header_timeout_seconds", "body_timeout_seconds",
        "linger_seconds", mode="before",
    )  # fmt: skip
    @classmethod
    def _no_booleans_as_security_numbers(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        return value

    @field_validator(
        "port", "max_key_bytes", "max_value_bytes", "wal_segment_bytes", "max_batch_ops",
        "expiry_cycle_ms", "expiry_keys_per_cycle", "compression_min_bytes",
        "snapshot_threshold_bytes", "wal_retention_max_bytes", "shutdown_timeout_seconds",
        "repl_batch_max_entries", "repl_batch_max_bytes", "repl_backlog_bytes",
        "repl_heartbeat_seconds", "repl_retry_max_seconds", "replica_max_lag_seconds",
        "min_revision_max_wait_ms", "wait_replicas_max_wait_ms", "min_replicas",
        "min_replicas_max_lag_seconds", "watch_max_streams", "watch_buffer_events",
        "watch_buffer_bytes", "watch_batch_max_events", "watch_batch_max_bytes",
        "watch_progress_seconds", "watch_stall_seconds", "scan_max_bytes", mode="before",
    )  # fmt: skip
    @classmethod
    def _no_booleans_as_numbers(cls, value: object) -> object:
        # YAML reads `yes`/`on`/`true` as booleans, and pydantic would take them as 1.
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        return value

    @field_validator("cors_origins", "replicas", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(o.strip() for o in value.split(",") if o.strip())
        return value

    @field_validator("primary_url", "advertise_url", "replicas")
    @classmethod
    def _http_urls(cls, value: object) -> object:
        urls = value if isinstance(value, tuple) else (value,)
        for url in urls:
            if url is not None and not str(url).startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not a base URL (http://host:port)")
        if isinstance(value, tuple):
            return tuple(u.rstrip("/") for u in value)
        return value.rstrip("/") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _role_settings(self) -> Settings:
        if self.role == "primary" and self.primary_url:
            raise ValueError("primary_url is for replicas: set role to replica, or drop it")
        if self.role == "replica" and self.replicas:
            raise ValueError("replicas is for primaries: a replica does not push")
        return self

    @property
    def own_url(self) -> str:
        """How other nodes reach this one."""
        return self.advertise_url or f"http://{self.host}:{self.port}"

    @field_validator("fsync", mode="before")
    @classmethod
    def _yaml_no_is_a_mode(cls, value: object) -> object:
        # YAML 1.1 reads a bare `fsync: no` as the boolean false.
        return "no" if value is False else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(init_settings, InitSettingsSource)
        config_file = init_settings.init_kwargs.get("config") or os.environ.get(
            f"{ENV_PREFIX}CONFIG"
        )
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(YamlFileSource(settings_cls, Path(config_file)))
        return tuple(sources)


class YamlFileSource(PydanticBaseSettingsSource):
    """Settings from a YAML mapping; a missing file or a non-mapping is an error."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        self.path = path
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of setting: value")
        self.values: dict[str, Any] = loaded

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def load(flags: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings from flags (only those given), env and file; raise ConfigError."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, given)) from exc


def describe_validation_error(exc: ValidationError, flags: Mapping[str, Any]) -> str:
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across settings
            lines.append(f"invalid settings: {error['msg'].removeprefix('Value error, ')}")
            continue
        name = str(error["loc"][0])
        where = _origin(name, flags)
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(n for n in Settings.model_fields if n != "config")
            lines.append(f"unknown setting '{name}' ({where}); known settings: {allowed}")
            continue
        lines.append(f"invalid setting '{name}' = {error.get('input')!r} ({where}): {error['msg']}")
    return "; ".join(lines)


def sources(settings: Settings, flags: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Where each effective value came from: flag, env KVSERVICE_X, file PATH or default."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return {name: _origin(name, given, settings.config) for name in Settings.model_fields}


def _origin(name: str, flags: Mapping[str, Any], config: Path | None = None) -> str:
    if name in flags:
        return f"flag --{name.replace('_', '-')}"
    # pydantic-settings matches env names case-insensitively; so must we.
    env_name = f"{ENV_PREFIX}{name}".lower()
    for key in os.environ:
        if key.lower() == env_name:
            return f"env {key}"
    config_file = config or flags.get("config") or os.environ.get(f"{ENV_PREFIX}CONFIG")
    if config_file and name != "config":
        try:
            values = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            values = {}
        if isinstance(values, dict) and name in values:
            return f"file {config_file}"
    return "default"


SECRET_WORDS = ("token", "secret", "password", "key_file")


def shown_value(name: str, value: object) -> str:
    """A value as `config show` prints it, secrets masked."""
    if value is not None and any(word in name for word in SECRET_WORDS):
        return "********"
    return str(value)
