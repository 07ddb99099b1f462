"""kvservice.config in-process: sources, precedence, the error messages, YAML quirks."""

from __future__ import annotations

import os
from pathlib import Path

import pydantic
import pytest

from kvservice.config import (
    ConfigError,
    Settings,
    describe_validation_error,
    load,
    shown_value,
    sources,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No KVSERVICE_* variable of the caller's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("KVSERVICE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvservice.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    """With no flags, env or file every setting has its documented default."""
    settings = load()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.data_dir == Path("data")
    assert settings.fsync == "always"
    assert settings.max_key_bytes == 1024
    assert settings.max_value_bytes == 1024 * 1024
    assert settings.log_level == "info"
    assert settings.log_format == "json"
    assert settings.access_log is False
    assert settings.config is None
    assert set(sources(settings).values()) == {"default"}


def test_flags_that_are_none_count_as_not_given() -> None:
    """argparse passes None for absent flags; those do not override anything."""
    settings = load({"port": None, "fsync": None})
    assert (settings.port, settings.fsync) == (8080, "always")
    assert sources(settings, {"port": None})["port"] == "default"


def test_flag_values_are_parsed_from_strings() -> None:
    """Flags arrive as strings and are converted to the setting's type."""
    settings = load({"port": "9000", "max_value_bytes": "10", "access_log": True})
    assert (settings.port, settings.max_value_bytes, settings.access_log) == (9000, 10, True)


def test_precedence_flag_over_env_over_file_over_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flag > env > file > default, and sources() says which one won for each setting."""
    config = write(tmp_path, "port: 9001\nfsync: everysec\nmax_key_bytes: 100\nhost: 0.0.0.0\n")
    monkeypatch.setenv("KVSERVICE_PORT", "9002")
    monkeypatch.setenv("KVSERVICE_FSYNC", "no")
    flags = {"config": str(config), "port": "9003"}
    settings = load(flags)
    assert settings.port == 9003
    assert settings.fsync == "no"
    assert settings.max_key_bytes == 100
    assert settings.host == "0.0.0.0"
    assert settings.log_level == "info"
    origin = sources(settings, flags)
    assert origin["port"] == "flag --port"
    assert origin["fsync"] == "env KVSERVICE_FSYNC"
    assert origin["max_key_bytes"] == f"file {config}"
    assert origin["host"] == f"file {config}"
    assert origin["log_level"] == "default"
    assert origin["config"] == "flag --config"


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KVSERVICE_CONFIG names the YAML file when --config is not given."""
    config = write(tmp_path, "max_value_bytes: 123\n")
    monkeypatch.setenv("KVSERVICE_CONFIG", str(config))
    settings = load()
    assert settings.max_value_bytes == 123
    assert settings.config == config
    origin = sources(settings)
    assert origin["max_value_bytes"] == f"file {config}"
    assert origin["config"] == "env KVSERVICE_CONFIG"


def test_settings_are_frozen() -> None:
    """The settings object cannot be changed after load()."""
    settings = load()
    with pytest.raises(pydantic.ValidationError):
        settings.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("text", ["fsync: no\n", "fsync: No\n", "fsync: 'no'\n", 'fsync: "no"\n'])
def test_yaml_fsync_no_is_the_mode_not_a_boolean(tmp_path: Path, text: str) -> None:
    """YAML 1.1 reads a bare `no` as false; `fsync: no` still selects the mode "no"."""
    assert load({"config": str(write(tmp_path, text))}).fsync == "no"


def test_yaml_fsync_yes_is_refused(tmp_path: Path) -> None:
    """`fsync: yes` (YAML true) is not a mode, and the message lists the modes."""
    with pytest.raises(ConfigError) as caught:
        load({"config": str(write(tmp_path, "fsync: yes\n"))})
    assert "'fsync'" in str(caught.value)
    assert "'always', 'everysec' or 'no'" in str(caught.value)


def test_empty_yaml_file_is_all_defaults(tmp_path: Path) -> None:
    """An empty (or comments-only) config file changes nothing."""
    settings = load({"config": str(write(tmp_path, "# nothing yet\n"))})
    assert settings.port == 8080


@pytest.mark.parametrize(
    ("flags", "env", "words"),
    [
        ({"port": "abc"}, {}, ("'port'", "'abc'", "flag --port", "integer")),
        ({"port": "0"}, {}, ("'port'", "flag --port", "greater than or equal to 1")),
        ({"port": "65536"}, {}, ("'port'", "less than or equal to 65535")),
        ({}, {"KVSERVICE_PORT": "99999"}, ("'port'", "env KVSERVICE_PORT", "65535")),
        ({"fsync": "sometimes"}, {}, ("'fsync'", "'always', 'everysec' or 'no'")),
        (
            {},
            {"KVSERVICE_LOG_LEVEL": "loud"},
            ("'log_level'", "env KVSERVICE_LOG_LEVEL", "'debug'"),
        ),
        ({}, {"KVSERVICE_LOG_FORMAT": "xml"}, ("'log_format'", "'json' or 'text'")),
        ({}, {"KVSERVICE_ACCESS_LOG": "maybe"}, ("'access_log'", "boolean")),
        ({"max_key_bytes": "0"}, {}, ("'max_key_bytes'", "greater than or equal to 1")),
        ({"max_value_bytes": "-1"}, {}, ("'max_value_bytes'", "greater than or equal to 0")),
        ({"shutdown_timeout_seconds": "0"}, {}, ("'shutdown_timeout_seconds'", "greater than 0")),
        ({"wal_segment_bytes": "10"}, {}, ("'wal_segment_bytes'", "4096")),
    ],
)
def test_invalid_values_name_the_setting_source_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
    flags: dict[str, str],
    env: dict[str, str],
    words: tuple[str, ...],
) -> None:
    """A refused value is reported with the setting's name, where it came from and the rule."""
    for name, val in env.items():
        monkeypatch.setenv(name, val)
    with pytest.raises(ConfigError) as caught:
        load(flags)
    for word in words:
        assert word in str(caught.value)


