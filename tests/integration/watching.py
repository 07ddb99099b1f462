"""Helpers for Watch tests: read streams with the real client or as raw Connect HTTP."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from google.protobuf import json_format

from kvservice.storage import record
from kvservice.storage.segments import data_dirs, list_segments
from kvservice.v1.kv_pb2 import Event, WatchRequest, WatchResponse
from kvservice.v1.log_pb2 import LogEntry

from .conftest import ServerProcess

WATCH_PATH = "/kvservice.v1.KVStore/Watch"
END_STREAM = 0b10


def wal_entries(data_dir: Path) -> list[LogEntry]:
    """Every entry in the WAL segments on disk, in order."""
    return [
        LogEntry.FromString(payload)
        for path in list_segments(data_dirs(data_dir)[0])
        for _, payload in record.scan(path.read_bytes())
    ]


def expected_events(
    entries: list[LogEntry], start: int, *, key: str | None = None, prefix: str | None = None
) -> list[tuple[int, str, bytes, int]]:
    """(type, key, value, revision) of the Set/Delete entries a watch should deliver."""
    wanted = []
    for entry in entries:
        if entry.revision < start:
            continue
        if (key is not None and entry.key != key) or (
            prefix is not None and not entry.key.startswith(prefix)
        ):
            continue
        kind = Event.EVENT_TYPE_SET if entry.operation == entry.OPERATION_SET else None
        kind = kind or Event.EVENT_TYPE_DELETE
        wanted.append((kind, entry.key, entry.value, entry.revision))
    return wanted


def as_tuples(events: list[Event]) -> list[tuple[int, str, bytes, int]]:
    return [(e.type, e.key, e.value, e.revision) for e in events]


def until_live(server: ServerProcess, request: WatchRequest) -> tuple[list[Event], int]:
    """The backlog events of a watch, up to its first progress message (live from there)."""
    events: list[Event] = []
    with server.client(proto_json=False) as kv:
        responses = kv.watch(request)
        try:
            for response in responses:
                if not response.events:
                    return events, response.progress_revision
                events.extend(response.events)
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()
    raise AssertionError("the stream ended before it went live")


@dataclass
class RawStream:
    """A Watch call as plain HTTP (Connect streaming framing), read only when asked."""

    response: httpx.Response
    proto: bool
    _chunks: Iterator[bytes] = field(init=False)
    _buffer: bytes = b""
    end: dict[str, object] | None = None

    def __post_init__(self) -> None:
        self._chunks = self.response.iter_raw()  # as received (a size would wait to fill it)

    def next(self) -> WatchResponse | None:
        """The next message, or None at the end of the stream (then `end` holds its JSON)."""
        while True:
            if len(self._buffer) >= 5:
                flags, size = struct.unpack(">BI", self._buffer[:5])
                if len(self._buffer) >= 5 + size:
                    body, self._buffer = self._buffer[5 : 5 + size], self._buffer[5 + size :]
                    if flags & END_STREAM:
                        self.end = json.loads(body)
                        return None
                    if self.proto:
                        return WatchResponse.FromString(body)
                    return json_format.Parse(body, WatchResponse())
            chunk = next(self._chunks, None)
            if chunk is None:
                return None
            self._buffer += chunk

    def error_code(self) -> str | None:
        error = (self.end or {}).get("error")
        return str(error["code"]) if isinstance(error, dict) else None

    def error_message(self) -> str:
        error = (self.end or {}).get("error")
        return str(error.get("message", "")) if isinstance(error, dict) else ""


def raw_body(request: dict[str, object] | WatchRequest) -> tuple[bytes, str]:
    """An enveloped request body and its content type (JSON for dicts, else protobuf)."""
    if isinstance(request, WatchRequest):
        payload, kind = request.SerializeToString(), "application/connect+proto"
    else:
        payload, kind = json.dumps(request).encode(), "application/connect+json"
    return struct.pack(">BI", 0, len(payload)) + payload, kind


@contextlib.contextmanager
def raw_watch(
    server: ServerProcess,
    request: dict[str, object] | WatchRequest,
    headers: dict[str, str] | None = None,
) -> Iterator[RawStream]:
    """POST a Watch as curl would; the stream is read only as `next()` is called."""
    body, kind = raw_body(request)
    all_headers = {"content-type": kind, "connect-protocol-version": "1", **(headers or {})}
    with (
        httpx.Client(timeout=httpx.Timeout(30.0)) as http,
        http.stream("POST", server.url + WATCH_PATH, content=body, headers=all_headers) as reply,
    ):
        assert reply.status_code == 200, reply.read()
        yield RawStream(reply, proto=kind.endswith("proto"))
