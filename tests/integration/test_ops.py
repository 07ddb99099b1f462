"""Operating a real node: health, readiness, metrics, logs, configuration and its refusals."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from prometheus_client.parser import text_string_to_metric_families

from kvservice.health.v1.health_connect import HealthClientSync
from kvservice.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from kvservice.v1.kv_pb2 import DeleteRequest, GetRequest, SetRequest
from tests.integration.conftest import ServerProcess, free_port, run_cli

pytestmark = pytest.mark.integration

KV = "/kvservice.v1.KVStore"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers ------------------------------------------------------------------------------


def scrape(server: ServerProcess) -> Samples:
    """Every sample on /metrics, keyed by (name, labels)."""
    reply = httpx.get(f"{server.url}/metrics", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def post(server: ServerProcess, method: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{server.url}{KV}/{method}", json=body, timeout=10)


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line parsed as a JSON object (fails on the first that is not)."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def config_show(*args: str, env: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """`kvservice config show` parsed into {setting: (value, source)}."""
    done = run_cli("config", "show", *args, env=env)
    assert done.returncode == 0, done.stderr
    shown = {}
    for line in done.stdout.splitlines():
        match = re.fullmatch(r"(\w+) = (.*)  \((.+)\)", line)
        assert match, line
        shown[match[1]] = (match[2], match[3])
    return shown


# -- health ---------------------------------------------------------------------------------


def test_healthz_is_200(server: ServerProcess) -> None:
    """/healthz answers 200 while the process is alive, naming the process."""
    reply = httpx.get(f"{server.url}/healthz", timeout=5)
    assert server.proc is not None
    assert (reply.status_code, reply.json()) == (200, {"status": "ok", "pid": server.proc.pid})


def test_readyz_is_200_with_json(server: ServerProcess) -> None:
    """/readyz answers 200 with a JSON body carrying the current revision."""
    reply = httpx.get(f"{server.url}/readyz", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"ready": True, "role": "primary", "revision": "0"}
    post(server, "Set", {"key": "k", "value": ""}).raise_for_status()
    assert httpx.get(f"{server.url}/readyz", timeout=5).json() == {
        "ready": True,
        "role": "primary",
        "revision": "1",
    }


@pytest.mark.parametrize("proto_json", [True, False], ids=["json", "proto"])
def test_grpc_health_check(server: ServerProcess, proto_json: bool) -> None:
    """Health/Check says SERVING for the server and KVStore, and NOT_FOUND for anything else."""
    with HealthClientSync(server.url, proto_json=proto_json, timeout_ms=10_000) as health:
        for service in ("", "kvservice.v1.KVStore"):
            reply = health.check(HealthCheckRequest(service=service))
            assert reply.status == HealthCheckResponse.SERVING
        with pytest.raises(ConnectError) as caught:
            health.check(HealthCheckRequest(service="kvservice.v1.Nothing"))
        assert caught.value.code == Code.NOT_FOUND
        assert "kvservice.v1.Nothing" in caught.value.message


# -- metrics --------------------------------------------------------------------------------


def test_request_counters_increase_as_requests_arrive(server: ServerProcess) -> None:
    """kvservice_rpc_requests_total counts each RPC once under its method and code."""
    before = scrape(server)
    with server.client(proto_json=False) as kv:
        for i in range(3):
            kv.set(SetRequest(key=f"k{i}", value=b"v"))
        kv.get(GetRequest(key="k0"))
        kv.get(GetRequest(key="missing"))
        kv.delete(DeleteRequest(key="k1"))
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "kvservice_rpc_requests_total"
    assert delta(requests, method="Set", code="ok") == 3
    assert delta(requests, method="Get", code="ok") == 2
    assert delta(requests, method="Delete", code="ok") == 1
    assert delta("kvservice_rpc_duration_seconds_count", method="Set") == 3
    assert delta("kvservice_rpc_duration_seconds_count", method="Get") == 2
    assert delta("kvservice_rpc_duration_seconds_sum", method="Set") > 0
    assert value(after, "kvservice_rpc_duration_seconds_bucket", method="Set", le="+Inf") == 3
    # Scraping /metrics, /healthz or /readyz is not an RPC.
    httpx.get(f"{server.url}/healthz", timeout=5)
    again = scrape(server)
    rpc_total = sum(v for (n, _), v in again.items() if n == requests)
    assert rpc_total == sum(v for (n, _), v in after.items() if n == requests) == 6


def test_errors_are_counted_under_their_connect_code(make_server) -> None:  # type: ignore[no-untyped-def]
    """Refused RPCs are counted under the Connect code the client received."""
    server: ServerProcess = make_server("--max-value-bytes", "16").start()
    assert post(server, "Get", {"key": ""}).json()["code"] == "invalid_argument"
    assert post(server, "Set", {"key": "k", "value": "A" * 64}).json()["code"] == "invalid_argument"
    big = httpx.post(
        f"{server.url}{KV}/Set",
        content=b'{"key":"k","value":"' + b"A" * 100_000 + b'"}',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert big.json()["code"] == "resource_exhausted"
    via_get = httpx.get(
        f"{server.url}{KV}/Delete", params={"encoding": "json", "message": "{}"}, timeout=5
    )
    assert via_get.json()["code"] == "unimplemented"
    post(server, "Set", {"key": "k", "value": ""}).raise_for_status()

    after = scrape(server)
    requests = "kvservice_rpc_requests_total"
    assert value(after, requests, method="Get", code="invalid_argument") == 1
    assert value(after, requests, method="Set", code="invalid_argument") == 1
    assert value(after, requests, method="Set", code="resource_exhausted") == 1
    assert value(after, requests, method="Delete", code="unimplemented") == 1
    assert value(after, requests, method="Set", code="ok") == 1
    codes = {dict(labels)["code"] for (n, labels) in after if n == requests}
    assert codes == {"ok", "invalid_argument", "resource_exhausted", "unimplemented"}


def test_keys_and_revision_gauges_follow_writes(server: ServerProcess) -> None:
    """kvservice_keys and kvservice_revision track the store as writes arrive."""
    first = scrape(server)
    assert value(first, "kvservice_keys") == 0
    assert value(first, "kvservice_revision") == 0
    assert value(first, "kvservice_writes_accepted") == 1
    with server.client() as kv:
        kv.set(SetRequest(key="a", value=b"1"))
        kv.set(SetRequest(key="b", value=b"2"))
        kv.set(SetRequest(key="a", value=b"3"))
        assert (
            value(scrape(server), "kvservice_keys"),
            value(scrape(server), "kvservice_revision"),
        ) == (2, 3)
        kv.delete(DeleteRequest(key="b"))
        kv.delete(DeleteRequest(key="never"))
    last = scrape(server)
    assert value(last, "kvservice_keys") == 1
    assert value(last, "kvservice_revision") == 4


def test_wal_gauges_follow_writes(server: ServerProcess) -> None:
    """WAL written bytes and size on disk grow with writes; there is at least one segment."""
    before = scrape(server)
    post(server, "Set", {"key": "k", "value": "A" * 4000}).raise_for_status()
    after = scrape(server)
    grew = value(after, "kvservice_wal_written_bytes") - value(
        before, "kvservice_wal_written_bytes"
    )
    assert grew >= 3000
    assert value(after, "kvservice_wal_size_bytes") >= value(after, "kvservice_wal_written_bytes")
    on_disk = sum(p.stat().st_size for p in (server.data_dir / "wal").glob("*.wal"))
    assert value(after, "kvservice_wal_size_bytes") == on_disk
    assert value(after, "kvservice_wal_segments") == len(
        list((server.data_dir / "wal").glob("*.wal"))
    )
    assert value(after, "kvservice_wal_segments") >= 1
    assert value(after, "kvservice_snapshot_age_seconds") >= 0
    assert value(after, "kvservice_snapshot_failures_total") == 0


def test_fsync_and_group_commit_histograms_observe_at_fsync_always(
    server: ServerProcess,
) -> None:
    """At fsync=always every acknowledged write is counted in exactly one group-commit fsync."""
    before = scrape(server)
    with server.client(proto_json=False) as kv:
        for i in range(10):
            kv.set(SetRequest(key=f"seq{i}", value=b"v"))
    sequential = scrape(server)

    def delta(a: Samples, b: Samples, name: str) -> float:
        return value(b, name) - value(a, name)

    fsyncs = delta(before, sequential, "kvservice_wal_fsync_duration_seconds_count")
    # One write at a time: each waits for its own fsync.
    assert fsyncs == 10
    assert delta(before, sequential, "kvservice_wal_fsync_duration_seconds_sum") > 0
    assert delta(before, sequential, "kvservice_wal_group_commit_writes_count") == 10
    assert delta(before, sequential, "kvservice_wal_group_commit_writes_sum") == 10

    # 16 writers at once: batches may hold several writes, but the sum is every write.
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            with server.client(proto_json=False) as kv:
                for i in range(10):
                    kv.set(SetRequest(key=f"w{n}-{i}", value=b"v"))
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    burst = scrape(server)
    assert delta(sequential, burst, "kvservice_wal_group_commit_writes_sum") == 160
    batches = delta(sequential, burst, "kvservice_wal_group_commit_writes_count")
    assert 1 <= batches <= 160
    assert delta(sequential, burst, "kvservice_wal_fsync_duration_seconds_count") == batches


def test_no_fsync_histogram_at_fsync_no(make_server) -> None:  # type: ignore[no-untyped-def]
    """At fsync=no the node never fsyncs while serving, and the histograms stay empty."""
    server: ServerProcess = make_server("--fsync", "no").start()
    for i in range(5):
        post(server, "Set", {"key": f"k{i}", "value": ""}).raise_for_status()
    samples = scrape(server)
    assert value(samples, "kvservice_wal_fsync_duration_seconds_count") == 0
    assert value(samples, "kvservice_wal_group_commit_writes_count") == 0
    assert value(samples, "kvservice_revision") == 5


def test_process_metrics_exist(server: ServerProcess) -> None:
    """The standard process_* metrics are exported."""
    samples = scrape(server)
    names = {name for name, _ in samples}
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert name in names
    assert value(samples, "process_resident_memory_bytes") > 1_000_000
    assert abs(value(samples, "process_start_time_seconds") - time.time()) < 120


# -- logs -----------------------------------------------------------------------------------


def test_log_lines_are_json_with_startup_and_recovery_figures(make_server) -> None:  # type: ignore[no-untyped-def]
    """Every line a node prints is a JSON object with time/level/logger/message; start-up logs
    the settings summary and the recovery figures."""
    first: ServerProcess = make_server().start()
    for key in ("a", "b", "a"):
        post(first, "Set", {"key": key, "value": ""}).raise_for_status()
    assert first.stop() == 0
    second: ServerProcess = make_server(data_dir=first.data_dir).start()
    metrics = scrape(second)
    assert second.stop() == 0

    for server in (first, second):
        entries = json_lines(server.log())
        assert entries
        for entry in entries:
            assert {"time", "level", "logger", "message"} <= entry.keys(), entry
            assert entry["level"] in {"debug", "info", "warning", "error", "critical"}
            stamp = str(entry["time"])
            assert stamp.endswith("Z")
            datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        messages = [e["message"] for e in entries]
        assert "starting" in messages
        assert "recovered" in messages
        assert "shutting down" in messages
        # uvicorn's own lines go through the same formatter.
        assert any(str(e["logger"]).startswith("uvicorn") for e in entries)

    entries = json_lines(second.log())
    starting = next(e for e in entries if e["message"] == "starting")
    assert starting["port"] == str(second.port)
    assert starting["fsync"] == "always"
    assert starting["data_dir"] == str(second.data_dir)
    recovered = next(e for e in entries if e["message"] == "recovered")
    assert recovered["revision"] == 3
    assert recovered["keys"] == 2
    assert recovered["records_replayed"] == 3
    assert recovered["snapshot_revision"] == 0
    assert isinstance(recovered["seconds"], float | int)
    assert value(metrics, "kvservice_recovery_replayed_records") == 3
    assert value(metrics, "kvservice_recovery_duration_seconds") >= 0
    assert value(metrics, "kvservice_revision") == 3


def test_text_log_format_is_for_people(make_server) -> None:  # type: ignore[no-untyped-def]
    """--log-format text prints human lines (not JSON) with level, logger and fields."""
    server: ServerProcess = make_server("--log-format", "text").start()
    assert server.stop() == 0
    lines = server.log().splitlines()
    assert lines
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    starting = next(line for line in lines if "kvservice.cli: starting" in line)
    assert "INFO" in starting
    assert f"port={server.port}" in starting
    assert any("kvservice.cli: recovered" in line and "revision=0" in line for line in lines)


def test_log_level_hides_lower_levels(make_server) -> None:  # type: ignore[no-untyped-def]
    """--log-level warning drops the info lines (start-up summary included)."""
    server: ServerProcess = make_server("--log-level", "warning").start()
    post(server, "Set", {"key": "k", "value": ""}).raise_for_status()
    assert server.stop() == 0
    assert all(e["level"] != "info" for e in json_lines(server.log()))


def test_access_log_one_line_per_request(make_server) -> None:  # type: ignore[no-untyped-def]
    """--access-log logs one line per RPC with its method and Connect code; off by default."""
    server: ServerProcess = make_server("--access-log").start()
    post(server, "Set", {"key": "k", "value": "dg=="}).raise_for_status()
    post(server, "Get", {"key": "k"}).raise_for_status()
    post(server, "Get", {"key": ""})
    post(server, "Delete", {"key": "k"}).raise_for_status()
    assert server.stop() == 0
    access = [e for e in json_lines(server.log()) if e["logger"] == "kvservice.access"]
    assert [(e["method"], e["code"]) for e in access] == [
        ("Set", "ok"),
        ("Get", "ok"),
        ("Get", "invalid_argument"),
        ("Delete", "ok"),
    ]
    assert all(e["http_method"] == "POST" and isinstance(e["ms"], float | int) for e in access)

    quiet: ServerProcess = make_server(data_dir=server.data_dir).start()
    post(quiet, "Get", {"key": "k"}).raise_for_status()
    assert quiet.stop() == 0
    assert not [e for e in json_lines(quiet.log()) if e["logger"] == "kvservice.access"]


# -- configuration --------------------------------------------------------------------------


def test_config_show_defaults(tmp_path: Path) -> None:
    """`config show` prints every setting with its default and says it is the default."""
    shown = config_show()
    assert shown["port"] == ("8080", "default")
    assert shown["host"] == ("127.0.0.1", "default")
    assert shown["fsync"] == ("always", "default")
    assert shown["max_value_bytes"] == ("1048576", "default")
    assert shown["access_log"] == ("False", "default")


def test_config_precedence_flag_env_file_default(tmp_path: Path) -> None:
    """flag > env KVSERVICE_* > YAML file > default, and `config show` names each source."""
    config = tmp_path / "kv.yaml"
    config.write_text("port: 9001\nfsync: everysec\nmax_key_bytes: 100\nlog_level: debug\n")

    shown = config_show("--config", str(config))
    assert shown["port"] == ("9001", f"file {config}")
    assert shown["fsync"] == ("everysec", f"file {config}")
    assert shown["host"] == ("127.0.0.1", "default")

    env = {"KVSERVICE_PORT": "9002", "KVSERVICE_FSYNC": "no"}
    shown = config_show("--config", str(config), env=env)
    assert shown["port"] == ("9002", "env KVSERVICE_PORT")
    assert shown["fsync"] == ("no", "env KVSERVICE_FSYNC")
    assert shown["max_key_bytes"] == ("100", f"file {config}")

    shown = config_show("--config", str(config), "--port", "9003", env=env)
    assert shown["port"] == ("9003", "flag --port")
    assert shown["fsync"] == ("no", "env KVSERVICE_FSYNC")
    assert shown["max_key_bytes"] == ("100", f"file {config}")
    assert shown["log_level"] == ("debug", f"file {config}")
    assert shown["config"] == (str(config), "flag --config")

    # The file can also be named by KVSERVICE_CONFIG.
    shown = config_show(env={"KVSERVICE_CONFIG": str(config)})
    assert shown["port"] == ("9001", f"file {config}")
    assert shown["config"] == (str(config), "env KVSERVICE_CONFIG")


def test_yaml_fsync_no_means_the_mode(tmp_path: Path) -> None:
    """A bare `fsync: no` in YAML (a boolean in YAML 1.1) selects the mode "no"."""
    config = tmp_path / "kv.yaml"
    config.write_text("fsync: no\n")
    assert config_show("--config", str(config))["fsync"] == ("no", f"file {config}")


def test_serve_uses_env_over_file(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A running node applies file settings, overridden by env where both are set."""
    config = tmp_path / "kv.yaml"
    config.write_text("max_key_bytes: 4\nmax_value_bytes: 10\n")
    server: ServerProcess = make_server(
        "--config", str(config), env={"KVSERVICE_MAX_VALUE_BYTES": "20"}
    ).start()
    twenty, twenty_one = base64.b64encode(b"v" * 20).decode(), base64.b64encode(b"v" * 21).decode()
    # max_key_bytes comes from the file: 4 bytes fit, 5 do not.
    assert post(server, "Set", {"key": "abcd", "value": ""}).status_code == 200
    refused = post(server, "Set", {"key": "abcde", "value": ""}).json()
    assert (refused["code"], "max_key_bytes" in refused["message"]) == ("invalid_argument", True)
    # max_value_bytes is 10 in the file but 20 in the environment, which wins.
    assert post(server, "Set", {"key": "k", "value": twenty}).status_code == 200
    refused = post(server, "Set", {"key": "k", "value": twenty_one}).json()
    assert refused["code"] == "invalid_argument"
    assert "the limit is 20 (setting max_value_bytes)" in refused["message"]


