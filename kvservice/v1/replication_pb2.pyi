from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_RESULT_UNSPECIFIED: _ClassVar[PushResult]
    PUSH_RESULT_OK: _ClassVar[PushResult]
    PUSH_RESULT_POSITION_MISMATCH: _ClassVar[PushResult]
    PUSH_RESULT_HISTORY_MISMATCH: _ClassVar[PushResult]
    PUSH_RESULT_REFUSED: _ClassVar[PushResult]
    PUSH_RESULT_DIGEST_MISMATCH: _ClassVar[PushResult]
PUSH_RESULT_UNSPECIFIED: PushResult
PUSH_RESULT_OK: PushResult
PUSH_RESULT_POSITION_MISMATCH: PushResult
PUSH_RESULT_HISTORY_MISMATCH: PushResult
PUSH_RESULT_REFUSED: PushResult
PUSH_RESULT_DIGEST_MISMATCH: PushResult

class PrimaryInfo(_message.Message):
    __slots__ = ("url", "node_id", "replication_id", "epoch", "durable_revision", "sent_unix_ms", "prev_replication_id", "prev_end_revision")
    URL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DURABLE_REVISION_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PREV_REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    PREV_END_REVISION_FIELD_NUMBER: _ClassVar[int]
    url: str
    node_id: str
    replication_id: str
    epoch: int
    durable_revision: int
    sent_unix_ms: int
    prev_replication_id: str
    prev_end_revision: int
    def __init__(self, url: _Optional[str] = ..., node_id: _Optional[str] = ..., replication_id: _Optional[str] = ..., epoch: _Optional[int] = ..., durable_revision: _Optional[int] = ..., sent_unix_ms: _Optional[int] = ..., prev_replication_id: _Optional[str] = ..., prev_end_revision: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("primary", "prev_revision", "records", "last_commit_unix_ms", "digest_revision", "digest")
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    PREV_REVISION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMIT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_REVISION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    primary: PrimaryInfo
    prev_revision: int
    records: _containers.RepeatedScalarFieldContainer[bytes]
    last_commit_unix_ms: int
    digest_revision: int
    digest: int
    def __init__(self, primary: _Optional[_Union[PrimaryInfo, _Mapping]] = ..., prev_revision: _Optional[int] = ..., records: _Optional[_Iterable[bytes]] = ..., last_commit_unix_ms: _Optional[int] = ..., digest_revision: _Optional[int] = ..., digest: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("result", "revision", "durable_revision", "replication_id", "epoch", "node_id", "message", "primary_url", "prev_replication_id")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DURABLE_REVISION_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_URL_FIELD_NUMBER: _ClassVar[int]
    PREV_REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    result: PushResult
    revision: int
    durable_revision: int
    replication_id: str
    epoch: int
    node_id: str
    message: str
    primary_url: str
    prev_replication_id: str
    def __init__(self, result: _Optional[_Union[PushResult, str]] = ..., revision: _Optional[int] = ..., durable_revision: _Optional[int] = ..., replication_id: _Optional[str] = ..., epoch: _Optional[int] = ..., node_id: _Optional[str] = ..., message: _Optional[str] = ..., primary_url: _Optional[str] = ..., prev_replication_id: _Optional[str] = ...) -> None: ...

class InstallSnapshotRequest(_message.Message):
    __slots__ = ("primary", "transfer_id", "revision", "offset", "data", "done")
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    primary: PrimaryInfo
    transfer_id: str
    revision: int
    offset: int
    data: bytes
    done: bool
    def __init__(self, primary: _Optional[_Union[PrimaryInfo, _Mapping]] = ..., transfer_id: _Optional[str] = ..., revision: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ...) -> None: ...

class InstallSnapshotResponse(_message.Message):
    __slots__ = ("next_offset", "revision")
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    next_offset: int
    revision: int
    def __init__(self, next_offset: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class AnnounceRequest(_message.Message):
    __slots__ = ("replica_url", "node_id")
    REPLICA_URL_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    replica_url: str
    node_id: str
    def __init__(self, replica_url: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class AnnounceResponse(_message.Message):
    __slots__ = ("primary_url", "replication_id", "epoch")
    PRIMARY_URL_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    primary_url: str
    replication_id: str
    epoch: int
    def __init__(self, primary_url: _Optional[str] = ..., replication_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...
