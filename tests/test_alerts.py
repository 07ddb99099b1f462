"""deployments/prometheus/alerts.yml: valid for promtool, unit-tested, and consistent with
the metrics kvservice exports and the sections of docs/runbook.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvservice.metrics import Metrics, ReplicationGauges

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deployments" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deployments" / "prometheus" / "alerts_test.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
# Series Prometheus itself makes for every scrape target.
PROMETHEUS_SERIES = {"up"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install the Debian package `prometheus` (make tools)"
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts the file, lint included."""
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_rule_unit_tests() -> None:
    """alerts_test.yml passes: node down, writes failing, slow fsync and snapshots fire as meant."""
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == {str(rule["alert"]) for rule in alert_rules()}


def test_every_alert_says_what_and_links_the_runbook() -> None:
    """Each alert has a severity, a summary, a description and a runbook_url to a real section."""
    headings = {
        re.sub(r"[^\w\- ]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }
    for rule in alert_rules():
        labels = rule.get("labels")
        annotations = rule.get("annotations")
        assert isinstance(labels, dict), rule
        assert isinstance(annotations, dict), rule
        assert labels.get("severity") in {"critical", "warning"}, rule["alert"]
        assert annotations.get("summary"), rule["alert"]
        assert annotations.get("description"), rule["alert"]
        path, _, anchor = str(annotations.get("runbook_url")).partition("#")
        assert path == "docs/runbook.md", rule["alert"]
        assert anchor in headings, f"{rule['alert']}: no section #{anchor} in {RUNBOOK}"


def exported_series() -> set[str]:
    """Every series name a node can export, from its own registry."""
    names = set(PROMETHEUS_SERIES)
    metrics = Metrics()
    metrics.watch_replication(
        ReplicationGauges(
            role=lambda: "primary",
            epoch=lambda: 0,
            applied_revision=lambda: 0,
            replica_lag_seconds=lambda: None,
            senders=lambda: [("http://replica:8080", True, 0, 0.0, 0, 0, 0)],
            digest_mismatches=lambda: 0,
        )
    )
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
        else:
            names.add(family.name)
    return names


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alerts_use_only_exported_metrics(rule: dict[str, object]) -> None:
    """Every metric an alert reads is one kvservice exports (a rename would silence it)."""
    expr = str(rule["expr"])
    without_strings = re.sub(r'"[^"]*"', "", expr)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_strings)
    functions = {"histogram_quantile", "sum", "rate", "increase"}
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", without_groupings)) - functions
    used = {w for w in words if w.startswith(("kvservice_", "process_")) or w == "up"}
    assert used, expr
    assert used <= exported_series(), used - exported_series()
