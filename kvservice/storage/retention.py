"""Which WAL segments may be deleted, and deleting them.

A segment may go once every record in it is covered by the oldest snapshot
kept (recovery no longer needs it) and no registered holder still needs it.
Holders are the consumers that read the backlog: replicas catching up and
watch streams resuming. Each says which revision it has (it needs the ones
after it). So that a dead or stuck holder cannot fill the disk, the segments
kept only for holders are capped at `max_bytes` (setting
`wal_retention_max_bytes`): past it the oldest go anyway, and a holder that
needed them gets Compacted from the backlog reader and resyncs. On a primary
the newest `keep_bytes` behind the snapshots (`repl_backlog_bytes`) stay in
any case, so a replica that was away can resume by partial resync.

`purge` changes the file set: call it on the WAL's fsync thread
(`Wal.run_on_thread`), in order with rotations.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvservice.storage.files import fsync_dir
from kvservice.storage.segments import list_segments, segment_revision

log = logging.getLogger("kvservice.retention")


@dataclass(frozen=True)
class Hold:
    """A consumer's claim on the WAL after a revision."""

    name: str
    revision: Callable[[], int]


class Retention:
    """The registry of holders and the purge rule."""

    def __init__(self, wal_dir: Path, max_bytes: int, keep_bytes: int = 0) -> None:
        self.wal_dir = wal_dir
        self.max_bytes = max_bytes
        # The newest covered segments up to this size stay whoever holds them: the
        # replication backlog a returning replica resumes from (repl_backlog_bytes).
        self.keep_bytes = keep_bytes
        self._holds: dict[str, Hold] = {}

    def hold(self, name: str, revision: Callable[[], int]) -> None:
        """Keep the WAL after `revision()` (read at each purge) for consumer `name`."""
        self._holds[name] = Hold(name, revision)

    def release(self, name: str) -> None:
        self._holds.pop(name, None)

    def needed(self) -> int | None:
        """The lowest revision any holder has (None without holders)."""
        revisions = [hold.revision() for hold in self._holds.values()]
        return min(revisions) if revisions else None

    def purge(self, covered: int) -> list[Path]:
        """Delete segments wholly at or below `covered` (the oldest kept snapshot's
        revision) that no holder needs, within the byte cap; never the last one."""
        segments = list_segments(self.wal_dir)
        # A segment is wholly covered when the next one starts at or before covered + 1.
        candidates = [
            (path, segment_revision(following) - 1)
            for path, following in itertools.pairwise(segments)
            if segment_revision(following) <= covered + 1
        ]
        holders = {hold.name: hold.revision() for hold in self._holds.values()}
        held_bytes = kept_bytes = 0
        capped = False  # once a held segment goes, every older one goes too (no holes)
        removed = []
        # Newest first: the cap keeps the segments nearest to the holders' positions.
        for path, last_revision in reversed(candidates):
            wanted_by = [name for name, has in holders.items() if has < last_revision]
            size = _size(path)
            if kept_bytes < self.keep_bytes and not capped:
                kept_bytes += size
                continue
            if wanted_by and not capped and held_bytes + size <= self.max_bytes:
                held_bytes += size
                continue
            if wanted_by and not capped:
                capped = True
                log.warning(
                    "wal_retention_max_bytes reached: deleting a segment consumers still need",
                    extra={"segment": path.name, "holders": wanted_by,
                           "max_bytes": self.max_bytes},
                )  # fmt: skip
            removed.append(path)
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            fsync_dir(self.wal_dir)
        return sorted(removed)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
