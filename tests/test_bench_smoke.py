"""The benchmark harness (bench/) runs end to end with tiny counts, so it never rots.

The smoke run uses whatever peers and wrk the machine has and says what it
skipped; without wrk its HTTP load comes from bench.pyload, tested on its own here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.load import HttpLoad, run_http
from bench.servers import start_uvicorn_app

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SECTIONS = (
    "## Targets (issue 4)",
    "## Throughput",
    "## kvservice against each peer",
    "## Memory",
    "## Recovery",
    "## Method",
    "## Machine and versions",
    "## Exact commands",
)
KV_CASES = (
    "kvservice Get, JSON",
    "kvservice Get, proto",
    "kvservice Set, JSON, fsync=always",
    "kvservice Set, proto, fsync=always",
    "kvservice Set, JSON, fsync=no",
    "kvservice Set, proto, fsync=no",
    "bare ASGI app, fixed body",
    "bare connect-python Get, JSON",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out, (out / "smoke.md").read_text()


def test_smoke_writes_only_its_own_file(smoke: tuple[Path, str]) -> None:
    out, _ = smoke
    assert sorted(p.name for p in out.iterdir()) == ["smoke.md"]


def test_smoke_report_has_every_section(smoke: tuple[Path, str]) -> None:
    _, text = smoke
    for section in SECTIONS:
        assert section in text
    assert "SMOKE run" in text


def test_every_kvservice_case_has_a_median(smoke: tuple[Path, str]) -> None:
    _, text = smoke
    for label in KV_CASES:
        row = re.search(rf"^\| {re.escape(label)} \| \*\*([\d,]+)\*\* \|", text, re.MULTILINE)
        assert row is not None, f"no throughput row for {label}"
        assert int(row.group(1).replace(",", "")) > 0


def test_all_four_targets_are_judged(smoke: tuple[Path, str]) -> None:
    _, text = smoke
    for target in ("Get JSON vs bare", "Set fsync=always vs fsync=no", "memory per key", "restart"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {target}"))
        assert "**met**" in row or "**MISSED**" in row or "not measured" in row


def test_memory_and_recovery_figures(smoke: tuple[Path, str]) -> None:
    _, text = smoke
    per_key = re.search(r"kvservice RSS growth per key\*\* \| \*\*([\d,]+) B", text)
    assert per_key is not None
    assert int(per_key.group(1).replace(",", "")) > 0
    assert re.search(r"\| kvservice: snapshot of 10,000 keys \+ 1,000-record WAL tail", text)


def test_missing_peers_are_named_not_hidden(smoke: tuple[Path, str]) -> None:
    _, text = smoke
    for peer, label in (("redis-server", "redis GET"), ("etcd", "etcd put")):
        measured = f"| {label}" in text
        assert measured or f"{peer}" in text.split("**Skipped:**", 1)[-1]


def test_python_load_generator_drives_a_server(tmp_path: Path) -> None:
    """bench.pyload, the fallback without wrk, counts replies and the server's CPU."""
    server = start_uvicorn_app(tmp_path, "bare-asgi", "bench.apps.bare_asgi:app")
    try:
        body = tmp_path / "body"
        body.write_bytes(b"{}")
        load = HttpLoad(server.url("/"), body, "application/json", connections=4, seconds=1)
        result = run_http(load, server.pid, "python")
    finally:
        server.stop()
    assert result.requests > 100
    assert result.errors == 0
    assert result.server_cpu > 0


@pytest.fixture(scope="module")
def datamodel_smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench-datamodel")
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--only", "datamodel", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out, (out / "datamodel-smoke.md").read_text()


@pytest.mark.timeout(200)
def test_datamodel_smoke_writes_its_own_file_with_every_part(
    datamodel_smoke: tuple[Path, str],
) -> None:
    """`--only datamodel` writes datamodel-smoke.md alone, with the three parts of issue 10."""
    out, text = datamodel_smoke
    assert sorted(p.name for p in out.iterdir()) == ["datamodel-smoke.md"]
    for part in ("## 1. Memory per key with a TTL", "## 2. Compression", "## 3. Request cost"):
        assert part in text
    target = next(line for line in text.splitlines() if line.startswith("Target: a key with"))
    assert "**met**" in target or "**MISSED**" in target


@pytest.mark.timeout(200)
def test_datamodel_smoke_measures_every_case(datamodel_smoke: tuple[Path, str]) -> None:
    """Every memory variant and every request case has a positive figure."""
    _, text = datamodel_smoke
    for label in ("no TTL", "TTL, expiries over 1 h", "TTL, expiries over 24 h"):
        assert re.search(rf"^\| kvservice RSS growth, {re.escape(label)} \| [\d,.]+ \|", text, re.M)
    for label in ("compression none", "zstd, min 512 B (default)"):
        assert re.search(rf"^\| kvservice, {re.escape(label)} \| \*\*[\d,]+\*\* \|", text, re.M)
    cases = (
        "Set, compression none", "Set, compression zstd", "Get, compression none",
        "Get, compression zstd", "Increment, JSON", "Increment, proto",
        "Txn, 1 condition + Set + Increment, proto", "Txn, 10 Sets of 100 B, JSON",
    )  # fmt: skip
    for label in cases:
        row = re.search(rf"^\| {re.escape(label)} \| ([\d,]+) \(", text, re.M)
        assert row is not None, f"no row for {label}"
        assert int(row.group(1).replace(",", "")) > 0
    assert "requests failed" not in text
