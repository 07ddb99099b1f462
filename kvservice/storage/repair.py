"""`kvservice wal check` and `kvservice wal repair`.

check reads everything and writes nothing. repair cuts the log at the last
good record: the damaged file is first copied to `<name>.broken`, later
segments (which would now follow a gap) are renamed to `<name>.broken`, and
damaged snapshots are renamed likewise. Nothing is ever deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from kvservice.errors import CorruptRecord, StorageError, TornRecord
from kvservice.storage import record
from kvservice.storage.files import DataDirLocked, fsync_dir, lock_data_dir, truncate_durably
from kvservice.storage.recovery import recover
from kvservice.storage.segments import data_dirs, list_segments, list_snapshots, segment_revision
from kvservice.storage.snapshot import load_snapshot
from kvservice.v1.log_pb2 import LogEntry

log = logging.getLogger("kvservice.repair")
OK, NO_DATA_DIR, DAMAGED = 0, 2, 3


def check(data_dir: Path) -> int:
    """Report every problem found; return 0 when clean, 3 when anything is damaged."""
    if not data_dir.is_dir():
        _say(f"refused  {data_dir} is not a directory (a typo in --data-dir?)")
        return NO_DATA_DIR
    wal_dir, snap_dir = data_dirs(data_dir)
    problems: list[str] = []
    for _, path in list_snapshots(snap_dir) if snap_dir.exists() else []:
        try:
            snap = load_snapshot(path)
            _say(f"ok       {path} (revision {snap.revision}, {len(snap.data)} keys)")
        except StorageError as exc:
            problems.append(f"damaged  {exc}")
    segments = list_segments(wal_dir) if wal_dir.exists() else []
    for i, path in enumerate(segments):
        problems.extend(_check_segment(path, is_last=i == len(segments) - 1))
    try:
        result = recover(data_dir, repair_tail=False)
        _say(
            f"state    revision {result.store.revision}, {len(result.store)} keys "
            f"(snapshot {result.snapshot_revision} + {result.records_replayed} WAL records)"
        )
    except StorageError as exc:
        problems.append(f"refused  start-up would stop: {exc}")
    for problem in dict.fromkeys(problems):
        _say(problem)
    if problems:
        _say("damage found; see docs/runbook.md ('Node won't start')")
        return DAMAGED
    _say("clean")
    return OK


def _check_segment(path: Path, *, is_last: bool) -> list[str]:
    buf = path.read_bytes()
    count = 0
    try:
        for _ in record.scan(buf, str(path)):
            count += 1
    except TornRecord as exc:
        if is_last:
            return [f"torn     {exc} (start-up truncates it automatically)"]
        return [f"corrupt  {exc} (not the last segment)"]
    except CorruptRecord as exc:
        # record.scan classifies as start-up does, so check never calls
        # "corrupt" what start-up would simply cut off.
        return [f"corrupt  {exc} (needs `kvservice wal repair`, which loses what follows)"]
    _say(f"ok       {path} ({count} records, first revision {segment_revision(path)})")
    return []


def repair(data_dir: Path) -> int:
    """Make the data dir start-able again, losing as little as possible; 0 on success."""
    if not data_dir.is_dir():
        _say(f"refused  {data_dir} is not a directory (a typo in --data-dir?)")
        return NO_DATA_DIR
    try:
        lock = lock_data_dir(data_dir)
    except DataDirLocked as exc:
        _say(f"refused  {exc}; stop the node first")
        return DAMAGED
    try:
        _, snap_dir = data_dirs(data_dir)
        for _, path in list_snapshots(snap_dir) if snap_dir.exists() else []:
            try:
                load_snapshot(path)
            except StorageError as exc:
                _say(f"moved    damaged snapshot aside: {exc}")
                _move_aside(path)
        for _ in range(1000):  # each round fixes one damaged segment
            try:
                result = recover(data_dir, repair_tail=True)
            except CorruptRecord as exc:
                _cut_at(Path(exc.path), exc.offset, exc.reason)
                continue
            except StorageError as exc:
                _say(f"failed   cannot repair automatically: {exc}")
                return DAMAGED
            if result.torn_tail is not None:
                _say(f"cut      {result.torn_tail}")
            _say(f"repaired revision {result.store.revision}, {len(result.store)} keys")
            return OK
        return DAMAGED
    finally:
        lock.close()


def _cut_at(path: Path, offset: int, reason: str) -> None:
    wal_dir = path.parent
    kept = _broken_name(path)
    # The copy must be durable before the cut is, or a power loss could keep the
    # cut and lose the only full copy.
    shutil.copyfile(path, kept)
    with open(kept, "rb+") as copy:
        os.fsync(copy.fileno())
    fsync_dir(wal_dir)
    last_good = _last_revision_before(path, offset)
    truncate_durably(path, offset)
    _say(f"cut      {path} at byte {offset} ({reason}); original kept as {kept}")
    _say(f"lost     revisions after {last_good} are no longer in the log")
    for later in list_segments(wal_dir):
        if segment_revision(later) > segment_revision(path):
            _say(f"moved    {later} aside: it follows the cut, so its revisions cannot be replayed")
            _move_aside(later)
    fsync_dir(wal_dir)


def _last_revision_before(path: Path, offset: int) -> int:
    """Revision of the last record before `offset` (the one before the segment if none)."""
    last = segment_revision(path) - 1
    for _, payload in record.scan(path.read_bytes()[:offset], str(path)):
        last = LogEntry.FromString(payload).revision
    return last


def _broken_name(path: Path) -> Path:
    """`<name>.broken`, or `<name>.broken.N` so an earlier copy is never overwritten."""
    candidate = path.with_name(path.name + ".broken")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.broken.{n}")
        n += 1
    return candidate


def _move_aside(path: Path) -> None:
    path.rename(_broken_name(path))
    fsync_dir(path.parent)


def _say(line: str) -> None:
    print(line, flush=True)
