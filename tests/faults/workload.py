"""A concurrent write burst against a real node, and the checks that nothing
acknowledged was lost.

Each writer thread owns its keys and sends one request at a time, so its
acknowledged operations are a sequential history. When a request fails (the
server was killed or is stopping) the writer stops and remembers that one
operation as *in doubt*: it may or may not have been committed. After a
restart every key must hold the state after the writer's last acknowledged
operation on it, or the state after the in-doubt one; nothing else.
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvservice.v1.kv_connect import KVStoreClientSync
from kvservice.v1.kv_pb2 import DeleteRequest, GetRequest, SetRequest

if TYPE_CHECKING:
    from tests.integration.conftest import ServerProcess

# What a key holds: (value, revision of its last change), or None when absent.
State = tuple[bytes, int] | None


@dataclass
class Op:
    kind: str  # "set" or "delete"
    key: str
    value: bytes
    sent: float
    acked: float | None = None
    revision: int | None = None


@dataclass
class Writer:
    index: int
    prefix: str
    keys: int
    seed: int
    acked: list[Op] = field(default_factory=list)
    in_doubt: Op | None = None
    error: str | None = None
    error_at: float | None = None
    finished_all: bool = False

    def key(self, i: int) -> str:
        return f"{self.prefix}/w{self.index:02d}/k{i}"

    def run(self, url: str, max_ops: int, stop: threading.Event) -> None:
        rng = random.Random(self.seed)
        present: set[str] = set()
        # Binary protobuf: the cheaper codec, so the burst is as dense as possible.
        with KVStoreClientSync(url, proto_json=False, timeout_ms=15_000) as client:
            for i in range(max_ops):
                if stop.is_set():
                    return
                key = self.key(rng.randrange(self.keys))
                if key in present and rng.random() < 0.15:
                    op = Op("delete", key, b"", time.monotonic())
                else:
                    body = f"{self.prefix}/w{self.index}/op{i}/".encode()
                    op = Op(
                        "set", key, body + rng.randbytes(rng.randrange(8, 200)), time.monotonic()
                    )
                try:
                    if op.kind == "set":
                        op.revision = client.set(SetRequest(key=key, value=op.value)).revision
                        present.add(key)
                    else:
                        response = client.delete(DeleteRequest(key=key))
                        assert response.deleted, f"delete of {key} found nothing"
                        op.revision = response.revision
                        present.discard(key)
                except Exception as exc:  # any failure leaves this one operation in doubt
                    self.in_doubt = op
                    self.error = f"{type(exc).__name__}: {exc}"
                    self.error_at = time.monotonic()
                    return
                op.acked = time.monotonic()
                self.acked.append(op)
            self.finished_all = True

    def allowed(self) -> dict[str, list[State]]:
        """For each key this writer touched, the states a recovered node may show."""
        last: dict[str, State] = {}
        for op in self.acked:
            assert op.revision is not None
            last[op.key] = (op.value, op.revision) if op.kind == "set" else None
        allowed: dict[str, list[State]] = {key: [state] for key, state in last.items()}
        if self.in_doubt is not None:
            doubt = self.in_doubt
            before = last.get(doubt.key)
            if doubt.kind == "set":
                # Its revision is unknown but above every revision this writer saw.
                allowed[doubt.key] = [before, (doubt.value, -1)]
            else:
                allowed[doubt.key] = [before, None]
        return allowed


class Burst:
    """`clients` writer threads hammering one node until stopped or failing."""

    def __init__(self, url: str, prefix: str, *, clients: int = 16, keys: int = 48,
                 max_ops: int = 20_000, seed: int = 0) -> None:  # fmt: skip
        self.url = url
        self.max_ops = max_ops
        self.stop_event = threading.Event()
        self.writers = [Writer(i, prefix, keys, seed * 1000 + i) for i in range(clients)]
        self.threads = [
            threading.Thread(target=w.run, args=(url, max_ops, self.stop_event), daemon=True)
            for w in self.writers
        ]

    def start(self) -> Burst:
        for thread in self.threads:
            thread.start()
        return self

    def acked_count(self) -> int:
        return sum(len(w.acked) for w in self.writers)

    def wait_for_acks(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.acked_count() < count:
            assert time.monotonic() < deadline, f"only {self.acked_count()} writes acknowledged"
            assert any(t.is_alive() for t in self.threads), self.errors()
            time.sleep(0.01)

    def join(self, timeout: float = 30.0) -> None:
        """Wait for every writer to stop (they stop on their first failed request)."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [w.index for w, t in zip(self.writers, self.threads, strict=True) if t.is_alive()]
        if alive:
            self.stop_event.set()
            raise AssertionError(f"writers {alive} still running {timeout}s after the fault")

    def errors(self) -> str:
        return "\n".join(f"writer {w.index}: {w.error}" for w in self.writers if w.error)

    def assert_no_error_before(self, moment: float) -> None:
        """Every failed request failed because of the fault, not before it."""
        early = [w for w in self.writers if w.error_at is not None and w.error_at < moment]
        assert not early, "requests failed before the fault:\n" + "\n".join(
            f"writer {w.index}: {w.error}" for w in early
        )

    def acks(self) -> list[Op]:
        return [op for w in self.writers for op in w.acked]