REFUSALS: dict[str, tuple[list[str], dict[str, str], str | None, tuple[str, ...]]] = {
    # name: (extra args, env, YAML file text, words the message must contain)
    "wrong type flag": (
        ["--max-value-bytes", "lots"], {}, None, ("max_value_bytes", "lots", "integer"),
    ),
    "wrong type env": (
        [], {"KVSERVICE_ACCESS_LOG": "maybe"}, None,
        ("access_log", "KVSERVICE_ACCESS_LOG", "boolean"),
    ),
    "wrong type file": (
        [], {}, "shutdown_timeout_seconds: soon\n", ("shutdown_timeout_seconds", "soon", "number"),
    ),
    "unknown fsync mode flag": (
        ["--fsync", "sometimes"], {}, None, ("fsync", "always", "everysec"),
    ),
    "unknown fsync mode env": (
        [], {"KVSERVICE_FSYNC": "sometimes"}, None,
        ("fsync", "sometimes", "'always', 'everysec' or 'no'"),
    ),
    "unknown fsync mode file": (
        [], {}, "fsync: sometimes\n", ("fsync", "sometimes", "'always', 'everysec' or 'no'"),
    ),
    "port too high": (["--port", "70000"], {}, None, ("port", "70000", "65535")),
    "port zero in file": ([], {}, "port: 0\n", ("port", "greater than or equal to 1")),
    "port negative env": ([], {"KVSERVICE_PORT": "-1"}, None, ("port", "KVSERVICE_PORT")),
    "unknown key in file": (
        [], {}, "prot: 8080\n", ("unknown setting 'prot'", "known settings", "port", "fsync"),
    ),
    "invalid YAML": ([], {}, "port: [8080\n", ("not valid YAML",)),
    "YAML that is not a mapping": ([], {}, "- port\n- 8080\n", ("mapping",)),
    "unreadable config file": ([], {}, "<directory>", ("cannot read config file",)),
    "missing config file": ([], {}, "<missing>", ("cannot read config file", "No such file")),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSALS))
