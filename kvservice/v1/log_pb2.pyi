from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogEntry(_message.Message):
    __slots__ = ("revision", "operation", "key", "value", "expires_at_ms", "entries", "expired", "value_encoding")
    class Operation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OPERATION_UNSPECIFIED: _ClassVar[LogEntry.Operation]
        OPERATION_SET: _ClassVar[LogEntry.Operation]
        OPERATION_DELETE: _ClassVar[LogEntry.Operation]
        OPERATION_TOUCH: _ClassVar[LogEntry.Operation]
        OPERATION_BATCH: _ClassVar[LogEntry.Operation]
    OPERATION_UNSPECIFIED: LogEntry.Operation
    OPERATION_SET: LogEntry.Operation
    OPERATION_DELETE: LogEntry.Operation
    OPERATION_TOUCH: LogEntry.Operation
    OPERATION_BATCH: LogEntry.Operation
    class ValueEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VALUE_ENCODING_UNSPECIFIED: _ClassVar[LogEntry.ValueEncoding]
        VALUE_ENCODING_ZSTD: _ClassVar[LogEntry.ValueEncoding]
    VALUE_ENCODING_UNSPECIFIED: LogEntry.ValueEncoding
    VALUE_ENCODING_ZSTD: LogEntry.ValueEncoding
    REVISION_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    VALUE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    revision: int
    operation: LogEntry.Operation
    key: str
    value: bytes
    expires_at_ms: int
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    expired: bool
    value_encoding: LogEntry.ValueEncoding
    def __init__(self, revision: _Optional[int] = ..., operation: _Optional[_Union[LogEntry.Operation, str]] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., expires_at_ms: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., expired: _Optional[bool] = ..., value_encoding: _Optional[_Union[LogEntry.ValueEncoding, str]] = ...) -> None: ...

class SnapshotHeader(_message.Message):
    __slots__ = ("revision", "key_count", "created_unix_ms", "replication_id", "epoch", "digest")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    revision: int
    key_count: int
    created_unix_ms: int
    replication_id: str
    epoch: int
    digest: int
    def __init__(self, revision: _Optional[int] = ..., key_count: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., replication_id: _Optional[str] = ..., epoch: _Optional[int] = ..., digest: _Optional[int] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("keys", "revisioned_values")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REVISIONED_VALUES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    revisioned_values: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., revisioned_values: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SnapshotTrailer(_message.Message):
    __slots__ = ("key_count",)
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    key_count: int
    def __init__(self, key_count: _Optional[int] = ...) -> None: ...