def test_every_invalid_setting_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several bad settings give one message naming each of them."""
    monkeypatch.setenv("KVSERVICE_FSYNC", "sometimes")
    with pytest.raises(ConfigError) as caught:
        load({"port": "abc"})
    message = str(caught.value)
    assert "'port'" in message
    assert "'fsync'" in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("port: ninety\n", ("'port'", "'ninety'", "file ", "integer")),
        ("port: 8080.5\n", ("'port'", "fractional")),
        ("bogus: 1\n", ("unknown setting 'bogus'", "known settings:", "max_value_bytes")),
        ("max-key-bytes: 10\n", ("unknown setting 'max-key-bytes'", "max_key_bytes")),
        ("port: [1\n", ("not valid YAML",)),
        ("- port\n", ("must hold a mapping",)),
        ("just a string\n", ("must hold a mapping",)),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    """Bad file contents are refused with the file's path and what is wrong."""
    config = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load({"config": str(config)})
    message = str(caught.value)
    assert str(config) in message
    for word in words:
        assert word in message


def test_unreadable_config_file(tmp_path: Path) -> None:
    """A missing file or a directory is refused naming the path and the OS reason."""
    with pytest.raises(ConfigError, match=r"cannot read config file .*No such file"):
        load({"config": str(tmp_path / "missing.yaml")})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load({"config": str(tmp_path)})


def test_unknown_setting_message_lists_known_settings() -> None:
    """describe_validation_error turns extra_forbidden into a list of the known settings."""
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings(nonsense=1)  # type: ignore[call-arg]
    message = describe_validation_error(caught.value, {})
    assert message.startswith("unknown setting 'nonsense'")
    for name in Settings.model_fields:
        if name != "config":
            assert name in message


def test_shown_value_masks_secrets() -> None:
    """Settings whose names look secret are masked by `config show`; others are shown."""
    assert shown_value("auth_token", "s3cr3t") == "********"
    assert shown_value("tls_key_file", "/etc/kv/key.pem") == "********"
    assert shown_value("password", None) == "None"
    assert shown_value("port", 8080) == "8080"


def test_yaml_boolean_is_not_a_port(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`port: true` (or yes/on) in YAML is a wrong type, not port 1."""
    config = tmp_path / "kv.yaml"
    config.write_text("port: true\n")
    with pytest.raises(ConfigError):
        load({"config": str(config)})


def test_sources_reports_lowercase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a lower-case kvservice_port is applied, config show must not call it a default."""
    monkeypatch.setenv("kvservice_port", "9100")
    settings = load()
    if settings.port == 9100:
        assert sources(settings)["port"] != "default"
