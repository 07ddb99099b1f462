"""Real kvservice server processes on free loopback ports with temporary data dirs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from connectrpc.errors import ConnectError

from kvservice.v1.kv_connect import KVStoreClientSync
from tests.faults.shim import build_shim

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(Exception):
    """The free port chosen for a server was taken before it could bind."""


@dataclass
class ServerProcess:
    """One `kvservice serve` child process; stop it with stop() or kill()."""

    data_dir: Path
    port: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "kvservice", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir), *self.args,
        ]  # fmt: skip

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> ServerProcess:
        for _ in range(3):
            self._spawn()
            if not wait:
                return self
            try:
                self.wait_ready(timeout)
                return self
            except PortTaken:
                self.port = free_port()  # another process took it between probe and bind
        raise AssertionError(f"no free port after 3 tries:\n{self.log()}")

    def _spawn(self) -> None:
        self.log_path = self.data_dir.parent / f"server-{self.port}-{time.monotonic_ns()}.log"
        env = {**os.environ, **self.env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until this process listens and /healthz answers; fail with its log if it dies."""
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "address already in use" in self.log():
                    raise PortTaken
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                reply = httpx.get(f"{self.url}/healthz", timeout=0.5)
                # Our own pid, so a stranger on a recycled port cannot pass for us.
                if reply.status_code == 200 and reply.json().get("pid") == self.proc.pid:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not up after {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def client(self, *, proto_json: bool = True) -> KVStoreClientSync:
        return KVStoreClientSync(self.url, proto_json=proto_json, timeout_ms=10_000)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds.

    A check that raises a connection-level error (a node restarting) counts as
    not yet.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ConnectError, OSError, httpx.HTTPError):
            if check():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `kvservice ARGS...` to completion (the caller checks the exit code)."""
    return subprocess.run(
        [sys.executable, "-m", "kvservice", *args], check=False,
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """Factory: make_server(*args, data_dir=None, env=None) -> unstarted ServerProcess.

    Every process it made is killed at teardown, by PID.
    """
    made: list[ServerProcess] = []

    def factory(*args: str, data_dir: Path | None = None, env: dict[str, str] | None = None,
                port: int | None = None) -> ServerProcess:  # fmt: skip
        server = ServerProcess(
            data_dir=data_dir or tmp_path / "data", port=port or free_port(),
            args=list(args), env=env or {},
        )  # fmt: skip
        made.append(server)
        return server

    yield factory
    for server in made:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


@pytest.fixture(scope="session")
def fault_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LD_PRELOAD shim of tests/faults/shim.c, compiled once per session."""
    return build_shim(tmp_path_factory.mktemp("shim"))


@pytest.fixture
def server(make_server) -> ServerProcess:  # type: ignore[no-untyped-def]
    """A started node with fsync=always in a fresh data dir."""
    return make_server().start()
