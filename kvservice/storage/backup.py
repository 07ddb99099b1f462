"""Backups: a snapshot file whose header also names the replication history.

`kvservice backup` receives the bytes from a live node (Admin/Backup, which
takes a snapshot and streams it with a rewritten header) and writes them
atomically after checking the SHA-256 and every record. `kvservice restore`
makes a data dir from such a file: `snap/<revision>.snap`, an empty WAL
segment for revision + 1, and (cli.py) `replication.json` remembering the
backup's history as the previous one — started as a primary the node makes a new
history that continues it; started as a replica it resumes by partial resync
from the backup's revision when its primary's history continues the backup's.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from kvservice.errors import StorageError
from kvservice.storage import record
from kvservice.storage.files import create_atomically, fsync_dir
from kvservice.storage.segments import create_segment, data_dirs, snapshot_name
from kvservice.storage.snapshot import LoadedSnapshot, load_snapshot
from kvservice.v1.log_pb2 import SnapshotHeader

CHUNK_BYTES = 1 << 20


def backup_stream(snapshot: Path, replication_id: str, epoch: int) -> Iterator[bytes]:
    """The backup's bytes: the snapshot with its header record rewritten to carry
    the history; the rest of the file unchanged (read in bounded chunks)."""
    header, end = _first_record(snapshot)
    header.replication_id, header.epoch = replication_id, epoch
    yield record.encode(header.SerializeToString())
    with open(snapshot, "rb") as f:
        f.seek(end)
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def restore(backup: Path, data_dir: Path, *, force: bool) -> tuple[LoadedSnapshot, SnapshotHeader]:
    """Create a data dir from a backup file; refuse a non-empty one unless `force`
    (then its old contents are moved into `pre-restore-<time>/`, never deleted).
    The caller records the backup's history (replication.json)."""
    loaded = load_snapshot(backup, check_name=False)  # every record checked
    header = read_header(backup)
    data_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in data_dir.iterdir() if p.name != "LOCK"]
    if existing:
        if not force:
            names = ", ".join(sorted(p.name for p in existing))
            raise StorageError(f"{data_dir} is not empty ({names}); use --force to set it aside")
        aside = data_dir / f"pre-restore-{int(time.time())}"
        aside.mkdir()
        for path in existing:
            os.replace(path, aside / path.name)
        fsync_dir(data_dir)
    wal_dir, snap_dir = data_dirs(data_dir)
    for directory in (wal_dir, snap_dir):
        directory.mkdir()
    with open(backup, "rb") as f:
        chunks = iter(lambda: f.read(CHUNK_BYTES), b"")
        create_atomically(snap_dir / snapshot_name(loaded.revision), chunks)
    create_segment(wal_dir, loaded.revision + 1)
    fsync_dir(data_dir)
    return loaded, header


def read_header(path: Path) -> SnapshotHeader:
    return _first_record(path)[0]


def _first_record(path: Path) -> tuple[SnapshotHeader, int]:
    """The header record of a snapshot file and the offset where it ends."""
    with open(path, "rb") as f:
        decoder = record.Decoder(str(path))
        while block := f.read(4096):
            if found := decoder.feed(block):
                offset, payload = found[0]
                return SnapshotHeader.FromString(payload), offset + record.HEADER_SIZE + len(
                    payload
                )
    raise StorageError(f"{path} has no snapshot header")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
