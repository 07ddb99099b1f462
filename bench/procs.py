"""Child processes of the harness: start, watch (CPU, RSS) and stop them by PID.

CPU comes from /proc/PID/stat (utime + stime of every thread) for servers that
keep running, and from wait4() rusage for load generators that exit, so both
sides of a run are measured the same way and without extra tools.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """A step of the benchmark could not run; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process, all threads, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat; idle and iowait excluded).

    Busy time minus the server's and the generator's is what everything else on
    the machine took during a run: the noise a reader should know about.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of a running process (VmRSS)."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """Highest resident set size the process reached (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU of the children a process has waited for (cutime + cstime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[13]) + int(fields[14])) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """PIDs of the children of every thread of `pid`, and theirs, recursively.

    Read from /proc/PID/task/*/children, so a process forked by any thread (os.fork,
    subprocess, multiprocessing) is found; one that exits meanwhile is skipped.
    """
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for child in children.read_text().split():
                    if int(child) not in found:
                        found.append(int(child))
                        pending.append(int(child))
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size (/proc/PID/smaps_rollup): shared pages split among sharers."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/{pid}/smaps_rollup has no Pss")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, same owner); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def process_name(pid: int) -> str:
    """The command line of a process, shortened, or '?' once it is gone."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in argv if a)
    return text[:120] or "?"


def _status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {name}")


@dataclass
class Child:
    """One long-running child process (a server) whose output goes to a log file."""

    name: str
    argv: list[str]
    log_path: Path
    cwd: Path | None = None
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started_at: float = 0.0

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=self.env,
            )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} was never started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited early; its log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; only ever this child's own PID."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def wait_until(
    what: str, ready: Callable[[], bool], child: Child, timeout: float, poll: float = 0.01
) -> float:
    """Poll `ready()` until true; return seconds since the child started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.check_alive()
        if ready():
            return time.monotonic() - child.started_at
        time.sleep(poll)
    raise BenchError(f"{child.name}: {what} not reached after {timeout:.0f}s:\n{child.log_tail()}")


def http_ok(url: str) -> bool:
    """True when GET url answers 200 (any error or other status is False)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def http_post(url: str, body: bytes, content_type: str, timeout: float = 10) -> bytes:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return bytes(reply.read())


def tcp_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@dataclass(frozen=True)
class Finished:
    """A short-lived tool run to completion: its output and the CPU it used."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    cpu_seconds: float


def run_measured(argv: Sequence[str], timeout: float, stdin_path: Path | None = None) -> Finished:
    """Run a tool to completion and take its CPU time from wait4() rusage.

    Output goes to temporary files (not pipes) so that waiting with wait4()
    cannot deadlock on a full pipe.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
        started = time.monotonic()
        try:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=stdin)
        finally:
            if stdin_path:
                stdin.close()  # type: ignore[union-attr]
        status, usage = _wait4(proc, timeout)
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return Finished(
            argv=list(argv),
            returncode=os.waitstatus_to_exitcode(status),
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            wall_seconds=wall,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
        )


def _wait4(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, resource.struct_rusage]:
    """wait4() with a deadline: past it the tool is killed (every loop is bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits again
            return status, usage
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            raise BenchError(f"{proc.args!r} ran past {timeout:.0f}s and was killed")
        time.sleep(0.02)
