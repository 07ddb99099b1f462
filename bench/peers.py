"""The peers kvservice is compared with: etcd (single node, v3 JSON gateway) and
redis-server, each one process on free 127.0.0.1 ports with a temporary data dir.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from bench.procs import BenchError, Child, free_port, http_ok
from bench.servers import Server, await_ready


def etcd_argv(data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    return [
        "etcd",
        "--name",
        "bench",
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        f"bench={peer}",
        "--log-level",
        "warn",
    ]


def start_etcd(work: Path) -> Server:
    """A single-node etcd whose data dir lives under `work`."""
    port, peer_port = free_port(), free_port()
    argv = etcd_argv(work / "etcd-data", port, peer_port)
    child = Child("etcd", argv, work / "etcd.log").start()
    server = Server("etcd", child, port)
    return await_ready(server, "/health 200", lambda: http_ok(server.url("/health")))


def redis_argv(data_dir: Path, port: int) -> list[str]:
    # No persistence while benchmarking: `SAVE` is called explicitly when an RDB is wanted.
    return [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--dbfilename",
        "dump.rdb",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
        "--logfile",
        "",
    ]


def start_redis(work: Path, name: str = "redis", data_dir: Path | None = None) -> Server:
    """Start redis-server (loading data_dir/dump.rdb if present) and wait for PONG."""
    data_dir = data_dir or work / f"{name}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    child = Child(name, redis_argv(data_dir, port), work / f"{name}.log").start()
    server = Server(name, child, port)
    return await_ready(server, "PING -> PONG", lambda: redis_pong(port), poll=0.005)


def redis_cli(port: int, *args: str, timeout: float = 60) -> str:
    """Run one redis-cli command and return its raw reply."""
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"redis-cli {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def redis_pong(port: int) -> bool:
    """True once redis answers PING; while loading an RDB it answers -LOADING instead.

    A raw socket rather than redis-cli: polling every few ms must not cost a fork.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_info(port: int, section: str) -> dict[str, str]:
    info = {}
    for line in redis_cli(port, "INFO", section).splitlines():
        name, sep, value = line.partition(":")
        if sep:
            info[name] = value.strip()
    return info


def installed(command: str) -> bool:
    return shutil.which(command) is not None
