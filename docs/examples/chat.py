"""Modelling a chat application on kvservice (README, "Modelling a chat application").

Run against a node: `python docs/examples/chat.py http://127.0.0.1:8080`.
tests/integration/test_chat_example.py runs it against a real node, so this
file stays true to the API.
"""

from __future__ import annotations

import sys

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from kvservice.v1.kv_connect import KVStoreClientSync
from kvservice.v1.kv_pb2 import (
    Condition,
    DeleteRequest,
    GetRequest,
    IncrementRequest,
    MGetRequest,
    Op,
    ScanRequest,
    SetRequest,
    TouchRequest,
    TxnRequest,
)

PRESENCE_TTL_MS = 30_000  # a client heartbeats every 10 s; 3 missed beats = offline
TYPING_TTL_MS = 5_000
SESSION_TTL_MS = 7 * 24 * 3600 * 1000


# -- presence: "online until the heartbeat stops" -----------------------------------


def go_online(kv: KVStoreClientSync, user: str, device: str) -> None:
    kv.set(SetRequest(key=f"presence:{user}", value=device.encode(), ttl_ms=PRESENCE_TTL_MS))


def heartbeat(kv: KVStoreClientSync, user: str, device: str) -> None:
    """Touch moves the expiry without resending the value; a missing key (expired
    between beats) is not_found, and the client comes back online with a Set."""
    try:
        kv.touch(TouchRequest(key=f"presence:{user}", ttl_ms=PRESENCE_TTL_MS))
    except ConnectError as exc:
        if exc.code != Code.NOT_FOUND:
            raise
        go_online(kv, user, device)


def online(kv: KVStoreClientSync, users: list[str]) -> dict[str, bool]:
    """One MGet: every answer read at the same revision."""
    items = kv.m_get(MGetRequest(keys=[f"presence:{u}" for u in users])).items
    return {user: item.found for user, item in zip(users, items, strict=True)}


# -- typing indicators: a few seconds, refreshed while typing -----------------------


def typing(kv: KVStoreClientSync, room: str, user: str) -> None:
    kv.set(SetRequest(key=f"typing:{room}:{user}", value=b"1", ttl_ms=TYPING_TTL_MS))


# -- unread counters ------------------------------------------------------------------


def new_message(kv: KVStoreClientSync, room: str, sender: str, members: list[str]) -> int:
    """One Txn: the room's message counter and every other member's unread counter move
    together, under one revision (a reader never sees half of it). Returns the
    message's sequence number in the room."""
    ops = [Op(increment=IncrementRequest(key=f"room:{room}:seq", delta=1))]
    ops += [
        Op(increment=IncrementRequest(key=f"unread:{member}:{room}", delta=1))
        for member in members
        if member != sender
    ]
    reply = kv.txn(TxnRequest(success=ops))
    return reply.results[0].increment.value


def mark_read(kv: KVStoreClientSync, user: str, room: str) -> None:
    kv.delete(DeleteRequest(key=f"unread:{user}:{room}"))


def unread(kv: KVStoreClientSync, user: str, room: str) -> int:
    got = kv.get(GetRequest(key=f"unread:{user}:{room}"))
    return int(got.value) if got.found else 0


# -- sessions: create once, revoke safely --------------------------------------------


def create_session(kv: KVStoreClientSync, token_hash: str, user: str) -> bool:
    """if_revision=0: only if no session has this id (never overwrite another's)."""
    try:
        kv.set(SetRequest(key=f"session:{token_hash}", value=user.encode(),
                          ttl_ms=SESSION_TTL_MS, if_revision=0))  # fmt: skip
    except ConnectError as exc:
        if exc.code == Code.ABORTED:
            return False
        raise
    return True


# -- room membership: join only while the room exists ---------------------------------


def join_room(kv: KVStoreClientSync, room: str, user: str) -> bool:
    reply = kv.txn(TxnRequest(
        conditions=[Condition(key=f"room:{room}:meta", present=True)],
        success=[
            Op(set=SetRequest(key=f"room:{room}:member:{user}", value=b"member")),
            Op(increment=IncrementRequest(key=f"room:{room}:members", delta=1)),
        ],
    ))  # fmt: skip
    return reply.succeeded


def room_members(kv: KVStoreClientSync, room: str) -> list[str]:
    """Every member, page by page (keys only: the values are not needed)."""
    prefix = f"room:{room}:member:"
    request = ScanRequest(prefix=prefix, keys_only=True, limit=1000)
    members = []
    while True:
        page = kv.scan(request)
        members += [item.key.removeprefix(prefix) for item in page.items]
        if not page.next_start_after:
            return members
        request.start_after = page.next_start_after


def main(url: str) -> None:
    with KVStoreClientSync(url) as kv:
        go_online(kv, "alice", "phone")
        heartbeat(kv, "alice", "phone")
        print("online:", online(kv, ["alice", "bob"]))
        typing(kv, "general", "alice")
        kv.set(SetRequest(key="room:general:meta", value=b'{"title":"General"}'))
        print("joined:", join_room(kv, "general", "alice"), join_room(kv, "nowhere", "alice"))
        join_room(kv, "general", "bob")
        print("members:", room_members(kv, "general"))
        seq = new_message(kv, "general", "alice", ["alice", "bob", "carol"])
        print("message", seq, "bob unread:", unread(kv, "bob", "general"))
        mark_read(kv, "bob", "general")
        print("session created:", create_session(kv, "h1", "alice"),
              "again:", create_session(kv, "h1", "mallory"))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080")
