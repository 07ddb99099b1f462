from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRequest(_message.Message):
    __slots__ = ("key", "min_revision")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    key: str
    min_revision: int
    def __init__(self, key: _Optional[str] = ..., min_revision: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "value", "revision", "expires_at_ms")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    revision: int
    expires_at_ms: int
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., revision: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class SetRequest(_message.Message):
    __slots__ = ("key", "value", "ttl_ms", "if_revision", "wait_replicas")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    IF_REVISION_FIELD_NUMBER: _ClassVar[int]
    WAIT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    ttl_ms: int
    if_revision: int
    wait_replicas: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., ttl_ms: _Optional[int] = ..., if_revision: _Optional[int] = ..., wait_replicas: _Optional[int] = ...) -> None: ...

class SetResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "if_revision", "wait_replicas")
    KEY_FIELD_NUMBER: _ClassVar[int]
    IF_REVISION_FIELD_NUMBER: _ClassVar[int]
    WAIT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    key: str
    if_revision: int
    wait_replicas: int
    def __init__(self, key: _Optional[str] = ..., if_revision: _Optional[int] = ..., wait_replicas: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "revision")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    revision: int
    def __init__(self, deleted: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...

class TouchRequest(_message.Message):
    __slots__ = ("key", "ttl_ms", "if_revision", "wait_replicas")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    IF_REVISION_FIELD_NUMBER: _ClassVar[int]
    WAIT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    key: str
    ttl_ms: int
    if_revision: int
    wait_replicas: int
    def __init__(self, key: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., if_revision: _Optional[int] = ..., wait_replicas: _Optional[int] = ...) -> None: ...

class TouchResponse(_message.Message):
    __slots__ = ("revision", "expires_at_ms")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    expires_at_ms: int
    def __init__(self, revision: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class IncrementRequest(_message.Message):
    __slots__ = ("key", "delta", "ttl_ms", "wait_replicas")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    WAIT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    key: str
    delta: int
    ttl_ms: int
    wait_replicas: int
    def __init__(self, key: _Optional[str] = ..., delta: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., wait_replicas: _Optional[int] = ...) -> None: ...

class IncrementResponse(_message.Message):
    __slots__ = ("value", "revision")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    value: int
    revision: int
    def __init__(self, value: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class MGetRequest(_message.Message):
    __slots__ = ("keys", "min_revision")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    min_revision: int
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., min_revision: _Optional[int] = ...) -> None: ...

class MGetResponse(_message.Message):
    __slots__ = ("revision", "items")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    items: _containers.RepeatedCompositeFieldContainer[GetResponse]
    def __init__(self, revision: _Optional[int] = ..., items: _Optional[_Iterable[_Union[GetResponse, _Mapping]]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("key", "revision", "absent", "present")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ABSENT_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    key: str
    revision: int
    absent: bool
    present: bool
    def __init__(self, key: _Optional[str] = ..., revision: _Optional[int] = ..., absent: _Optional[bool] = ..., present: _Optional[bool] = ...) -> None: ...

class Op(_message.Message):
    __slots__ = ("set", "delete", "increment", "touch")
    SET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    INCREMENT_FIELD_NUMBER: _ClassVar[int]
    TOUCH_FIELD_NUMBER: _ClassVar[int]
    set: SetRequest
    delete: DeleteRequest
    increment: IncrementRequest
    touch: TouchRequest
    def __init__(self, set: _Optional[_Union[SetRequest, _Mapping]] = ..., delete: _Optional[_Union[DeleteRequest, _Mapping]] = ..., increment: _Optional[_Union[IncrementRequest, _Mapping]] = ..., touch: _Optional[_Union[TouchRequest, _Mapping]] = ...) -> None: ...

class OpResult(_message.Message):
    __slots__ = ("set", "delete", "increment", "touch")
    SET_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    INCREMENT_FIELD_NUMBER: _ClassVar[int]
    TOUCH_FIELD_NUMBER: _ClassVar[int]
    set: SetResponse
    delete: DeleteResponse
    increment: IncrementResponse
    touch: TouchResponse
    def __init__(self, set: _Optional[_Union[SetResponse, _Mapping]] = ..., delete: _Optional[_Union[DeleteResponse, _Mapping]] = ..., increment: _Optional[_Union[IncrementResponse, _Mapping]] = ..., touch: _Optional[_Union[TouchResponse, _Mapping]] = ...) -> None: ...

class TxnRequest(_message.Message):
    __slots__ = ("conditions", "success", "failure", "wait_replicas")
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    WAIT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    success: _containers.RepeatedCompositeFieldContainer[Op]
    failure: _containers.RepeatedCompositeFieldContainer[Op]
    wait_replicas: int
    def __init__(self, conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., success: _Optional[_Iterable[_Union[Op, _Mapping]]] = ..., failure: _Optional[_Iterable[_Union[Op, _Mapping]]] = ..., wait_replicas: _Optional[int] = ...) -> None: ...

class TxnResponse(_message.Message):
    __slots__ = ("succeeded", "revision", "results")
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    succeeded: bool
    revision: int
    results: _containers.RepeatedCompositeFieldContainer[OpResult]
    def __init__(self, succeeded: _Optional[bool] = ..., revision: _Optional[int] = ..., results: _Optional[_Iterable[_Union[OpResult, _Mapping]]] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value", "revision", "expires_at_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    revision: int
    expires_at_ms: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., revision: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class ScanRequest(_message.Message):
    __slots__ = ("prefix", "start_after", "limit", "keys_only", "min_revision")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KEYS_ONLY_FIELD_NUMBER: _ClassVar[int]
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    start_after: str
    limit: int
    keys_only: bool
    min_revision: int
    def __init__(self, prefix: _Optional[str] = ..., start_after: _Optional[str] = ..., limit: _Optional[int] = ..., keys_only: _Optional[bool] = ..., min_revision: _Optional[int] = ...) -> None: ...

class ScanResponse(_message.Message):
    __slots__ = ("revision", "items", "next_start_after")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_START_AFTER_FIELD_NUMBER: _ClassVar[int]
    revision: int
    items: _containers.RepeatedCompositeFieldContainer[KeyValue]
    next_start_after: str
    def __init__(self, revision: _Optional[int] = ..., items: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., next_start_after: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("key", "prefix", "start_revision", "keys_only")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    KEYS_ONLY_FIELD_NUMBER: _ClassVar[int]
    key: str
    prefix: str
    start_revision: int
    keys_only: bool
    def __init__(self, key: _Optional[str] = ..., prefix: _Optional[str] = ..., start_revision: _Optional[int] = ..., keys_only: _Optional[bool] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("events", "progress_revision")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_REVISION_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    progress_revision: int
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., progress_revision: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("type", "key", "value", "revision", "expires_at_ms")
    class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        EVENT_TYPE_UNSPECIFIED: _ClassVar[Event.EventType]
        EVENT_TYPE_SET: _ClassVar[Event.EventType]
        EVENT_TYPE_DELETE: _ClassVar[Event.EventType]
        EVENT_TYPE_EXPIRE: _ClassVar[Event.EventType]
        EVENT_TYPE_TOUCH: _ClassVar[Event.EventType]
    EVENT_TYPE_UNSPECIFIED: Event.EventType
    EVENT_TYPE_SET: Event.EventType
    EVENT_TYPE_DELETE: Event.EventType
    EVENT_TYPE_EXPIRE: Event.EventType
    EVENT_TYPE_TOUCH: Event.EventType
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    type: Event.EventType
    key: str
    value: bytes
    revision: int
    expires_at_ms: int
    def __init__(self, type: _Optional[_Union[Event.EventType, str]] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., revision: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...
