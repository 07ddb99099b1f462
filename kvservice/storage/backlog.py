"""The backlog reader: committed entries after a revision, read from the WAL on disk.

Segments are read in blocks through the incremental record decoder, so
memory stays bounded by one block and one record whatever the segment size.
A reader never returns a revision above the `until` its caller passes (the
durable watermark), so it never delivers a torn or not-yet-durable record.

A segment that is purged while a reader has it open stays readable (the open
descriptor keeps it); a reader that needs a segment already purged, or a
revision before the oldest segment, gets Compacted naming the oldest
revision still on disk.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from google.protobuf.message import DecodeError

from kvservice.errors import Compacted, CorruptRecord, StorageError
from kvservice.feed import Committed
from kvservice.storage import record
from kvservice.storage.segments import list_segments, segment_for, segment_revision
from kvservice.v1.log_pb2 import LogEntry

BLOCK_BYTES = 1 << 16


class BacklogReader:
    """Reads the entries after `after`, in revision order, a batch at a time."""

    def __init__(self, wal_dir: Path, after: int, *, block_bytes: int = BLOCK_BYTES) -> None:
        self.wal_dir = wal_dir
        # The last revision returned (the reader continues after it).
        self.position = after
        self.block_bytes = block_bytes
        self._fd: int | None = None
        self._segment: Path | None = None
        self._decoder = record.Decoder()
        self._ahead: deque[Committed] = deque()
        self._open_first()

    def read(
        self, until: int | None = None, *, max_entries: int = 1024, max_bytes: int = 4 << 20
    ) -> list[Committed]:
        """The next entries after `position`, none above `until` (None: to the end
        of what is on disk), at most `max_entries` and about `max_bytes` (always at
        least one entry when one is due). An empty list means caught up."""
        batch: list[Committed] = []
        size = 0
        while len(batch) < max_entries and size < max_bytes:
            if until is not None and self.position >= until:
                break
            item = self._next()
            if item is None:
                break
            batch.append(item)
            size += len(item.record)
            self.position = item.revision
        return batch

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BacklogReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------

    def _open_first(self) -> None:
        wanted = self.position + 1
        segments = list_segments(self.wal_dir)
        index = segment_for(segments, wanted)
        if index is None:
            raise Compacted(self.position, segment_revision(segments[0]) if segments else wanted)
        self._open(segments[index])

    def _open(self, segment: Path) -> None:
        try:
            fd = os.open(segment, os.O_RDONLY)
        except FileNotFoundError:
            raise Compacted(self.position, self._oldest()) from None
        self.close()
        self._fd, self._segment = fd, segment
        self._decoder = record.Decoder(str(segment))

    def _oldest(self) -> int:
        segments = list_segments(self.wal_dir)
        return segment_revision(segments[0]) if segments else self.position + 1

    def _next(self) -> Committed | None:
        """The entry at position + 1, or None when the log on disk ends before it."""
        wanted = self.position + 1
        while True:
            while self._ahead:
                item = self._ahead.popleft()
                if item.revision < wanted:
                    continue  # before the start point, in the first segment
                if item.revision != wanted:
                    raise CorruptRecord(
                        str(self._segment), 0,
                        f"revision {item.revision} where {wanted} was expected",
                    )  # fmt: skip
                return item
            if not self._fill():
                return None

    def _fill(self) -> bool:
        """Decode the next block into `_ahead`; False at the end of the log on disk."""
        assert self._fd is not None
        block = os.read(self._fd, self.block_bytes)
        if block:
            for offset, payload, raw in self._decoder.feed_records(block):
                self._ahead.append(Committed(self._entry(payload, offset), raw))
            return True
        return self._next_segment()

    def _entry(self, payload: bytes, offset: int) -> LogEntry:
        try:
            return LogEntry.FromString(payload)
        except DecodeError as exc:
            raise CorruptRecord(str(self._segment), offset, f"undecodable entry ({exc})") from exc

    def _next_segment(self) -> bool:
        """At the end of a segment: move to the one that continues it, if it exists."""
        assert self._segment is not None
        wanted = self.position + 1
        later = [s for s in list_segments(self.wal_dir) if s.name > self._segment.name]
        if not later:
            return False  # the end of the log (a torn tail stays in the decoder, unread)
        if self._decoder.pending:
            self._decoder.close()  # raises: a complete segment must end on a record
        first = segment_revision(later[0])
        if first > wanted:
            # The segment that held `wanted` is gone (or never existed: a WAL that
            # ended before a snapshot continues at the snapshot's revision + 1).
            raise Compacted(self.position, first)
        if first < wanted:
            raise StorageError(f"{later[0]}: starts at revision {first}, before {wanted}")
        self._open(later[0])
        return True
