"""Domain errors. `service.py` is the one place that maps them to Connect codes."""

from __future__ import annotations


class KVError(Exception):
    """Base class of every error kvservice raises on purpose."""


class InvalidArgument(KVError):
    """The request itself is wrong (empty key, oversized key or value, bad encoding)."""


class ResourceExhausted(KVError):
    """A configured limit was reached; retrying the same request will not help."""


class Unavailable(KVError):
    """The node cannot serve this now (e.g. the disk refused a write: fail-stop)."""


class Unauthenticated(KVError):
    """The caller sent no credential, or one that is unknown, expired or badly signed."""


class PermissionDenied(KVError):
    """The caller is known but lacks the role or the key prefix this request needs."""


class StorageError(KVError):
    """The on-disk state is unusable; raised at start-up, by `wal check` and snapshots."""


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
