"""`buf curl` against a running node: the walkthrough an operator follows works as written."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.conftest import REPO, ServerProcess

pytestmark = pytest.mark.integration

BUF = REPO / "node_modules" / ".bin" / "buf"


def buf_curl(url: str, data: str) -> subprocess.CompletedProcess[str]:
    """`buf curl` with the schema from proto/ (no reflection), Connect over HTTP/1.1, plain http."""
    assert BUF.exists(), f"{BUF} is missing: run `make setup` (npm install)"
    return subprocess.run(
        [str(BUF), "curl", "--schema", "proto", "--protocol", "connect", "--data", data, url],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_buf_curl_set_then_get(server: ServerProcess) -> None:
    """buf curl can Set a key and Get it back, and prints the JSON a person expects."""
    kv = f"{server.url}/kvservice.v1.KVStore"
    done = buf_curl(f"{kv}/Set", '{"key":"k","value":"dg=="}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"revision": "1"}

    done = buf_curl(f"{kv}/Get", '{"key":"k"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"found": True, "value": "dg==", "revision": "1"}

    done = buf_curl(f"{kv}/Delete", '{"key":"k"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"deleted": True, "revision": "2"}


def test_buf_curl_shows_connect_errors(server: ServerProcess) -> None:
    """A refused request makes buf curl fail with the Connect code and the server's message."""
    done = buf_curl(f"{server.url}/kvservice.v1.KVStore/Get", '{"key":""}')
    assert done.returncode != 0
    error = json.loads(done.stderr)
    assert error["code"] == "invalid_argument"
    assert "empty" in error["message"]


def test_buf_curl_health_check(server: ServerProcess) -> None:
    """grpc.health.v1.Health/Check answers SERVING through buf curl, for the server and KVStore."""
    for request in ("{}", '{"service":"kvservice.v1.KVStore"}'):
        done = buf_curl(f"{server.url}/grpc.health.v1.Health/Check", request)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"status": "SERVING"}


def test_buf_curl_data_model_methods(server: ServerProcess) -> None:
    """The CI smoke test of the data-model RPCs: TTL, Touch, Increment, MGet, Txn."""
    kv = f"{server.url}/kvservice.v1.KVStore"
    steps = [
        ("Set", '{"key":"presence:alice","value":"b24=","ttlMs":"60000"}', {"revision": "1"}),
        ("Touch", '{"key":"presence:alice","ttlMs":"0"}', {"revision": "2"}),
        ("Increment", '{"key":"unread:alice","delta":"3"}', {"value": "3", "revision": "3"}),
        (
            "Txn",
            '{"conditions":[{"key":"unread:alice","revision":"3"}],'
            '"success":[{"increment":{"key":"unread:alice","delta":"-3"}}]}',
            {"succeeded": True, "revision": "4",
             "results": [{"increment": {"revision": "4"}}]},  # value 0: left out
        ),
        (
            "MGet",
            '{"keys":["presence:alice","unread:alice"]}',
            {"revision": "4", "items": [
                {"found": True, "value": "b24=", "revision": "2"},
                {"found": True, "value": "MA==", "revision": "4"},
            ]},
        ),
    ]  # fmt: skip
    for method, data, expected in steps:
        done = buf_curl(f"{kv}/{method}", data)
        assert done.returncode == 0, (method, done.stderr)
        assert json.loads(done.stdout) == expected, method
    done = buf_curl(f"{kv}/Set", '{"key":"presence:alice","value":"","ifRevision":"1"}')
    assert json.loads(done.stderr)["code"] == "aborted"


def test_buf_curl_watch_streams_json_messages(server: ServerProcess) -> None:
    """buf curl prints each Watch message as JSON: the backlog event, then the progress mark."""
    assert buf_curl(f"{server.url}/kvservice.v1.KVStore/Set", '{"key":"room:1","value":"aGk="}')
    argv = [str(BUF), "curl", "--schema", "proto", "--protocol", "connect",
            "--data", '{"prefix":"room:","startRevision":"1"}',
            f"{server.url}/kvservice.v1.KVStore/Watch"]  # fmt: skip
    # A watch never ends by itself: read its first two messages, then stop this child.
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO) as watch:
        assert watch.stdout is not None
        decoder, text, messages = json.JSONDecoder(), "", []
        while len(messages) < 2 and (line := watch.stdout.readline()):
            text += line
            try:
                message, end = decoder.raw_decode(text.strip())
            except ValueError:
                continue
            messages.append(message)
            text = text.strip()[end:]
        watch.kill()
    assert messages == [
        {"events": [{"type": "EVENT_TYPE_SET", "key": "room:1", "value": "aGk=", "revision": "1"}]},
        {"progressRevision": "1"},
    ]


def test_buf_curl_watch_without_a_target_is_invalid_argument(server: ServerProcess) -> None:
    done = buf_curl(f"{server.url}/kvservice.v1.KVStore/Watch", "{}")
    assert done.returncode != 0
    assert json.loads(done.stderr)["code"] == "invalid_argument"
