"""Record codec shared by WAL segments and snapshot files. No file I/O here.

Byte layout of one record (all integers little-endian, unsigned 32-bit):

    offset  size  field
    0       4     payload length N
    4       4     CRC-32C (Castagnoli) of the payload
    8       4     CRC-32C of bytes 0..7, so a damaged length is never trusted
    12      N     payload: one serialized protobuf message
                  (LogEntry in WAL segments; SnapshotHeader, SnapshotChunk...,
                  SnapshotTrailer in snapshot files)

A file is a plain concatenation of records; there is no file header. Segment
and snapshot names carry the revision (see wal.py and snapshot.py).

Damage is classified by one rule (`classify`), used by recovery, `wal check`
and `wal repair` alike:
- *torn*: the buffer ends inside a record (fewer than 12 header bytes, or a
  valid header whose payload runs past the end), or a record fails its
  checksums and no valid record starts anywhere after it (the last record's
  payload, zeros a file system extended the file with, a partly written
  page). A crash mid-append produces exactly these, so the tail may be cut off.
- *corrupt*: a checksum failure with a valid record after it. That is never a
  crash artefact, so nothing is cut off automatically.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

import google_crc32c

from kvservice.errors import CorruptRecord, TornRecord

HEADER: Final = struct.Struct("<III")
HEADER_SIZE: Final = HEADER.size
LENGTH_AND_CRC: Final = struct.Struct("<II")
HEADER_CRC: Final = struct.Struct("<I")
# A sanity bound well above any legal record (values are limited far lower);
# a larger length with a valid header checksum means a bug, not a crash.
MAX_PAYLOAD: Final = 1 << 30


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (hardware-accelerated where available)."""
    return int(google_crc32c.value(data))


def encode(payload: bytes) -> bytes:
    """Frame one payload as a record."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    head = LENGTH_AND_CRC.pack(len(payload), crc32c(payload))
    return head + HEADER_CRC.pack(crc32c(head)) + payload


def _record_at(buf: bytes | bytearray, pos: int, path: str, at: int) -> tuple[bytes, int] | None:
    """Check the record starting at `buf[pos]`; return (payload, offset after it).

    None when `buf` ends before the record does (wait for more bytes, or it is
    torn). Raises CorruptRecord, with the stream offset `at`, on any checksum
    or length failure. This is the only place a record header is trusted.
    """
    end = len(buf)
    if end - pos < HEADER_SIZE:
        return None
    length, payload_crc, header_crc = HEADER.unpack_from(buf, pos)
    if crc32c(bytes(buf[pos : pos + 8])) != header_crc:
        raise CorruptRecord(path, at, "header checksum mismatch")
    if length > MAX_PAYLOAD:
        raise CorruptRecord(path, at, f"payload length {length} exceeds {MAX_PAYLOAD}")
    start = pos + HEADER_SIZE
    stop = start + length
    if stop > end:
        return None
    payload = bytes(buf[start:stop])
    if crc32c(payload) != payload_crc:
        raise CorruptRecord(path, at, "payload checksum mismatch")
    return payload, stop


def scan(buf: bytes, path: str = "<buffer>") -> Iterator[tuple[int, bytes]]:
    """Yield (offset, payload) for each valid record of `buf`, in order.

    When `buf` does not end on a clean record boundary, raises TornRecord if
    the damage is a torn tail (see `classify`) or CorruptRecord otherwise, each
    carrying `path` and the byte offset of the first bad record.
    """
    offset = 0
    end = len(buf)
    while offset < end:
        try:
            found = _record_at(buf, offset, path, offset)
        except CorruptRecord as damage:
            raise classify(buf, damage) from None
        if found is None:
            raise TornRecord(path, offset, _incomplete(buf, offset))
        payload, stop = found
        yield offset, payload
        offset = stop


def _incomplete(buf: bytes, offset: int) -> str:
    remaining = len(buf) - offset
    if remaining < HEADER_SIZE:
        return f"incomplete header ({remaining} of {HEADER_SIZE} bytes)"
    length = HEADER.unpack_from(buf, offset)[0]
    return f"incomplete payload ({remaining - HEADER_SIZE} of {length} bytes)"


def classify(buf: bytes, damage: CorruptRecord) -> TornRecord | CorruptRecord:
    """Tell a torn tail from corruption: damage is torn when no valid record
    starts anywhere after it (a crash mid-append leaves a record prefix, zeros,
    or a partly written page, never valid data after the damage).

    The search tries every offset after the damage, one checksum per byte of
    the remaining tail; real corruption usually finds the next record within
    one record length.
    """
    end = len(buf)
    for start in range(damage.offset + 1, end - HEADER_SIZE + 1):
        try:
            if _record_at(buf, start, damage.path, start) is not None:
                return damage
        except CorruptRecord:
            continue
    if not buf[damage.offset :].strip(b"\0"):
        reason = "zero-filled tail"
    elif damage.reason == "payload checksum mismatch":
        reason = "payload checksum mismatch in the last record"
    else:
        reason = f"{damage.reason}, and no valid record after it"
    return TornRecord(damage.path, damage.offset, reason)


class Decoder:
    """Incremental decoder: `feed()` bytes as they arrive (a file read in blocks,
    a network stream) and get whole records back, in order, with their offsets.

    It holds at most one partial record between calls, so a large file never
    has to be in memory at once. Every checksum failure is corruption here
    (use `scan()` where a torn tail must be told apart: the last WAL segment at
    start-up); a snapshot, written atomically, has no torn tail, and the
    backlog reader never reads past the durable watermark. Damage is reported
    after the good records before it: `feed()` returns those and the next
    `feed()` or `close()` raises, so a reader that stops early never sees it.
    """

    def __init__(self, path: str = "<stream>", offset: int = 0) -> None:
        self.path = path
        self._buf = bytearray()
        self._offset = offset  # stream offset of _buf[0]
        self._damage: CorruptRecord | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Whole records completed by `data`: (stream offset, payload)."""
        return [(offset, payload) for offset, payload, _ in self._decode(data, raw=False)]

    def feed_records(self, data: bytes) -> list[tuple[int, bytes, bytes]]:
        """Like feed(), with each record's encoded bytes too: (offset, payload, record)."""
        return self._decode(data, raw=True)

    def _decode(self, data: bytes, *, raw: bool) -> list[tuple[int, bytes, bytes]]:
        if self._damage is not None:
            raise self._damage
        buf = self._buf
        buf += data
        records = []
        pos = 0
        try:
            while (found := _record_at(buf, pos, self.path, self._offset + pos)) is not None:
                payload, stop = found
                records.append((self._offset + pos, payload, bytes(buf[pos:stop]) if raw else b""))
                pos = stop
        except CorruptRecord as damage:
            self._damage = damage
        del buf[:pos]
        self._offset += pos
        return records

    @property
    def pending(self) -> int:
        """Bytes held of a record not yet complete."""
        return len(self._buf)

    def close(self) -> None:
        """Raise the damage found, or TornRecord if the stream ended inside a record."""
        if self._damage is not None:
            raise self._damage
        if self._buf:
            raise TornRecord(
                self.path, self._offset, f"stream ends {len(self._buf)} bytes into a record"
            )

    @property
    def offset(self) -> int:
        """Bytes consumed so far as whole records."""
        return self._offset
