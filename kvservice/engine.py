"""The in-memory store: one dict, one global revision, and `apply(LogEntry)`.

Memory layout: each value is kept as a single `bytes` object, "stored bytes":

    header   8 bytes, big-endian: bits 0-61 the revision of the key's last
             change; bit 63 set = an expiry follows; bit 62 set = the value
             is a zstd frame (setting `compression`)
    expiry   8 bytes, big-endian Unix ms -- only when bit 63 is set
    value    the rest

One object per key instead of a (value, revision) tuple saves about 90 bytes
per key, which is most of the gap to Redis (see README, "Memory"); a key with
an expiry costs 8 bytes more here plus one list slot in the expiry wheel.
Keys without flags (the common case) read with one comparison. Snapshots hold
stored bytes as they are, so they keep expiries and compression too.

The digest is an order-independent fingerprint of the whole state: the XOR
of a 64-bit XXH3 hash of each key with its stored bytes (revision, expiry and
value). XXH3 rather than a cryptographic hash: it guards against damage, not
an adversary, and costs ~0.2 µs a call where BLAKE2b costs ~1.7 µs (measured
here), which keeps the digest a small share of a Set. A write changes it in
O(1) (XOR out the old pair, XOR in the new), so two nodes at the same
revision hold the same state exactly when their digests agree (up to a 2^-64
chance). Replication compares it between primary and replica; snapshots store
it so loading one needs no pass over the keys.

Expiry: `apply` never looks at the clock, so every node that applies the same
entries holds the same state. Reads (`item`) hide keys whose expiry has passed
by the store's clock; only a primary removes them, by committing DELETE
entries marked `expired` (node.py's expiry cycle finds them in the wheel).
"""

from __future__ import annotations

import heapq
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final, NamedTuple

from xxhash import xxh3_64_intdigest

from kvservice import values
from kvservice.errors import RevisionGap
from kvservice.keyindex import KeyIndex
from kvservice.v1.log_pb2 import LogEntry

HEADER: Final = struct.Struct(">Q")
HEADER_AND_EXPIRY: Final = struct.Struct(">QQ")
HAS_EXPIRY: Final = 1 << 63
ZSTD: Final = 1 << 62
FLAGS: Final = HAS_EXPIRY | ZSTD
REVISION_BITS: Final = ZSTD - 1

SET: Final = LogEntry.OPERATION_SET
DELETE: Final = LogEntry.OPERATION_DELETE
TOUCH: Final = LogEntry.OPERATION_TOUCH
BATCH: Final = LogEntry.OPERATION_BATCH
ENCODING_ZSTD: Final = LogEntry.VALUE_ENCODING_ZSTD

# The expiry wheel's finest slot: a key is removed at most this much (plus one
# cycle) after its time.
SLOT_MS: Final = 100
# Slot widths by how far off an expiry is when the key is filed. Each level
# spans 100 of its slots (10 s of 100 ms slots, 1,000 s of 10 s slots, ...);
# a coarse slot is refiled into finer ones when it comes due. So the wheel has a
# few hundred slots however widely expiries spread, and a key costs one list
# reference: a slot per expiry time would cost ~170 B a key when they are sparse.
LEVEL_WIDTHS_MS: Final = (SLOT_MS, 100 * SLOT_MS, 10_000 * SLOT_MS, 1_000_000 * SLOT_MS)
SLOTS_PER_LEVEL: Final = 100

Clock = Callable[[], int]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Item(NamedTuple):
    """One live key as clients see it (value decompressed)."""

    value: bytes
    revision: int
    expires_at_ms: int  # 0 = never


def pack(revision: int, value: bytes, expires_at_ms: int = 0, zstd: bool = False) -> bytes:
    """Stored bytes for a key (see the module docstring)."""
    header = revision | (ZSTD if zstd else 0)
    if expires_at_ms:
        return HEADER_AND_EXPIRY.pack(header | HAS_EXPIRY, expires_at_ms) + value
    return HEADER.pack(header) + value