def test_invalid_settings_refuse_to_start(tmp_path: Path, name: str) -> None:
    """An invalid setting exits 2 before anything starts, naming the setting and what is allowed."""
    args, env, file_text, words = REFUSALS[name]
    data_dir = tmp_path / "data"
    port = free_port()
    config_args: list[str] = []
    if file_text is not None:
        config = tmp_path / "kv.yaml"
        if file_text == "<directory>":
            config.mkdir()
        elif file_text != "<missing>":
            config.write_text(file_text)
        config_args = ["--config", str(config)]
        words = (*words, str(config)) if file_text != "<directory>" else words
    flags = ["--host", "127.0.0.1", "--data-dir", str(data_dir)]
    if "port" not in name:  # a --port flag would override the bad port under test
        flags += ["--port", str(port)]
    done = run_cli("serve", *flags, *config_args, *args, env=env, timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    for word in words:
        assert word in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    # Nothing started: no data dir was created and nothing listens on the port.
    assert not data_dir.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_second_node_on_the_same_data_dir_exits_3(server: ServerProcess, make_server) -> None:  # type: ignore[no-untyped-def]
    """A second node on a data dir in use exits 3 naming the directory; the first keeps serving."""
    post(server, "Set", {"key": "k", "value": "dg=="}).raise_for_status()
    second: ServerProcess = make_server(data_dir=server.data_dir).start(wait=False)
    assert second.wait_exit(30) == 3
    critical = [e for e in json_lines(second.log()) if e["level"] == "critical"]
    assert len(critical) == 1
    assert str(server.data_dir) in str(critical[0]["error"])
    assert "in use" in str(critical[0]["error"])
    got = post(server, "Get", {"key": "k"})
    assert got.json() == {"found": True, "value": "dg==", "revision": "1"}
    assert server.stop() == 0
