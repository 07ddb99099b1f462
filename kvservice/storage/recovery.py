"""Start-up recovery: newest valid snapshot, then replay of the WAL after it.

Also the read-only walk behind `kvservice wal check`: `recover(...,
repair_tail=False)` classifies damage without touching a file.

Damage is classified by the codec's one rule (record.classify): in the last
segment a torn tail is cut off; anywhere else any damage is corruption.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import DecodeError

from kvservice.engine import Store
from kvservice.errors import CorruptRecord, RevisionGap, StorageError, TornRecord
from kvservice.storage import record
from kvservice.storage.files import fsync_dir, remove_stale_tmp, truncate_durably
from kvservice.storage.install import finish_install
from kvservice.storage.segments import (
    create_segment,
    data_dirs,
    list_segments,
    list_snapshots,
    segment_for,
    segment_revision,
)
from kvservice.storage.snapshot import LoadedSnapshot, load_snapshot
from kvservice.v1.log_pb2 import LogEntry

log = logging.getLogger("kvservice.recovery")


@dataclass
class Recovery:
    """What recovery found and did; logged at start-up and exported as metrics."""

    store: Store
    snapshot_revision: int = 0
    snapshot_path: Path | None = None
    records_replayed: int = 0
    segments: int = 0
    wal_bytes: int = 0
    torn_tail: TornRecord | None = None
    damaged_snapshots: list[str] = field(default_factory=list)
    damaged_snapshot_paths: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    active_segment: Path | None = None
    # Revision the next record appended to active_segment would have to carry.
    active_next_revision: int = 1


def recover(data_dir: Path, *, repair_tail: bool = True) -> Recovery:
    """Rebuild the store from disk.

    With repair_tail, a torn tail of the last segment is truncated (and logged),
    stale `.tmp` files are removed, and an empty segment is created for a new
    data dir or when the snapshot is ahead of the end of the WAL. Without it
    nothing is written. Damage anywhere else raises
    StorageError naming the file and byte offset.
    """
    started = time.monotonic()
    wal_dir, snap_dir = data_dirs(data_dir)
    if repair_tail:
        data_dir.mkdir(parents=True, exist_ok=True)
        # A full resync or a rewind to a fork point interrupted by a crash: finished
        # when staged, else discarded.
        if finish_install(data_dir):
            log.warning("finished installing a staged state (full resync or rewind)")
        for directory in (wal_dir, snap_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_tmp(wal_dir) + remove_stale_tmp(snap_dir):
            log.warning("removed unfinished file", extra={"path": str(stale)})
    result = Recovery(store=Store())
    _load_newest_snapshot(snap_dir, result)
    segments = list_segments(wal_dir) if wal_dir.exists() else []
    segments = _without_empty_segments(segments, remove=repair_tail)
    _replay(segments, result, repair_tail=repair_tail)
    if repair_tail and result.active_segment is None:
        result.active_segment = create_segment(wal_dir, result.store.revision + 1)
    elif repair_tail and result.active_next_revision != result.store.revision + 1:
        # The snapshot is ahead of the end of the WAL: it was taken (and fsynced)
        # while its last records were not yet fsynced, and a power loss took them.
        # Appending revision store+1 to the old segment would leave a gap inside
        # it (or a record that contradicts the file name, which stops the next
        # start-up), so the log goes on in a new segment named by that revision.
        log.warning(
            "WAL ends before the snapshot; starting a new segment",
            extra={"wal_end_revision": result.active_next_revision - 1,
                   "snapshot_revision": result.snapshot_revision},
        )  # fmt: skip
        result.active_segment = create_segment(wal_dir, result.store.revision + 1)
        result.active_next_revision = result.store.revision + 1
    if repair_tail:
        _set_damaged_snapshots_aside(result)
    result.seconds = time.monotonic() - started
    return result


def _without_empty_segments(segments: list[Path], *, remove: bool) -> list[Path]:
    """Leave empty segments out of replay (and delete them when `remove`).

    They hold nothing, and their names would mislead: an empty segment after
    the real end of the log would make a torn tail in the segment before it look
    like damage "before the last segment", and a name claiming revisions the
    file lacks would mislead WAL purging. Older versions could leave one when a
    crash came between creating a segment and writing the previous one's last
    records; the log goes on in a segment named store revision + 1.
    """
    kept = []
    for path in segments:
        if path.stat().st_size > 0:
            kept.append(path)
        elif remove:
            path.unlink()
            fsync_dir(path.parent)
            log.warning("removed empty WAL segment", extra={"path": str(path)})
    return kept


def _set_damaged_snapshots_aside(result: Recovery) -> None:
    """Rename damaged snapshots to `.broken` once recovery has succeeded without them.

    Left in place, a damaged snapshot would count as one of the two kept, and
    the next snapshot would delete the good older one (and the WAL behind it).
    """
    for path in result.damaged_snapshot_paths:
        broken = path.with_name(path.name + ".broken")
        path.rename(broken)
        fsync_dir(path.parent)
        log.error("damaged snapshot set aside", extra={"path": str(broken)})


def load_newest_snapshot(
    snap_dir: Path, damaged: list[tuple[Path, StorageError]] | None = None
) -> LoadedSnapshot | None:
    """The newest snapshot that loads cleanly; damaged ones are skipped (and listed)."""
    if not snap_dir.exists():
        return None
    for _, path in list_snapshots(snap_dir):
        try:
            return load_snapshot(path)
        except StorageError as exc:
            # Never load a damaged snapshot; an older one plus a longer replay
            # gives the same state, and the replay proves the WAL reaches back.
            log.error("damaged snapshot skipped", extra={"error": str(exc)})
            if damaged is not None:
                damaged.append((path, exc))
    return None


def _load_newest_snapshot(snap_dir: Path, result: Recovery) -> None:
    damaged: list[tuple[Path, StorageError]] = []
    snap = load_newest_snapshot(snap_dir, damaged)
    result.damaged_snapshots.extend(str(exc) for _, exc in damaged)
    result.damaged_snapshot_paths.extend(path for path, _ in damaged)
    if snap is not None:
        result.store.load(snap.data, snap.revision, snap.digest)
        result.snapshot_revision = snap.revision
        result.snapshot_path = snap.path


def _replay(segments: list[Path], result: Recovery, *, repair_tail: bool) -> None:
    store = result.store
    if not segments:
        if store.revision == 0 and result.damaged_snapshots:
            raise StorageError("every snapshot is damaged and there is no WAL to rebuild from")
        return
    needed = segments[segment_for(segments, store.revision + 1) or 0 :]
    first = segment_revision(needed[0])
    if first > store.revision + 1:
        raise StorageError(
            f"{needed[0]}: the WAL starts at revision {first} but the state on disk ends at "
            f"revision {store.revision}; revisions in between are missing"
        )
    for i, path in enumerate(needed):
        is_last = i == len(needed) - 1
        buf = path.read_bytes()
        result.segments += 1
        valid_end = _replay_segment(path, buf, store, result, is_last=is_last)
        result.wal_bytes += valid_end
        if valid_end != len(buf) and repair_tail:
            truncate_durably(path, valid_end)
            log.warning(
                "torn WAL tail truncated",
                extra={
                    "path": str(path),
                    "offset": valid_end,
                    "bytes_dropped": len(buf) - valid_end,
                },
            )
    result.active_segment = needed[-1]


def _replay_segment(
    path: Path, buf: bytes, store: Store, result: Recovery, *, is_last: bool
) -> int:
    """Apply the records of one segment; return the offset where valid data ends."""
    name = str(path)
    expected_first = segment_revision(path)
    result.active_next_revision = expected_first
    records = record.scan(buf, name)
    while True:
        # Only damage found by the codec may be a torn tail; a well-framed record
        # that cannot be applied (below) is corruption wherever it sits.
        try:
            offset, payload = next(records)
        except StopIteration:
            return len(buf)
        except TornRecord as torn:
            if not is_last:
                raise CorruptRecord(
                    name, torn.offset, f"{torn.reason} before the last segment"
                ) from torn
            result.torn_tail = torn
            return torn.offset
        entry = _decode(payload, name, offset)
        if offset == 0 and entry.revision != expected_first:
            raise CorruptRecord(name, 0, f"first revision {entry.revision} != file name")
        result.active_next_revision = entry.revision + 1
        if entry.revision <= store.revision:
            continue  # already in the snapshot
        try:
            store.apply(entry)
        except (RevisionGap, ValueError) as exc:
            raise CorruptRecord(name, offset, str(exc)) from exc
        result.records_replayed += 1


def _decode(payload: bytes, name: str, offset: int) -> LogEntry:
    try:
        return LogEntry.FromString(payload)
    except DecodeError as exc:
        raise CorruptRecord(name, offset, f"undecodable log entry ({exc})") from exc