def revision_of(stored: bytes) -> int:
    header: int = HEADER.unpack_from(stored)[0]
    return header & REVISION_BITS


def expiry_of(stored: bytes) -> int:
    """The key's expiry (Unix ms), 0 = never."""
    if stored[0] & 0x80:
        expires: int = HEADER_AND_EXPIRY.unpack_from(stored)[1]
        return expires
    return 0


def unpack(stored: bytes) -> Item:
    """The client's view of stored bytes (no expiry check)."""
    header: int = HEADER.unpack_from(stored)[0]
    if header < ZSTD:  # no flags: the common case
        return Item(stored[8:], header, 0)
    start, expires = 8, 0
    if header & HAS_EXPIRY:
        expires = HEADER_AND_EXPIRY.unpack_from(stored)[1]
        start = 16
    value = stored[start:]
    if header & ZSTD:
        value = values.decompress(value)
    return Item(value, header & REVISION_BITS, expires)


def stored_value(stored: bytes) -> tuple[bytes, bool]:
    """The value as stored (maybe compressed) and whether it is a zstd frame."""
    return stored[16 if stored[0] & 0x80 else 8 :], bool(stored[0] & 0x40)


def pair_hash(key: str, stored: bytes) -> int:
    """The digest term of one key and its stored bytes."""
    return _term(key.encode(), stored)


def _term(key: bytes, stored: bytes) -> int:
    # (The hot path: the key is encoded once per write, and no int() wrapper.)
    term: int = xxh3_64_intdigest(key + b"\0" + stored)
    return term


def digest_of(items: Iterable[tuple[str, bytes]]) -> int:
    """The digest of a whole state (O(n): for snapshots written without one)."""
    digest = 0
    for key, stored in items:
        digest ^= pair_hash(key, stored)
    return digest


class ExpiryWheel:
    """Keys with an expiry, filed in slots by expiry time (a hierarchical timing wheel).

    Entries are not removed when a key is rewritten or touched: when a slot comes
    due, each key's current expiry decides — later than the slot (it was filed
    again elsewhere): dropped; its 100 ms slot over: due; else refiled finer.
    """

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], list[str]] = {}
        self._order: list[tuple[int, int, int]] = []  # heap of (due ms, width, index)

    def add(self, key: str, expires_at_ms: int, now_ms: int) -> None:
        ahead = expires_at_ms - now_ms
        width = LEVEL_WIDTHS_MS[-1]
        for level_width in LEVEL_WIDTHS_MS:
            if ahead < level_width * SLOTS_PER_LEVEL:
                width = level_width
                break
        index = expires_at_ms // width
        keys = self.slots.get((width, index))
        if keys is None:
            self.slots[width, index] = [key]
            # A finest slot is due once it is over; a coarse one when it begins.
            due = (index + 1) * width if width == SLOT_MS else index * width
            heapq.heappush(self._order, (due, width, index))
        else:
            keys.append(key)

    def due(self, now_ms: int, limit: int, expiry: Callable[[str], int]) -> Iterator[str]:
        """Keys whose expiry's 100 ms slot is over by `now_ms`, at most `limit` (the rest
        wait for the next cycle). `expiry(key)` is the key's current expiry (0: none)."""
        order, slots = self._order, self.slots
        while order and order[0][0] <= now_ms and limit > 0:
            _, width, index = order[0]
            keys = slots[width, index]
            while keys and limit > 0:
                key = keys.pop()
                expires = expiry(key)
                if not expires or expires // width > index:
                    continue  # gone, or filed again for a later time
                if (expires // SLOT_MS + 1) * SLOT_MS <= now_ms:
                    limit -= 1
                    yield key
                else:
                    self.add(key, expires, now_ms)  # a finer slot (never this one)
            if not keys:
                heapq.heappop(order)
                del slots[width, index]

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.slots.values())


