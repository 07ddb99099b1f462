"""The Python systems under test, each one process on a free 127.0.0.1 port:
kvservice itself, and the two reference apps served by uvicorn the same way
kvservice serves itself (uvloop + httptools, one worker, no access log).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, Child, free_port, http_ok, tcp_open, wait_until

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0


@dataclass
class Server:
    """A started system: its process and where it listens."""

    system: str
    child: Child
    port: int

    @property
    def pid(self) -> int:
        return self.child.pid

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.child.stop()


def await_ready(server: Server, what: str, ready: Callable[[], bool], poll: float = 0.01) -> Server:
    """Wait until `ready()`; a server that never gets there is stopped, not left behind."""
    try:
        wait_until(what, ready, server.child, START_TIMEOUT, poll)
    except BaseException:
        server.stop()
        raise
    return server


def kvservice_argv(
    port: int, data_dir: Path, fsync: str, launcher: Sequence[str] = ("-m", "kvservice")
) -> list[str]:
    """`python -m kvservice serve ...`; `launcher` replaces `-m kvservice` (bench/gcserve.py)."""
    return [
        sys.executable,
        *launcher,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--fsync",
        fsync,
    ]


def repo_env(repo: Path) -> dict[str, str] | None:
    """Environment that makes `import kvservice` (in the server and in any process it
    spawns) load `repo`'s package; None (inherit) for this checkout."""
    if repo.resolve() == REPO:
        return None
    return {**os.environ, "PYTHONPATH": str(repo.resolve())}


def kvservice_origin(repo: Path) -> Path:
    """Where a server started for `repo` imports kvservice from; refuses a mismatch, so a
    before/after comparison cannot silently run the same code twice."""
    done = subprocess.run(
        [sys.executable, "-c", "import kvservice; print(kvservice.__file__)"],
        cwd=repo, env=repo_env(repo), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"cannot import kvservice from {repo}: {done.stderr[-1000:]}")
    origin = Path(done.stdout.strip()).resolve().parent
    if origin.parent != repo.resolve():
        raise BenchError(f"kvservice for {repo} would be imported from {origin}")
    return origin


def command_argv(server: Server) -> list[str]:
    """`server`'s argv, behind `env PYTHONPATH=...` when it serves another checkout."""
    env = server.child.env or {}
    if "PYTHONPATH" not in env:
        return list(server.child.argv)
    return ["env", f"PYTHONPATH={env['PYTHONPATH']}", *server.child.argv]


def shell_command(server: Server) -> str:
    """How to start `server` by hand: its directory, PYTHONPATH (if set) and argv."""
    child = server.child
    env = child.env or {}
    path = f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} " if "PYTHONPATH" in env else ""
    return f"cd {shlex.quote(str(child.cwd or REPO))} && {path}{shlex.join(child.argv)}"


def start_kvservice(
    work: Path,
    name: str,
    data_dir: Path,
    fsync: str = "always",
    *,
    repo: Path = REPO,
    launcher: Sequence[str] = ("-m", "kvservice"),
    extra: Sequence[str] = (),
) -> Server:
    """Start a node of `repo`'s kvservice and wait until /readyz says it has recovered;
    `extra` flags follow the harness's (e.g. `--compression zstd`)."""
    port = free_port()
    argv = [*kvservice_argv(port, data_dir, fsync, launcher), *extra]
    child = Child(name, argv, work / f"{name}.log", cwd=repo, env=repo_env(repo))
    server = Server(name, child.start(), port)
    return await_ready(server, "/readyz 200", lambda: http_ok(server.url("/readyz")))


def uvicorn_argv(app: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--lifespan",
        "off",
        "--no-access-log",
        "--log-level",
        "warning",
        "--no-server-header",
    ]


def start_uvicorn_app(work: Path, name: str, app: str) -> Server:
    """Serve one of bench/apps with uvicorn and wait until it accepts connections."""
    port = free_port()
    child = Child(name, uvicorn_argv(app, port), work / f"{name}.log", cwd=REPO)
    server = Server(name, child.start(), port)
    return await_ready(server, "listening", lambda: tcp_open(port))
