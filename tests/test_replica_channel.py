"""The replication channel (kvservice/replication/channel.py) against peers that
misbehave: no answer, a cut answer, errors with and without a Connect body, an
oversized answer; and that it keeps connections alive. (Against real replicas
it carries every replication test in tests/integration.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.replication import channel as channel_module
from kvservice.replication.channel import MAX_RESPONSE_BYTES, ReplicaChannel
from kvservice.v1.replication_pb2 import PushRequest, PushResponse, PushResult

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def peer(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A fake replica on a free loopback port: its URL and a list that counts the
    connections it accepted."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


def answer(status: int, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


OK = PushResponse(result=PushResult.PUSH_RESULT_OK, revision=7, durable_revision=7)


async def always_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A replica that answers every push with OK."""
    while True:
        await read_request(reader)
        writer.write(answer(200, OK.SerializeToString()))
        await writer.drain()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A replica that reads a push and never answers."""
    await read_request(reader)
    await asyncio.sleep(10)


async def push(url: str, timeout_ms: int = 2_000) -> PushResponse:
    channel = ReplicaChannel(url, timeout_ms=timeout_ms, headers={"authorization": "Bearer t"})
    try:
        return await channel.push(PushRequest(prev_revision=3))
    finally:
        await channel.close()


async def connect_error(call: Awaitable[object]) -> ConnectError:
    with pytest.raises(ConnectError) as caught:
        await call
    return caught.value


def test_a_push_is_a_connect_unary_call_and_connections_are_kept_alive() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            # Chunked, as uvicorn sends connect-python's answers.
            body = OK.SerializeToString()
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                         + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")  # fmt: skip
            await writer.drain()

    async def scenario() -> None:
        async with peer(replica) as (url, accepted):
            channel = ReplicaChannel(url, timeout_ms=2_000, headers={"authorization": "Bearer t"})
            try:
                for _ in range(3):
                    assert await channel.push(PushRequest(prev_revision=3)) == OK
            finally:
                await channel.close()
            assert len(accepted) == 1, "one keep-alive connection for calls one after another"

    asyncio.run(scenario())
    head, body = seen[0]
    assert head.startswith(b"POST /kvservice.v1.Replication/Push HTTP/1.1\r\n")
    lines = head.lower().split(b"\r\n")
    for header in (b"content-type: application/proto", b"connect-protocol-version: 1",
                   b"authorization: bearer t"):  # fmt: skip
        assert header in lines
    # The call's time left, so the replica gives up when the caller does.
    timeout = next(
        int(line.split(b":")[1]) for line in lines if line.startswith(b"connect-timeout")
    )
    assert 1000 < timeout <= 2000
    assert PushRequest.FromString(body).prev_revision == 3


def test_no_answer_is_deadline_exceeded_within_the_timeout() -> None:
    async def scenario() -> ConnectError:
        async with peer(silent) as (url, _):
            loop = asyncio.get_running_loop()
            began = loop.time()
            error = await connect_error(push(url, timeout_ms=300))
            assert loop.time() - began < 2
            return error

    error = asyncio.run(scenario())
    assert error.code == Code.DEADLINE_EXCEEDED
    assert "no answer to Push within" in error.message


@pytest.mark.parametrize(
    ("reply", "code", "words"),
    [
        (answer(401, json.dumps({"code": "unauthenticated", "message": "no token"}).encode(),
                "content-type: application/json"), Code.UNAUTHENTICATED, "no token"),
        (answer(503, b"upstream down"), Code.UNAVAILABLE, "HTTP 503"),
        (answer(500, b"<html>"), Code.UNKNOWN, "HTTP 500"),
        (answer(200, b"\xff\xff\xff"), Code.INTERNAL, "undecodable"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", Code.UNAVAILABLE, "closed"),
        (b"NOT HTTP AT ALL\r\n\r\n", Code.UNAVAILABLE, "malformed"),
        (answer(200, b"x" * (MAX_RESPONSE_BYTES + 1)), Code.UNAVAILABLE, "larger than"),
    ],
    ids=["connect-error", "status-only", "unknown-status", "garbage", "cut", "not-http",
         "oversized"],
)  # fmt: skip
def test_a_bad_answer_is_a_clear_connect_error(reply: bytes, code: Code, words: str) -> None:
    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def scenario() -> ConnectError:
        async with peer(replica) as (url, _):
            return await connect_error(push(url))

    error = asyncio.run(scenario())
    assert error.code == code
    assert words in error.message


def test_an_unreachable_replica_is_unavailable() -> None:
    async def scenario() -> ConnectError:
        async with peer(lambda r, w: asyncio.sleep(0)) as (url, _):
            pass  # closed again: nothing listens there now
        return await connect_error(push(url))

    error = asyncio.run(scenario())
    assert error.code == Code.UNAVAILABLE
    assert "cannot reach" in error.message


def test_a_failed_connection_is_not_reused() -> None:
    calls: list[int] = []

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            calls.append(1)
            if len(calls) == 1:
                return  # the first call's connection is cut without an answer
            writer.write(answer(200, OK.SerializeToString()))
            await writer.drain()

    async def scenario() -> None:
        async with peer(flaky) as (url, accepted):
            channel = ReplicaChannel(url, timeout_ms=2_000)
            try:
                first = await connect_error(channel.push(PushRequest()))
                assert first.code == Code.UNAVAILABLE
                assert await channel.push(PushRequest()) == OK
            finally:
                await channel.close()
            assert len(accepted) == 2

    asyncio.run(scenario())


def test_push_nowait_sends_on_an_idle_connection_and_calls_back_with_the_answer() -> None:
    async def scenario() -> None:
        async with peer(always_ok) as (url, accepted):
            channel = ReplicaChannel(url, timeout_ms=2_000)
            loop = asyncio.get_running_loop()
            try:
                got: asyncio.Future[tuple[object, object]] = loop.create_future()

                def done(reply: object, error: object) -> None:
                    got.set_result((reply, error))

                # No connection yet: nothing is sent, the caller uses push() (which connects).
                assert not channel.push_nowait(PushRequest(), done)
                assert await channel.push(PushRequest()) == OK
                assert channel.push_nowait(PushRequest(), done)
                assert await got == (OK, None)
            finally:
                await channel.close()
            assert len(accepted) == 1

    asyncio.run(scenario())


def test_abort_ends_the_calls_in_progress() -> None:
    async def scenario() -> ConnectError:
        async with peer(silent) as (url, _):
            channel = ReplicaChannel(url, timeout_ms=5_000)
            call = asyncio.ensure_future(channel.push(PushRequest()))
            await asyncio.sleep(0.2)  # (sent, no answer)
            channel.abort()
            try:
                return await connect_error(call)
            finally:
                await channel.close()

    error = asyncio.run(scenario())
    assert error.code == Code.UNAVAILABLE
    assert "abandoned" in error.message


def test_a_connection_idle_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers close idle keep-alive connections: one idle past MAX_IDLE_SECONDS is
    replaced rather than written to as the server may be closing it."""
    monkeypatch.setattr(channel_module, "MAX_IDLE_SECONDS", 0.05)

    async def scenario() -> None:
        async with peer(always_ok) as (url, accepted):
            channel = ReplicaChannel(url, timeout_ms=2_000)
            try:
                assert await channel.push(PushRequest()) == OK
                assert await channel.push(PushRequest()) == OK  # (reused: still fresh)
                await asyncio.sleep(0.1)
                assert await channel.push(PushRequest()) == OK
            finally:
                await channel.close()
            assert len(accepted) == 2

    asyncio.run(scenario())
