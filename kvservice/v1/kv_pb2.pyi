from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetRequest(_message.Message):
    __slots__ = ("key", "min_revision")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    key: str
    min_revision: int
    def __init__(self, key: _Optional[str] = ..., min_revision: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "value", "revision")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    revision: int
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., revision: _Optional[int] = ...) -> None: ...

class SetRequest(_message.Message):
    __slots__ = ("key", "value", "wait_replicas")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    WAIT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    wait_replicas: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., wait_replicas: _Optional[int] = ...) -> None: ...

class SetResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "wait_replicas")
    KEY_FIELD_NUMBER: _ClassVar[int]
    WAIT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    key: str
    wait_replicas: int
    def __init__(self, key: _Optional[str] = ..., wait_replicas: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "revision")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    revision: int
    def __init__(self, deleted: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...
