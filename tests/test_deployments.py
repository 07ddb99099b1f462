"""Deployment files agree with the code: the example settings load, and the
systemd unit gives a node the time and exit-code handling it needs."""

from __future__ import annotations

import configparser
from pathlib import Path

import yaml

from kvservice import cli
from kvservice.config import load

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOYMENTS / "systemd" / "kvservice.service")
    return parser


def test_example_settings_load() -> None:
    settings = load({"config": str(DEPLOYMENTS / "kvservice.yaml")})
    assert settings.fsync == "always"
    assert str(settings.data_dir) == "/var/lib/kvservice"


def test_stop_timeout_outlasts_the_drain() -> None:
    """systemd must not SIGKILL a node that is still draining and fsyncing."""
    drain = yaml.safe_load((DEPLOYMENTS / "kvservice.yaml").read_text())["shutdown_timeout_seconds"]
    service = unit()["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > drain + 5


def test_no_restart_loop_on_errors_a_person_must_fix() -> None:
    service = unit()["Service"]
    codes = {int(c) for c in service["RestartPreventExitStatus"].split()}
    assert codes == {cli.EXIT_USAGE, cli.EXIT_STORAGE}


def test_unit_runs_serve_with_the_config_file_and_writes_only_its_data_dir() -> None:
    service = unit()["Service"]
    assert " serve --config " in service["ExecStart"]
    data_dir = yaml.safe_load((DEPLOYMENTS / "kvservice.yaml").read_text())["data_dir"]
    assert service["ReadWritePaths"] == data_dir
    assert service["StateDirectory"] == Path(data_dir).name