def check_revisions(acks: list[Op]) -> None:
    """Acknowledged revisions are unique, increase along each writer's history,
    and respect real time: a write acknowledged before another was sent has a
    smaller revision."""
    revisions = [op.revision for op in acks]
    assert all(r is not None and r > 0 for r in revisions)
    assert len(set(revisions)) == len(revisions), "two acknowledged writes share a revision"
    by_ack = sorted(acks, key=lambda op: op.acked or 0.0)
    ack_times = [op.acked or 0.0 for op in by_ack]
    running_max: list[int] = []
    for op in by_ack:
        assert op.revision is not None
        running_max.append(max(op.revision, running_max[-1] if running_max else 0))
    for op in acks:
        assert op.revision is not None
        before = bisect.bisect_left(ack_times, op.sent)
        if before:
            assert running_max[before - 1] < op.revision, (
                f"write of {op.key} got revision {op.revision} although revision "
                f"{running_max[before - 1]} was acknowledged before it was sent"
            )


def check_writer_order(writers: list[Writer]) -> None:
    """Each writer's acknowledged revisions strictly increase."""
    for w in writers:
        revisions = [op.revision or 0 for op in w.acked]
        assert revisions == sorted(set(revisions)), f"writer {w.index}: {revisions}"


def read_states(url: str, keys: list[str], threads: int = 8) -> dict[str, State]:
    """Get every key from a node (binary protobuf, a few clients in parallel)."""
    chunks = [keys[i::threads] for i in range(threads)]

    def read(chunk: list[str]) -> dict[str, State]:
        out: dict[str, State] = {}
        with KVStoreClientSync(url, proto_json=False, timeout_ms=10_000) as client:
            for key in chunk:
                got = client.get(GetRequest(key=key))
                out[key] = (got.value, got.revision) if got.found else None
        return out

    states: dict[str, State] = {}
    with ThreadPoolExecutor(threads) as pool:
        for part in pool.map(read, chunks):
            states.update(part)
    return states


def verify_recovered(url: str, writers: list[Writer]) -> dict[str, State]:
    """Check a restarted node against the writers' histories; return what it holds."""
    allowed: dict[str, list[State]] = {}
    floor: dict[str, int] = {}
    for w in writers:
        allowed.update(w.allowed())
        if w.in_doubt is not None:
            floor[w.in_doubt.key] = max((op.revision or 0 for op in w.acked), default=0)
    states = read_states(url, sorted(allowed))
    lost = []
    for key, options in allowed.items():
        got = states[key]
        ok = got in options
        if not ok and got is not None and (got[0], -1) in options:
            ok = got[1] > floor[key]  # the in-doubt set survived, with a newer revision
        if not ok:
            lost.append(f"{key}: got {got!r}, allowed {options!r}")
    assert not lost, f"{len(lost)} keys do not match the acknowledged history:\n" + "\n".join(
        lost[:20]
    )
    return states


def populate(server: ServerProcess, count: int, prefix: str = "k") -> dict[str, tuple[bytes, int]]:
    """Write `count` keys one by one; return key -> (value, acknowledged revision)."""
    written = {}
    with server.client(proto_json=False) as client:
        for i in range(count):
            key, value = f"{prefix}{i:04d}", f"value-{prefix}-{i}-".encode() * 3
            written[key] = (value, client.set(SetRequest(key=key, value=value)).revision)
    return written


def assert_holds(server: ServerProcess, expected: dict[str, Any]) -> None:
    """The node holds exactly these keys with these values and revisions."""
    got = read_states(server.url, sorted(expected))
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert not wrong, f"{len(wrong)} keys differ (got, expected): {list(wrong.items())[:5]}"
