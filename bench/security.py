"""Get and Set throughput with security on, each against the plain node in the same run.

    python -m bench.security [--seconds 3] [--rounds 3] [--connections 64]
    python -m bench.security --base-repo ../main   # before/after: main's nodes in the same rounds
    python -m bench.security --micro     # the whole ASGI app in process, per Get
    python -m bench.security --callgrind [--base-repo ../main]   # instructions per request

Five nodes run side by side (plain, static tokens, JWT, rate limiting with a
limit never reached, TLS); every round runs each case once, alternating, and
the table shows medians and the ratio to the plain node of the same round
set. wrk sends the credential in an Authorization header. Sets run at
fsync=no so the figure is the CPU cost of security, not of the disk. With
--base-repo, another checkout's plain, tokens, JWT and rate-limit nodes
(`<case>@base`) run in the same rounds, each compared with `plain@base`: a
before/after comparison that shares the machine's state minute by minute.
--callgrind counts the instructions each server executes per request instead
(valgrind, one keep-alive client sending requests one at a time): slow, but
other work on the machine does not change the count.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import http.client
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml

from bench import dataset
from bench.load import HttpLoad, run_http
from bench.procs import Child, free_port, http_ok, tcp_open
from bench.servers import REPO, Server, await_ready, kvservice_origin, repo_env
from kvservice.app import create_app
from kvservice.config import load
from kvservice.metrics import Metrics
from kvservice.server import build_node, build_replication
from kvservice.storage.recovery import recover
from tests.securitykit import Pki

JSON = "application/json"
KV = "/kvservice.v1.KVStore/"
TOKEN = "bench-token-0123456789"
SECRET = b"bench-secret-0123456789abcdef0123456789"


@dataclass
class Node:
    name: str
    server: Server
    scheme: str
    token: str | None

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.port}{path}"


def start(
    work: Path,
    name: str,
    extra: list[str],
    token: str | None,
    *,
    tls: bool,
    repo: Path = REPO,
    launcher: tuple[str, ...] = (),
) -> Node:
    port = free_port()
    argv = [
        *launcher, sys.executable, "-m", "kvservice", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--data-dir", str(work / name), "--fsync", "no",
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    child = Child(name, argv, work / f"{name}.log", cwd=repo, env=repo_env(repo))
    server = Server(name, child.start(), port)
    if tls:
        await_ready(server, "listening", lambda: tcp_open(port))
    else:
        await_ready(server, "/readyz 200", lambda: http_ok(server.url("/readyz")))
    return Node(name, server, "https" if tls else "http", token)


def nodes(work: Path, base_repo: Path | None = None, launcher: tuple[str, ...] = ()) -> list[Node]:
    tokens = work / "tokens.yaml"
    entries = [
        {"name": f"client-{i}", "sha256": hashlib.sha256(f"other-{i}".encode()).hexdigest(),
         "roles": ["read", "write"]}
        for i in range(9)
    ]  # fmt: skip
    entries.append(
        {"name": "bench", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
         "roles": ["read", "write"], "prefixes": ["user:"]}
    )  # fmt: skip
    tokens.write_text(yaml.safe_dump({"tokens": entries}))
    secret = work / "jwt.secret"
    secret.write_bytes(SECRET)
    sub = dataset.HOT_KEY.split(":")[1]  # the hot key is user:<sub>:session
    claims = {"sub": sub, "aud": "kvservice", "exp": int(time.time()) + 3600}
    jwt_token = jwt.encode(claims, SECRET, algorithm="HS256")
    (work / "pki").mkdir()
    pki = Pki.make(work / "pki")
    cert, key = pki.issue("server", server=True)
    auth = ["--auth", "token"]
    tokens_flags = [*auth, "--tokens-file", str(tokens)]
    jwt_flags = [*auth, "--jwt-hs256-secret-file", str(secret), "--jwt-audience", "kvservice"]
    limit_flags = ["--rate-limit-rps", "1000000", "--rate-limit-burst", "1000000"]
    here = functools.partial(start, work, launcher=launcher)
    base = []
    if base_repo is not None:
        there = functools.partial(start, work, repo=base_repo, launcher=launcher)
        base = [
            there("plain@base", [], None, tls=False),
            there("tokens@base", tokens_flags, TOKEN, tls=False),
            there("jwt@base", jwt_flags, jwt_token, tls=False),
            there("ratelimit@base", limit_flags, None, tls=False),
        ]
    return [
        here("plain", [], None, tls=False),
        # A second plain node: its ratio to the first is the noise floor of the run.
        here("plain-again", [], None, tls=False),
        # A plain node loaded with the same Authorization header as the auth cases
        # (ignored: auth is off): what the header costs wrk's script and the HTTP
        # parser, so that auth's own cost is the ratio to this one.
        here("plain-header", [], TOKEN, tls=False),
        here("tokens", tokens_flags, TOKEN, tls=False),
        here("jwt", jwt_flags, jwt_token, tls=False),
        here("ratelimit", limit_flags, None, tls=False),
        here("tls", ["--tls-cert-file", str(cert), "--tls-key-file", str(key)], None, tls=True),
        *base,
    ]


def run_case(
    node: Node, op: str, work: Path, seconds: int, connections: int
) -> tuple[float, float, float]:
    body = work / f"{op}.body"
    body.write_bytes(dataset.kv_body(op, "json"))
    headers = (("Authorization", f"Bearer {node.token}"),) if node.token else ()
    http_load = HttpLoad(node.url(KV + op), body, JSON, connections, seconds, headers)
    result = run_http(http_load, node.server.pid, "wrk")
    if result.errors:
        raise SystemExit(f"{node.name} {op}: {result.errors} non-2xx replies: check setup")
    # Server CPU per request is steadier than req/s when other work shares the cores.
    return result.rps, result.server_cpu / result.rps * 1e6, result.other_cpu


def instructions(node: Node, op: str, work: Path, n: int) -> float:
    """Instructions `node`'s server (run under callgrind, collection off) executes per
    request over `n` sequential requests on one keep-alive connection."""
    body = dataset.kv_body(op, "json")
    headers = {"Content-Type": JSON}
    if node.token:
        headers["Authorization"] = f"Bearer {node.token}"
    port = node.server.port
    conn = (
        http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=60, context=ssl._create_unverified_context()
        )
        if node.scheme == "https"
        else http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    )

    def send(count: int) -> None:
        for _ in range(count):
            conn.request("POST", KV + op, body, headers)
            reply = conn.getresponse()
            reply.read()
            if reply.status != 200:
                raise SystemExit(f"{node.name} {op}: HTTP {reply.status}: check setup")

    pid = str(node.server.pid)
    send(200)  # warm-up: lazy imports, caches, the hot key
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    send(n)
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
    # A dump also zeroes the counters, so each dump holds one op's requests only.
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    conn.close()
    dumps = sorted(work.glob(f"callgrind.{pid}.*"), key=lambda p: int(p.suffix[1:]))
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1]) / n
    raise SystemExit(f"{dumps[-1]} has no totals")


def callgrind(args: argparse.Namespace) -> None:
    """Instructions per Get and Set for each case (and each @base case)."""
    with tempfile.TemporaryDirectory(prefix="bench-security-cg-") as tmp:
        work = Path(tmp)
        launcher = (
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={work}/callgrind.%p",
        )  # fmt: skip
        running = nodes(work, args.base_repo, launcher)
        counts: dict[tuple[str, str], float] = {}
        try:
            for node in running:
                for op in ("Get", "Set"):
                    counts[(node.name, op)] = instructions(node, op, work, args.callgrind)
        finally:
            for node in running:
                node.server.stop()
    print(f"Instructions per request (callgrind, {args.callgrind} sequential requests each)\n")
    print("| case | Get instr/req | x plain | Set instr/req | x plain |")
    print("|---|---|---|---|---|")
    for node in running:
        cells = [node.name]
        plain = "plain@base" if node.name.endswith("@base") else "plain"
        for op in ("Get", "Set"):
            count, base = counts[(node.name, op)], counts[(plain, op)]
            cells += [f"{count:,.0f}", f"{base / count:.3f}"]  # plain / case: relative speed
        print("| " + " | ".join(cells) + " |")
    if args.base_repo is not None:
        print(f"\n@base: {args.base_repo.resolve()}, each compared with plain@base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--base-repo", type=Path, default=None,
        help="another checkout whose plain/tokens/jwt/ratelimit nodes run in the same rounds",
    )  # fmt: skip
    parser.add_argument(
        "--callgrind", type=int, default=0, metavar="N",
        help="count instructions per request over N requests per case instead (valgrind)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.base_repo is not None:
        kvservice_origin(args.base_repo)  # refuses a checkout that would import this one's code
    if args.callgrind:
        callgrind(args)
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-security-") as tmp:
        work = Path(tmp)
        running = nodes(work, args.base_repo)
        try:
            for node in running:  # the hot key exists for Get; one request warms each node
                run_case(node, "Set", work, 1, 4)
            results: dict[tuple[str, str], list[float]] = {}
            cpu_us: dict[tuple[str, str], list[float]] = {}
            others: list[float] = []
            for _ in range(args.rounds):
                for op in ("Get", "Set"):
                    for node in running:
                        rps, us, other = run_case(node, op, work, args.seconds, args.connections)
                        results.setdefault((node.name, op), []).append(rps)
                        cpu_us.setdefault((node.name, op), []).append(us)
                        others.append(other)
        finally:
            for node in running:
                node.server.stop()
    print("| case | Get req/s | x plain | Get CPU µs/req | x plain |"
          " Set req/s | x plain | Set CPU µs/req | x plain |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    med = {k: statistics.median(v) for k, v in results.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_us.items()}
    for node in running:
        cells = [node.name]
        plain = "plain@base" if node.name.endswith("@base") else "plain"
        for op in ("Get", "Set"):
            rps, us = med[(node.name, op)], cpu[(node.name, op)]
            base_rps, base_us = med[(plain, op)], cpu[(plain, op)]
            # For CPU the ratio is plain / case, so that both read "x plain speed".
            cells += [f"{rps:,.0f}", f"{rps / base_rps:.2f}", f"{us:.0f}", f"{base_us / us:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nother CPU (cores, median over all runs): {statistics.median(others):.2f}")
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load_after}")
    if args.base_repo is not None:
        print(f"@base: {args.base_repo.resolve()}, each compared with plain@base")


async def _app_loop(app: Any, headers: list[tuple[bytes, bytes]], body: bytes, n: int) -> float:
    """Best time per Get of `app` called directly as ASGI (lifespan run around it)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": KV + "Get", "raw_path": (KV + "Get").encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80), "headers": headers, "state": {},
    }  # fmt: skip
    statuses: set[int] = set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    life = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await outbox.get()
    best = float("inf")
    for _ in range(10):  # short windows: the best one is least disturbed by other work
        started = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        best = min(best, (time.perf_counter() - started) / n)
    await inbox.put({"type": "lifespan.shutdown"})
    await outbox.get()
    await life
    if statuses != {200}:
        raise SystemExit(f"unexpected statuses {statuses}")
    return best * 1e6


