"""Domain errors, named after what went wrong.

`api` code (service.py) is the one place that maps them to Connect codes;
nothing below it knows about the transport.
"""

from __future__ import annotations


class KVError(Exception):
    """Base class of every error kvservice raises on purpose."""


class InvalidArgument(KVError):
    """The request itself is wrong (empty key, oversized key or value, bad encoding)."""


class ResourceExhausted(KVError):
    """A configured limit was reached; retrying the same request will not help."""


class ConditionFailed(KVError):
    """Compare-and-set: the key's revision is not the one the request named."""


class KeyNotFound(KVError):
    """The operation needs the key to exist (Touch)."""


class NotACounter(KVError):
    """Increment of a value that is not a decimal int64, or a result that overflows."""


class WalFailed(KVError):
    """The WAL refused a write or fsync, or its flusher died: the node is read-only now."""


class NotPrimary(KVError):
    """A write reached a replica (or a fenced former primary); it names the primary."""

    def __init__(
        self, primary_url: str | None, why: str = "this node is a read-only replica"
    ) -> None:
        where = f"the primary at {primary_url}" if primary_url else "the primary"
        super().__init__(f"{why}: send writes to {where}")
        self.primary_url = primary_url


class ReplicasNotReached(KVError):
    """Fewer replicas than asked acknowledged a write in time (it stays committed)."""


class NotEnoughReplicas(KVError):
    """min_replicas: too few healthy replicas, so this primary takes no writes now."""


class RevisionNotReached(KVError):
    """A read asked for a revision this node has not applied within the wait allowed."""


class NotLinked(KVError):
    """A replica is not linked to its primary, so it cannot promise to catch up."""


class ReplicationRefused(KVError):
    """A replication request that this node will not act on (wrong role, epoch, ...)."""


class ShuttingDown(KVError):
    """The node is closing and takes no more writes."""


class SnapshotFailed(KVError):
    """A snapshot could not be written (the reason is in the log and the message)."""


class Compacted(KVError):
    """The revisions asked for are no longer in the WAL on disk (purged after a snapshot)."""

    def __init__(self, after: int, oldest: int) -> None:
        super().__init__(
            f"revisions after {after} are compacted; the oldest revision still in the WAL"
            f" is {oldest}"
        )
        self.after = after
        self.oldest = oldest


class CannotRewind(KVError):
    """A node's own files no longer reach back to the revision it must rewind to."""


class FeedOverflow(KVError):
    """A commit feed subscriber fell too far behind; it resumes from the backlog."""

    def __init__(self, last_revision: int, limit: int) -> None:
        super().__init__(
            f"subscriber fell more than {limit} entries behind after revision {last_revision};"
            " resume from the backlog"
        )
        self.last_revision = last_revision


def resume_hint(last_revision: int) -> str:
    """How a watch stream that ended can resume without a gap."""
    return (
        f"every change up to revision {last_revision} was delivered: watch again from"
        f" revision {last_revision + 1}"
    )


class WatchTooSlow(ResourceExhausted):
    """A watch stream's consumer fell further behind than the stream's buffer allows."""

    def __init__(self, last_revision: int, why: str) -> None:
        super().__init__(f"{why}; {resume_hint(last_revision)}")
        self.last_revision = last_revision


class StorageReplaced(KVError):
    """A full resync replaced this replica's store: what read the old one must start over."""


class Unauthenticated(KVError):
    """The caller sent no credential, or one that is unknown, expired or badly signed."""


class PermissionDenied(KVError):
    """The caller is known but lacks the role or the key prefix this request needs."""


class StorageError(KVError):
    """The on-disk state is unusable; raised at start-up, by `wal check` and snapshots."""


class RevisionGap(StorageError):
    """An entry does not carry the next revision; applying it would fork history."""


class CorruptRecord(StorageError):
    """A record failed validation somewhere other than the torn tail of the log."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class TornRecord(StorageError):
    """The last record of a file is incomplete (a write cut short by a crash)."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: torn record at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason
