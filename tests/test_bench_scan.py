"""The Scan benchmarks (bench/scanindex.py, bench/scan.py) run end to end with tiny counts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_index_micro_bench_reports_every_part() -> None:
    found = run_bench(
        "bench.scanindex", "--keys", "3000", "--ops", "300", "--rounds", "3", "--base-ref", "HEAD"
    )
    applied = found["apply µs CPU (median of rounds)"]
    assert isinstance(applied, dict)
    sides, kinds = ("base", "unbuilt", "built"), ("create", "overwrite")
    assert set(applied) == {f"{side} {kind}" for side in sides for kind in kinds}
    assert {"candidates", "page", "index bytes per key"} <= set(found)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_server_bench_runs_every_case() -> None:
    # This checkout against itself: the harness is what is under test here.
    found = run_bench(
        "bench.scan", "--base-repo", str(REPO), "--keys", "3000", "--wal-records", "100",
        "--rounds", "1", "--restarts", "1", "--seconds", "1",
    )  # fmt: skip
    load = found["load"]
    assert isinstance(load, dict)
    assert len(load) == 9
    assert all(case["req/s median"] > 0 for case in load.values())
    assert set(found["memory bytes per key"]) == {"base", "index", "index, built"}  # type: ignore[arg-type]
