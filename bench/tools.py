"""The outside tools the harness drives: install the missing ones with apt-get,
and record versions and the machine so a results file says what produced it."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger("bench.tools")

# command -> Debian package that ships it
PACKAGES = {
    "wrk": "wrk",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "redis-benchmark": "redis-tools",
    "etcd": "etcd-server",
}
PYTHON_PACKAGES = ("connect-python", "protobuf", "uvicorn", "uvloop", "httptools", "starlette")


def missing(commands: list[str] | None = None) -> list[str]:
    return [c for c in commands or list(PACKAGES) if shutil.which(c) is None]


def install_missing(commands: list[str] | None = None) -> list[str]:
    """apt-get install the packages of missing `commands` (default: all the harness
    knows); return what is still missing of them.

    Needs root and apt-get; without them (or if the install fails) the caller
    skips the peers and says so in the results.
    """
    packages = sorted({PACKAGES[c] for c in missing(commands)})
    if not packages:
        return []
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        log.warning("cannot install %s: needs root and apt-get", " ".join(packages))
        return missing(commands)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log.info("installing %s with apt-get", " ".join(packages))
    steps = [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ]
    for argv in steps:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode != 0:
            log.warning("%s failed: %s", " ".join(argv), done.stderr.strip()[-500:])
            break
    return missing(commands)


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"


def versions(repo: Path) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PYTHON_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["kvservice commit"] = _first_line(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]
    )
    commands = {
        "wrk": ["wrk", "--version"],
        "redis-server": ["redis-server", "--version"],
        "redis-benchmark": ["redis-benchmark", "--version"],
        "etcd": ["etcd", "--version"],
    }
    for name, argv in commands.items():
        found[name] = _first_line(argv) if shutil.which(argv[0]) else "not installed"
    return found


@dataclass(frozen=True)
class Machine:
    cores: int
    memory_gib: float
    cpu_model: str
    kernel: str
    filesystem: str  # of the temp dir holding the data dirs: fsync cost depends on it


def machine(work: Path) -> Machine:
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_kib = int(meminfo[meminfo.index("MemTotal:") + 1])
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return Machine(
        len(os.sched_getaffinity(0)), mem_kib / 2**20, model, platform.release(), filesystem(work)
    )


def filesystem(path: Path) -> str:
    """Type of the file system holding `path`: the mount with the longest matching prefix."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind
