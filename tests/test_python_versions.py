"""Snapshots never fork the threaded server: on Python 3.11 and 3.13 a snapshot
raises no warning (warnings are errors here, in the writer process too) and
writes the same data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY313 = REPO / ".venv-py3.13" / "bin" / "python"

SCENARIO = """
import asyncio, hashlib, sys
from pathlib import Path
from kvservice.storage.segments import list_snapshots
from kvservice.storage.snapshot import load_snapshot
from tests.nodes import open_node

async def main(data_dir):
    node = open_node(data_dir, fsync="always", wal_segment_bytes=65536)
    node.start()
    for i in range(3000):
        await node.set(f"user:{i % 700}:session", f"{i}".encode() * 5)
    info = await node.snapshot()
    await node.close()
    return info.revision

revision = asyncio.run(main(Path(sys.argv[1])))
snap = load_snapshot(list_snapshots(Path(sys.argv[1]) / "snap")[0][1])
assert snap.revision == revision == 3000, (snap.revision, revision)
digest = hashlib.sha256(repr(sorted(snap.data.items())).encode()).hexdigest()
print(sys.version_info[:2], revision, len(snap.data), digest)
"""


def _interpreters() -> list[str]:
    found = [sys.executable]
    if PY313.exists():
        found.append(str(PY313))
    elif os.environ.get("CI") == "true":
        # `make test` builds it wherever pyenv's 3.13 exists, as on every machine here.
        pytest.fail(f"{PY313} is missing: run `make setup` (needs pyenv's Python 3.13)")
    return found


def test_snapshot_warns_on_no_python_and_writes_the_same_data(tmp_path: Path) -> None:
    results = []
    for python in _interpreters():
        data_dir = tmp_path / Path(python).parent.parent.name
        run = subprocess.run(
            [python, "-W", "error", "-c", SCENARIO, str(data_dir)],
            capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )  # fmt: skip
        assert run.returncode == 0, f"{python}:\n{run.stdout}\n{run.stderr}"
        assert "Warning" not in run.stderr, run.stderr
        version, data = run.stdout.split(")", 1)
        results.append((version + ")", data.strip()))
    assert len({data for _, data in results}) == 1, results  # same revision, keys, digest
