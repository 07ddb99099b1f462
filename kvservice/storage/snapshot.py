"""Snapshot files: the whole store at one revision.

A snapshot is `<data-dir>/snap/%016x.snap`, named by its revision, made of
records (see record.py): one `SnapshotHeader`, then `SnapshotChunk`s of up to
CHUNK_KEYS keys each, then one `SnapshotTrailer`. It is written to a `.tmp`
file, fsynced, renamed and the directory fsynced, so a crash leaves either the
old set of snapshots or the new one. Any damage to a snapshot is therefore
corruption (never a torn tail), and a damaged snapshot is never loaded.

Background snapshots are written by a separate process (storage/compact.py),
never by a fork of the threaded server: see snapshots.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from kvservice.engine import digest_of
from kvservice.errors import CorruptRecord, StorageError, TornRecord
from kvservice.storage import record
from kvservice.storage.files import create_atomically, fsync_dir
from kvservice.storage.segments import list_snapshots, snapshot_name
from kvservice.v1.log_pb2 import SnapshotChunk, SnapshotHeader, SnapshotTrailer

CHUNK_KEYS = 4096
# A chunk also ends once its values pass this size, so large values never make a
# record anywhere near record.MAX_PAYLOAD (4096 values of 1 MiB would).
CHUNK_BYTES = 4 * 1024 * 1024
# How many snapshots to keep: the newest, and one to fall back on if it is damaged.
KEEP_SNAPSHOTS = 2


def encode_snapshot(
    data: dict[str, bytes], revision: int, digest: int | None = None
) -> Iterator[bytes]:
    """Yield the records of a snapshot of `data` (revision-prefixed values)."""
    header = SnapshotHeader(
        revision=revision, key_count=len(data), created_unix_ms=int(time.time() * 1000),
        digest=digest_of(data.items()) if digest is None else digest,
    )  # fmt: skip
    yield record.encode(header.SerializeToString())
    keys: list[str] = []
    values: list[bytes] = []
    size = 0
    for key, value in data.items():
        keys.append(key)
        values.append(value)
        size += len(key) + len(value)
        if len(keys) == CHUNK_KEYS or size >= CHUNK_BYTES:
            yield _chunk_record(keys, values)
            keys, values, size = [], [], 0
    if keys:
        yield _chunk_record(keys, values)
    yield record.encode(SnapshotTrailer(key_count=len(data)).SerializeToString())


def _chunk_record(keys: list[str], values: list[bytes]) -> bytes:
    return record.encode(SnapshotChunk(keys=keys, revisioned_values=values).SerializeToString())


def write_snapshot(
    snap_dir: Path, data: dict[str, bytes], revision: int, digest: int | None = None
) -> Path:
    """Write a snapshot durably; return its path."""
    records = encode_snapshot(data, revision, digest)
    return create_atomically(snap_dir / snapshot_name(revision), records)


@dataclass
class LoadedSnapshot:
    revision: int
    data: dict[str, bytes]  # key -> revision-prefixed value, ready for Store.load
    path: Path
    digest: int | None = None  # None: written before snapshots carried one


READ_BLOCK = 1 << 20


def load_snapshot(path: Path, *, check_name: bool = True) -> LoadedSnapshot:
    """Read and verify a snapshot; raise CorruptRecord naming file and offset on damage.

    The file is read in blocks and decoded as it comes, so loading needs memory
    for the store and one block, not a second copy of the whole file.
    """
    name = str(path)
    loader = _Loader(name)
    decoder = record.Decoder(name)
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BLOCK):
                for offset, payload in decoder.feed(block):
                    loader.add(offset, payload)
        decoder.close()
    except TornRecord as exc:
        raise CorruptRecord(name, exc.offset, exc.reason) from exc
    header = loader.finish(decoder.offset)
    expected = snapshot_name(header.revision)
    if check_name and path.name != expected:
        raise StorageError(f"{name}: header revision {header.revision} belongs in {expected}")
    digest = header.digest if header.HasField("digest") else None
    return LoadedSnapshot(revision=header.revision, data=loader.data, path=path, digest=digest)


class _Loader:
    """Checks the header, chunks, trailer sequence and fills the dict."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Filled chunk by chunk: collecting (key, value) tuples first costs ~64 B/key
        # of pymalloc arenas that stay mapped after the tuples are freed.
        self.data: dict[str, bytes] = {}
        self.seen = 0
        self.header: SnapshotHeader | None = None
        self.trailer: SnapshotTrailer | None = None

    def add(self, offset: int, payload: bytes) -> None:
        try:
            self._add(offset, payload)
        except DecodeError as exc:
            raise CorruptRecord(self.name, offset, f"undecodable record ({exc})") from exc

    def _add(self, offset: int, payload: bytes) -> None:
        if self.trailer is not None:
            raise CorruptRecord(self.name, offset, "data after the snapshot trailer")
        if self.header is None:
            self.header = SnapshotHeader.FromString(payload)
        elif self.seen == self.header.key_count:
            self.trailer = SnapshotTrailer.FromString(payload)
        else:
            chunk = SnapshotChunk.FromString(payload)
            if len(chunk.keys) != len(chunk.revisioned_values):
                raise CorruptRecord(self.name, offset, "chunk with unequal key and value counts")
            self.data.update(zip(chunk.keys, chunk.revisioned_values, strict=True))
            self.seen += len(chunk.keys)

    def finish(self, end: int) -> SnapshotHeader:
        header, trailer = self.header, self.trailer
        if header is None or trailer is None:
            raise CorruptRecord(self.name, end, "snapshot ends before its trailer")
        if not trailer.key_count == header.key_count == self.seen == len(self.data):
            raise CorruptRecord(
                self.name, end,
                f"{self.seen} keys ({len(self.data)} distinct), header says {header.key_count}",
            )  # fmt: skip
        return header


def prune_snapshots(snap_dir: Path, keep: int = KEEP_SNAPSHOTS) -> int:
    """Delete all but the newest `keep` snapshots; return the oldest revision kept."""
    snaps = list_snapshots(snap_dir)
    for _, path in snaps[keep:]:
        path.unlink()
    if len(snaps) > keep:
        fsync_dir(snap_dir)
    kept = snaps[:keep]
    return kept[-1][0] if kept else 0
