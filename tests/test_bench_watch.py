"""bench/watch.py runs end to end with tiny counts (20 streams), so it never rots."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("wrk")), reason="needs redis-server, wrk"
)
def test_watch_bench_smoke_writes_both_systems_at_both_rates(tmp_path: Path) -> None:
    out = tmp_path / "watch.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.watch", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| kvservice |")]
    assert len(rows) == 2
    assert sum(line.startswith("| redis |") for line in out.read_text().splitlines()) == 2
    assert "Stream errors: none." in out.read_text()