def micro(n: int = 2_000) -> None:
    """The whole ASGI app in process (no HTTP parsing, no network): Get cost per case."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokens = work / "t.yaml"
        entries = [
            {"name": f"c{i}", "sha256": hashlib.sha256(f"t{i}".encode()).hexdigest(),
             "roles": ["read", "write"], "prefixes": ["user:"]}
            for i in range(10)
        ]  # fmt: skip
        tokens.write_text(yaml.safe_dump({"tokens": entries}))
        secret = work / "s"
        secret.write_bytes(SECRET)
        sub = dataset.HOT_KEY.split(":")[1]
        jwt_token = jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, "HS256")
        cases: dict[str, tuple[dict[str, Any], str | None]] = {
            "plain": ({}, None),
            "tokens": ({"auth": "token", "tokens_file": str(tokens)}, "t9"),
            "jwt": ({"auth": "token", "jwt_hs256_secret_file": str(secret)}, jwt_token),
            "ratelimit": ({"rate_limit_rps": 1e9, "rate_limit_burst": 1_000_000_000}, None),
        }
        body = dataset.kv_body("Get", "json")
        best: dict[str, float] = {}
        for round_ in range(5):
            for name, (flags, token) in cases.items():
                data_dir = work / f"{name}-{round_}"
                settings = load({"data_dir": str(data_dir), "fsync": "no", **flags})
                metrics = Metrics()
                node = build_node(settings, recover(data_dir), metrics)
                app = create_app(
                    node, settings, metrics, build_replication(settings, node, metrics)
                )
                headers = [(b"content-type", JSON.encode()), (b"host", b"x")]
                if token:
                    headers.append((b"authorization", f"Bearer {token}".encode()))
                us = asyncio.run(_app_loop(app, headers, body, n))
                best[name] = min(best.get(name, us), us)
    print("| case | app µs per Get (in process) | added µs |")
    print("|---|---|---|")
    for name, us in best.items():
        print(f"| {name} | {us:.1f} | {us - best['plain']:+.1f} |")


if __name__ == "__main__":
    if "--micro" in sys.argv:
        micro()
    else:
        main()
