from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PULL_STATUS_UNSPECIFIED: _ClassVar[PullStatus]
    PULL_STATUS_TASK: _ClassVar[PullStatus]
    PULL_STATUS_IDLE: _ClassVar[PullStatus]
    PULL_STATUS_FINISHED: _ClassVar[PullStatus]
PULL_STATUS_UNSPECIFIED: PullStatus
PULL_STATUS_TASK: PullStatus
PULL_STATUS_IDLE: PullStatus
PULL_STATUS_FINISHED: PullStatus

class Credentials(_message.Message):
    __slots__ = ("client_id", "token", "timestamp_ms", "nonce")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    token: bytes
    timestamp_ms: int
    nonce: bytes
    def __init__(self, client_id: _Optional[int] = ..., token: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("credentials",)
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ...) -> None: ...

class PayloadHeader(_message.Message):
    __slots__ = ("task_id", "size", "sha256")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    size: int
    sha256: bytes
    def __init__(self, task_id: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class TaskChunk(_message.Message):
    __slots__ = ("status", "header", "data")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    status: PullStatus
    header: PayloadHeader
    data: bytes
    def __init__(self, status: _Optional[_Union[PullStatus, str]] = ..., header: _Optional[_Union[PayloadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReplyChunk(_message.Message):
    __slots__ = ("credentials", "header", "data", "error")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    header: PayloadHeader
    data: bytes
    error: str
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., header: _Optional[_Union[PayloadHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...
