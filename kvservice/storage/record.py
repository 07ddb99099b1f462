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

Damage is classified while scanning a buffer:
- *torn*: the buffer ends inside a record (fewer than 12 header bytes, or a
  valid header whose payload runs past the end), the last record's payload
  checksum fails, or everything from a bad header to the end is zero bytes
  (file systems may extend a file with zeros before the data lands).
  A crash mid-append produces exactly these, so the tail may be cut off.
- *corrupt*: any other checksum failure, i.e. damage with valid data after it.
  That is never a crash artefact, so nothing is cut off automatically.
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


def scan(buf: bytes, path: str = "<buffer>") -> Iterator[tuple[int, bytes]]:
    """Yield (offset, payload) for each valid record of `buf`, in order.

    Raises TornRecord or CorruptRecord (carrying `path` and the byte offset of
    the first bad record) when the buffer does not end on a clean boundary.
    """
    end = len(buf)
    offset = 0
    while offset < end:
        remaining = end - offset
        if remaining < HEADER_SIZE:
            reason = f"incomplete header ({remaining} of {HEADER_SIZE} bytes)"
            raise TornRecord(path, offset, reason)
        length, payload_crc, header_crc = HEADER.unpack_from(buf, offset)
        if crc32c(buf[offset : offset + 8]) != header_crc:
            if not buf[offset:].strip(b"\0"):
                raise TornRecord(path, offset, "zero-filled tail")
            raise CorruptRecord(path, offset, "header checksum mismatch")
        if length > MAX_PAYLOAD:
            raise CorruptRecord(path, offset, f"payload length {length} exceeds {MAX_PAYLOAD}")
        start = offset + HEADER_SIZE
        stop = start + length
        if stop > end:
            raise TornRecord(path, offset, f"incomplete payload ({end - start} of {length} bytes)")
        payload = buf[start:stop]
        if crc32c(payload) != payload_crc:
            if stop == end:
                raise TornRecord(path, offset, "payload checksum mismatch in the last record")
            raise CorruptRecord(path, offset, "payload checksum mismatch")
        yield offset, payload
        offset = stop


class Decoder:
    """Incremental decoder: `feed()` bytes as they arrive (a file read in blocks,
    a network stream) and get whole records back, in order, with their offsets.

    It holds at most one partial record between calls, so a large file never
    has to be in memory at once. Every checksum failure is corruption here:
    use `scan()` where a torn tail must be told apart (the last WAL segment);
    a snapshot, written atomically, has no torn tail.
    """

    def __init__(self, path: str = "<stream>") -> None:
        self.path = path
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        records = []
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            length, payload_crc, header_crc = HEADER.unpack_from(buf, pos)
            at = self._offset + pos
            if crc32c(bytes(buf[pos : pos + 8])) != header_crc:
                raise CorruptRecord(self.path, at, "header checksum mismatch")
            if length > MAX_PAYLOAD:
                raise CorruptRecord(self.path, at, f"payload length {length} exceeds {MAX_PAYLOAD}")
            stop = pos + HEADER_SIZE + length
            if stop > len(buf):
                break
            payload = bytes(buf[pos + HEADER_SIZE : stop])
            if crc32c(payload) != payload_crc:
                raise CorruptRecord(self.path, at, "payload checksum mismatch")
            records.append((at, payload))
            pos = stop
        del buf[:pos]
        self._offset += pos
        return records

    def close(self) -> None:
        """Raise TornRecord if the stream ended inside a record."""
        if self._buf:
            raise TornRecord(
                self.path, self._offset, f"stream ends {len(self._buf)} bytes into a record"
            )

    @property
    def offset(self) -> int:
        """Bytes consumed so far as whole records."""
        return self._offset
