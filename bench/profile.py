"""Optional: where a server spends its CPU under load, sampled with py-spy.

Only with `--profile` and when py-spy is installed (`pip install py-spy` into
the venv); the harness never needs it. The profile is taken in an extra run
after the measured rounds, so sampling never touches a reported figure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.load import LoadResult

# py-spy's raw format: "frame;frame;...;frame COUNT", a frame being "func (file:line)".
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class Profile:
    case: str
    samples: int
    top_self: list[tuple[str, float]]  # (function, share of samples)
    top_total: list[tuple[str, float]]  # kvservice/connectrpc frames, inclusive share


# Frames on every stack of a kvservice server (start-up code): they say nothing.
ENTRY_FRAMES = ("kvservice/__main__.py", "kvservice/cli.py", "kvservice/server.py")
# Cases worth a profile: the two sides of each throughput target.
PROFILED = ("kv-get-json", "connect-get-json", "kv-set-json-always", "kv-set-json-no")


def py_spy() -> str | None:
    """py-spy on PATH or beside this interpreter (a venv install), else None."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def record(pid: int, seconds: int, out: Path, load: Callable[[], LoadResult]) -> LoadResult:
    """Sample `pid` for `seconds` while `load()` runs; return the load's result."""
    spy = py_spy()
    assert spy is not None
    argv = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        "250",
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
    ]
    sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result: list[LoadResult] = []
    worker = threading.Thread(target=lambda: result.append(load()))
    worker.start()
    worker.join()
    sampler.wait(timeout=seconds + 30)
    return result[0]


def _name(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    path = path.replace("/work/main/", "")
    return f"{match['func']} ({path})"


def summarize(case: str, raw: Path, top: int = 12) -> Profile:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";")]
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            ours = "kvservice/" in frame or "connectrpc/" in frame
            if ours and not any(entry in frame for entry in ENTRY_FRAMES):
                total_counts[frame] += count
    share = 1 / samples if samples else 0.0
    return Profile(
        case,
        samples,
        [(f, c * share) for f, c in self_counts.most_common(top)],
        [(f, c * share) for f, c in total_counts.most_common(top)],
    )
