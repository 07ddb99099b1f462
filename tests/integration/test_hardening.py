"""Requests crafted to hurt a node: gzip bombs, false gzip, made-up method names."""

from __future__ import annotations

import zlib

import httpx

from tests.integration.conftest import ServerProcess

KV = "/kvservice.v1.KVStore"


def test_malformed_gzip_body_is_invalid_argument(server: ServerProcess) -> None:
    """A body that claims gzip but is not gzip is the client's fault: invalid_argument, not 500."""
    reply = httpx.post(
        f"{server.url}{KV}/Set",
        content=b'{"key":"k"}',
        headers={"content-type": "application/json", "content-encoding": "gzip"},
        timeout=10,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == "invalid_argument"


def test_gzip_bomb_is_refused_without_inflating_it(server: ServerProcess) -> None:
    """A 1 MB gzip body that inflates to 1 GiB is refused before the server inflates it all."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join([co.compress(b"\0" * (1 << 20)) for _ in range(1024)] + [co.flush()])
    assert server.proc is not None
    reply = httpx.post(
        f"{server.url}{KV}/Set",
        content=bomb,
        headers={"content-type": "application/proto", "content-encoding": "gzip"},
        timeout=60,
    )
    assert reply.json()["code"] == "resource_exhausted"
    with open(f"/proc/{server.proc.pid}/status") as f:
        status = f.read()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
    assert peak_kib < 300 * 1024, f"server peak RSS {peak_kib // 1024} MiB"


def test_unknown_method_paths_do_not_create_metric_series(server: ServerProcess) -> None:
    """Requests to made-up method names must not add one series each (unbounded cardinality)."""
    for i in range(20):
        httpx.post(f"{server.url}{KV}/Made{i}", json={}, timeout=5)
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'method="Made' not in text


def test_side_effects_never_run_on_http_get(server: ServerProcess) -> None:
    """Only NO_SIDE_EFFECTS methods answer GET: a link cannot write or snapshot."""
    for path in (f"{KV}/Set", f"{KV}/Delete", "/kvservice.v1.Admin/Snapshot"):
        reply = httpx.get(f"{server.url}{path}?encoding=json&message=%7B%7D", timeout=5)
        assert reply.status_code == 405, path
        assert reply.json()["code"] == "unimplemented"
    assert not list((server.data_dir / "snap").glob("*.snap"))
    reply = httpx.get(
        f"{server.url}{KV}/Get?encoding=json&message=%7B%22key%22%3A%22k%22%7D", timeout=5
    )
    assert reply.status_code == 200
