"""Installing a new state — a snapshot received in a full resync, or the
node's own state rewound to a fork point (storage/rewind.py) — crash-safely.

The replica keeps serving its old data while the snapshot arrives. The
transfer is written to `<data-dir>/resync/incoming.tmp`; once complete it is
verified (loaded), and the new data layout is staged beside the live one
(a rewind writes its snapshot into `resync/` and stages it the same way):

    resync/snap/<revision>.snap    the received snapshot
    resync/wal/<revision+1>.wal    an empty segment the log continues in
    resync/COMPLETE                written last (atomically): staging is done

Then `finish_install` swaps the directories: the live `wal/` and `snap/` are
renamed into `resync/old-*`, the staged ones into place, and `resync/` is
removed. Every step is a rename checked by existence, so a crash at any point
is finished by the next start (recovery calls `finish_install` first): with
COMPLETE the new state wins, without it the old state stays and the partial
transfer is discarded. The store is never half loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kvservice.storage.files import TMP_SUFFIX, create_atomically, fsync_dir, write_all
from kvservice.storage.segments import create_segment, data_dirs, snapshot_name

RESYNC_DIR = "resync"
INCOMING = "incoming" + TMP_SUFFIX
COMPLETE = "COMPLETE"


class Incoming:
    """The snapshot file being received, piece by piece, at known offsets."""

    def __init__(self, data_dir: Path, transfer_id: str) -> None:
        self.transfer_id = transfer_id
        self.dir = begin_staging(data_dir)
        self.path = self.dir / INCOMING
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0

    def write(self, data: bytes) -> None:
        write_all(self._fd, data)
        self.size += len(data)

    def finish(self) -> Path:
        """Make the received bytes durable and close the file."""
        try:
            os.fsync(self._fd)
        finally:
            self.close()
        return self.path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def begin_staging(data_dir: Path) -> Path:
    """An empty `resync/` to stage in (anything unfinished there is discarded)."""
    discard_install(data_dir)
    resync = data_dir / RESYNC_DIR
    resync.mkdir(parents=True)
    return resync


def stage_install(data_dir: Path, received: Path, revision: int) -> None:
    """Lay out the new data dir beside the live one and mark it COMPLETE
    (`received`: a verified snapshot file inside `resync/`, at `revision`)."""
    resync = data_dir / RESYNC_DIR
    snap, wal = resync / "snap", resync / "wal"
    for directory in (snap, wal):
        directory.mkdir(exist_ok=True)
    os.replace(received, snap / snapshot_name(revision))
    fsync_dir(snap)
    create_segment(wal, revision + 1)
    fsync_dir(resync)
    create_atomically(resync / COMPLETE, [str(revision).encode()])


def finish_install(data_dir: Path) -> bool:
    """Complete (or discard) a staged install; True when a new state was put in place."""
    resync = data_dir / RESYNC_DIR
    if not resync.exists():
        return False
    if not (resync / COMPLETE).exists():
        discard_install(data_dir)
        return False
    for live, name in zip(data_dirs(data_dir), ("wal", "snap"), strict=True):
        staged, old = resync / name, resync / f"old-{name}"
        if staged.exists():
            if live.exists() and not old.exists():
                os.replace(live, old)
            os.replace(staged, live)
        fsync_dir(data_dir)
    shutil.rmtree(resync)
    fsync_dir(data_dir)
    return True


def discard_install(data_dir: Path) -> None:
    """Forget an unfinished transfer (the live state was never touched)."""
    resync = data_dir / RESYNC_DIR
    if resync.exists():
        shutil.rmtree(resync)
        fsync_dir(data_dir)