class Store:
    """Keys, values and revisions; knows nothing about disks or the network."""

    def __init__(self, clock: Clock = wall_clock_ms) -> None:
        self.data: dict[str, bytes] = {}
        self.revision = 0
        self.digest = 0
        self.clock = clock
        self.expiry = ExpiryWheel()
        self.key_index = KeyIndex(self.data)  # sorted keys, for Scan (built on the first)

    def __len__(self) -> int:
        return len(self.data)

    def item(self, key: str) -> Item | None:
        """The live key: None when absent or when its expiry has passed."""
        stored = self.data.get(key)
        if stored is None:
            return None
        if stored[0] < 0x40:  # no flags: the common case
            return Item(stored[8:], HEADER.unpack_from(stored)[0], 0)
        item = unpack(stored)
        if item.expires_at_ms and item.expires_at_ms <= self.clock():
            return None
        return item

    def get(self, key: str) -> tuple[bytes, int] | None:
        """Return (value, revision of last change) of a live key, else None."""
        item = self.item(key)
        return None if item is None else (item.value, item.revision)

    def expiry_at(self, key: str) -> int:
        """The key's expiry as stored (0: absent or none), expired or not."""
        stored = self.data.get(key)
        return 0 if stored is None else expiry_of(stored)

    def is_expired(self, key: str, now_ms: int | None = None) -> bool:
        """Whether `key` is present but its expiry has passed (awaiting removal)."""
        stored = self.data.get(key)
        if stored is None or not stored[0] & 0x80:
            return False
        return expiry_of(stored) <= (self.clock() if now_ms is None else now_ms)

    def __contains__(self, key: str) -> bool:
        return self.item(key) is not None

    def next_set(self, key: str, value: bytes) -> LogEntry:
        """Build the log entry that would set `key` (does not apply it)."""
        return LogEntry(revision=self.revision + 1, operation=SET, key=key, value=value)

    def next_delete(self, key: str) -> LogEntry:
        """Build the log entry that would delete `key` (does not apply it)."""
        return LogEntry(revision=self.revision + 1, operation=DELETE, key=key)

    def apply(self, entry: LogEntry) -> None:
        """Apply one committed entry; entries must arrive in revision order without gaps."""
        revision = entry.revision
        if revision != self.revision + 1:
            raise RevisionGap(f"expected revision {self.revision + 1}, got {revision}")
        if entry.operation == BATCH:
            change = 0
            for nested in entry.entries:
                change ^= self._change(nested, revision)
        else:
            change = self._change(entry, revision)
        self.digest ^= change
        self.revision = revision

    def _change(self, entry: LogEntry, revision: int) -> int:
        """Apply one SET/DELETE/TOUCH at `revision`; return its digest change."""
        key = entry.key
        operation = entry.operation
        if operation == SET:
            stored = pack(
                revision, entry.value, entry.expires_at_ms, entry.value_encoding == ENCODING_ZSTD
            )
        elif operation == DELETE:
            old = self.data.pop(key, None)
            self.key_index.discard(key)
            return 0 if old is None else _term(key.encode(), old)
        elif operation == TOUCH:
            before = self.data.get(key)
            if before is None:
                raise ValueError(f"TOUCH of missing key {key!r} at revision {revision}")
            value, zstd = stored_value(before)
            stored = pack(revision, value, entry.expires_at_ms, zstd)
        else:
            raise ValueError(f"unknown log operation {operation} at revision {revision}")
        key_bytes = key.encode()
        old = self.data.get(key)
        self.data[key] = stored
        if old is None:
            self.key_index.add(key)
        if entry.expires_at_ms:
            self.expiry.add(key, entry.expires_at_ms, self.clock())
        change = _term(key_bytes, stored)
        return change if old is None else change ^ _term(key_bytes, old)

    def load(self, data: dict[str, bytes], revision: int, digest: int | None = None) -> None:
        """Take over a snapshot's dict (key -> stored bytes) and digest."""
        self.data = data
        self.key_index.rebuild(data)
        self.revision = revision
        self.digest = digest_of(data.items()) if digest is None else digest
        self.expiry = ExpiryWheel()
        now = self.clock()
        for key, stored in data.items():
            if stored[0] & 0x80:
                self.expiry.add(key, expiry_of(stored), now)
