from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DigestRequest(_message.Message):
    __slots__ = ("min_revision", "buckets", "list_buckets")
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    LIST_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    min_revision: int
    buckets: int
    list_buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, min_revision: _Optional[int] = ..., buckets: _Optional[int] = ..., list_buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class DigestResponse(_message.Message):
    __slots__ = ("revision", "digest", "bucket_digests", "keys")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BUCKET_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    digest: int
    bucket_digests: _containers.RepeatedScalarFieldContainer[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyDigest]
    def __init__(self, revision: _Optional[int] = ..., digest: _Optional[int] = ..., bucket_digests: _Optional[_Iterable[int]] = ..., keys: _Optional[_Iterable[_Union[KeyDigest, _Mapping]]] = ...) -> None: ...

class KeyDigest(_message.Message):
    __slots__ = ("key", "revision", "hash", "bucket")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    key: str
    revision: int
    hash: int
    bucket: int
    def __init__(self, key: _Optional[str] = ..., revision: _Optional[int] = ..., hash: _Optional[int] = ..., bucket: _Optional[int] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackupResponse(_message.Message):
    __slots__ = ("data", "revision", "sha256", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    revision: int
    sha256: str
    size: int
    def __init__(self, data: _Optional[bytes] = ..., revision: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class FailoverRequest(_message.Message):
    __slots__ = ("to",)
    TO_FIELD_NUMBER: _ClassVar[int]
    to: str
    def __init__(self, to: _Optional[str] = ...) -> None: ...

class FailoverResponse(_message.Message):
    __slots__ = ("revision", "write_pause_ms", "replication_id", "epoch", "repointed", "not_repointed")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WRITE_PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPOINTED_FIELD_NUMBER: _ClassVar[int]
    NOT_REPOINTED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    write_pause_ms: float
    replication_id: str
    epoch: int
    repointed: _containers.RepeatedScalarFieldContainer[str]
    not_repointed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revision: _Optional[int] = ..., write_pause_ms: _Optional[float] = ..., replication_id: _Optional[str] = ..., epoch: _Optional[int] = ..., repointed: _Optional[_Iterable[str]] = ..., not_repointed: _Optional[_Iterable[str]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("replication_id", "epoch", "revision", "prev_replication_id", "prev_end_revision")
    REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREV_REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    PREV_END_REVISION_FIELD_NUMBER: _ClassVar[int]
    replication_id: str
    epoch: int
    revision: int
    prev_replication_id: str
    prev_end_revision: int
    def __init__(self, replication_id: _Optional[str] = ..., epoch: _Optional[int] = ..., revision: _Optional[int] = ..., prev_replication_id: _Optional[str] = ..., prev_end_revision: _Optional[int] = ...) -> None: ...

class ReplicaOfRequest(_message.Message):
    __slots__ = ("primary_url", "force")
    PRIMARY_URL_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    primary_url: str
    force: bool
    def __init__(self, primary_url: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ReplicaOfResponse(_message.Message):
    __slots__ = ("primary_url", "previous_role")
    PRIMARY_URL_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ROLE_FIELD_NUMBER: _ClassVar[int]
    primary_url: str
    previous_role: str
    def __init__(self, primary_url: _Optional[str] = ..., previous_role: _Optional[str] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("revision", "path", "key_count")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    revision: int
    path: str
    key_count: int
    def __init__(self, revision: _Optional[int] = ..., path: _Optional[str] = ..., key_count: _Optional[int] = ...) -> None: ...

class ReplicationStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicationStatusResponse(_message.Message):
    __slots__ = ("role", "node_id", "replication_id", "epoch", "revision", "durable_revision", "advertise_url", "replicas", "link", "prev_replication_id", "prev_end_revision", "fenced")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DURABLE_REVISION_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_URL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    PREV_REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    PREV_END_REVISION_FIELD_NUMBER: _ClassVar[int]
    FENCED_FIELD_NUMBER: _ClassVar[int]
    role: str
    node_id: str
    replication_id: str
    epoch: int
    revision: int
    durable_revision: int
    advertise_url: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    link: ReplicaLink
    prev_replication_id: str
    prev_end_revision: int
    fenced: str
    def __init__(self, role: _Optional[str] = ..., node_id: _Optional[str] = ..., replication_id: _Optional[str] = ..., epoch: _Optional[int] = ..., revision: _Optional[int] = ..., durable_revision: _Optional[int] = ..., advertise_url: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., link: _Optional[_Union[ReplicaLink, _Mapping]] = ..., prev_replication_id: _Optional[str] = ..., prev_end_revision: _Optional[int] = ..., fenced: _Optional[str] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("url", "state", "acked_revision", "lag_revisions", "lag_seconds", "last_error", "full_resyncs", "partial_resyncs")
    URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACKED_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAG_REVISIONS_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    FULL_RESYNCS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_RESYNCS_FIELD_NUMBER: _ClassVar[int]
    url: str
    state: str
    acked_revision: int
    lag_revisions: int
    lag_seconds: float
    last_error: str
    full_resyncs: int
    partial_resyncs: int
    def __init__(self, url: _Optional[str] = ..., state: _Optional[str] = ..., acked_revision: _Optional[int] = ..., lag_revisions: _Optional[int] = ..., lag_seconds: _Optional[float] = ..., last_error: _Optional[str] = ..., full_resyncs: _Optional[int] = ..., partial_resyncs: _Optional[int] = ...) -> None: ...

class ReplicaLink(_message.Message):
    __slots__ = ("primary_url", "state", "last_contact_seconds", "lag_seconds", "primary_revision", "last_error")
    PRIMARY_URL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_CONTACT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    primary_url: str
    state: str
    last_contact_seconds: float
    lag_seconds: float
    primary_revision: int
    last_error: str
    def __init__(self, primary_url: _Optional[str] = ..., state: _Optional[str] = ..., last_contact_seconds: _Optional[float] = ..., lag_seconds: _Optional[float] = ..., primary_revision: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...
