"""Rewinding a node's own data to the fork point of a promotion.

A demoted primary (or a replica that got entries the promoted one never
did) holds revisions past the point where the new primary's history leaves
its own. Those entries are first copied, as WAL records, to
`<data-dir>/diverged/<first>-<last>-<unix time>.wal` (`save_diverged`): never
discarded silently. Then the node rebuilds its state at the fork revision
from its own files — the newest snapshot at or before the fork (or an empty
store when the WAL reaches back to revision 1), plus its WAL records up to
and including the fork (`state_at`) — and stages it exactly as a full
resync stages a received snapshot (`stage_rewind`, storage/install.py:
`resync/`, COMPLETE written last). The switch, and the recovery of a crash
at any step, are the full resync's: the node comes back on its old state or
on the rewound one, never in between. It then resumes from the fork by
partial resync.

When its files no longer reach back to the fork (snapshots and WAL
compacted past it), `CannotRewind` says why; the caller falls back to a full
resync.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvservice.engine import Store
from kvservice.errors import CannotRewind, Compacted, StorageError
from kvservice.storage.backlog import BacklogReader
from kvservice.storage.files import create_atomically
from kvservice.storage.install import begin_staging, stage_install
from kvservice.storage.segments import data_dirs, list_snapshots
from kvservice.storage.snapshot import encode_snapshot, load_snapshot

log = logging.getLogger("kvservice.rewind")

DIVERGED_DIR = "diverged"
# The rewound state's snapshot while it is written into the staging dir.
REWOUND = "rewound.snap"


@dataclass(frozen=True)
class Rewound:
    """A state rebuilt at an earlier revision, and what it was rebuilt from."""

    store: Store
    base_revision: int  # the snapshot it started from (0: an empty store)
    replayed: int  # WAL records applied on top of it


def save_diverged(data_dir: Path, fork: int, last: int) -> tuple[Path, int]:
    """Copy this node's WAL records after `fork` (up to `last`) to `diverged/`;
    return (file, count). Saving the same range again (a rewind interrupted by a
    crash and retried) reuses the identical file instead of writing a copy."""
    wal_dir, _ = data_dirs(data_dir)
    records: list[bytes] = []
    try:
        with BacklogReader(wal_dir, fork) as reader:
            while batch := reader.read(last):
                records += [item.record for item in batch]
    except Compacted as exc:
        # A snapshot since the fork purged them: only that snapshot holds them now.
        log.error("diverged entries no longer in the WAL", extra={"error": str(exc)})
    target = data_dir / DIVERGED_DIR
    target.mkdir(exist_ok=True)
    prefix = f"{fork + 1:016x}-{last:016x}-"
    content = b"".join(records)
    for earlier in sorted(target.glob(f"{prefix}*.wal")):
        if earlier.read_bytes() == content:
            return earlier, len(records)
    path = create_atomically(target / f"{prefix}{int(time.time())}.wal", [content])
    return path, len(records)


def state_at(data_dir: Path, revision: int) -> Rewound:
    """This node's state at `revision`, rebuilt from its own snapshots and WAL.

    Bases are tried newest first (a damaged or vanished snapshot is skipped, as
    recovery skips one); CannotRewind lists why each failed.
    """
    wal_dir, snap_dir = data_dirs(data_dir)
    failures: list[str] = []
    for base, path in _bases(snap_dir, revision):
        try:
            store = Store()
            if path is not None:
                snapshot = load_snapshot(path)
                store.load(snapshot.data, snapshot.revision, snapshot.digest)
            replayed = _replay_to(store, wal_dir, revision)
            return Rewound(store, base, replayed)
        except (CannotRewind, StorageError, Compacted, OSError, ValueError) as exc:
            failures.append(f"from {'snapshot ' + str(base) if path else 'empty'}: {exc}")
    raise CannotRewind(
        f"no snapshot at or before revision {revision} with the WAL after it"
        f" ({'; '.join(failures)})"
    )


def _bases(snap_dir: Path, revision: int) -> Iterator[tuple[int, Path | None]]:
    """Snapshots at or before `revision`, newest first, then the empty store."""
    if snap_dir.exists():
        for base, path in list_snapshots(snap_dir):
            if base <= revision:
                yield base, path
    yield 0, None


def _replay_to(store: Store, wal_dir: Path, revision: int) -> int:
    """Apply the WAL records after the store's revision up to `revision`; return how many."""
    replayed = 0
    with BacklogReader(wal_dir, store.revision) as reader:
        while store.revision < revision:
            batch = reader.read(revision)
            if not batch:
                raise CannotRewind(
                    f"the WAL ends at revision {store.revision}, before revision {revision}"
                )
            for item in batch:
                store.apply(item.entry)
            replayed += len(batch)
    return replayed


def stage_rewind(data_dir: Path, store: Store) -> None:
    """Stage `store` as the node's next data (a snapshot at its revision and an
    empty WAL segment after it), COMPLETE last; storage/install.py switches."""
    staging = begin_staging(data_dir)
    snapshot = encode_snapshot(store.data, store.revision, store.digest)
    path = create_atomically(staging / REWOUND, snapshot)
    stage_install(data_dir, path, store.revision)
