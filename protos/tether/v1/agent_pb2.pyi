from tether.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpawnRequest(_message.Message):
    __slots__ = ("spec", "idempotency_key", "group_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.GroupSpec
    idempotency_key: str
    group_id: str
    def __init__(self, spec: _Optional[_Union[_common_pb2.GroupSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., group_id: _Optional[str] = ...) -> None: ...

class SpawnResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _common_pb2.Group
    def __init__(self, group: _Optional[_Union[_common_pb2.Group, _Mapping]] = ...) -> None: ...

class AdoptRequest(_message.Message):
    __slots__ = ("pid", "start_time", "spec")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time: float
    spec: _common_pb2.GroupSpec
    def __init__(self, pid: _Optional[int] = ..., start_time: _Optional[float] = ..., spec: _Optional[_Union[_common_pb2.GroupSpec, _Mapping]] = ...) -> None: ...

class AdoptResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _common_pb2.Group
    def __init__(self, group: _Optional[_Union[_common_pb2.Group, _Mapping]] = ...) -> None: ...

class SignalRequest(_message.Message):
    __slots__ = ("group_id", "signal")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    signal: str
    def __init__(self, group_id: _Optional[str] = ..., signal: _Optional[str] = ...) -> None: ...

class SignalResponse(_message.Message):
    __slots__ = ("members_signalled", "already_gone", "group")
    MEMBERS_SIGNALLED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_GONE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    members_signalled: int
    already_gone: bool
    group: _common_pb2.Group
    def __init__(self, members_signalled: _Optional[int] = ..., already_gone: _Optional[bool] = ..., group: _Optional[_Union[_common_pb2.Group, _Mapping]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("group_id", "policy")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    policy: _common_pb2.StopPolicy
    def __init__(self, group_id: _Optional[str] = ..., policy: _Optional[_Union[_common_pb2.StopPolicy, _Mapping]] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _common_pb2.Group
    def __init__(self, group: _Optional[_Union[_common_pb2.Group, _Mapping]] = ...) -> None: ...

class StopGroupsRequest(_message.Message):
    __slots__ = ("group_ids", "policy")
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    group_ids: _containers.RepeatedScalarFieldContainer[str]
    policy: _common_pb2.StopPolicy
    def __init__(self, group_ids: _Optional[_Iterable[str]] = ..., policy: _Optional[_Union[_common_pb2.StopPolicy, _Mapping]] = ...) -> None: ...

class StopGroupsResponse(_message.Message):
    __slots__ = ("groups", "errors")
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[_common_pb2.Group]
    errors: _containers.ScalarMap[str, str]
    def __init__(self, groups: _Optional[_Iterable[_Union[_common_pb2.Group, _Mapping]]] = ..., errors: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _common_pb2.Group
    def __init__(self, group: _Optional[_Union[_common_pb2.Group, _Mapping]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("session_id", "include_ended")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ENDED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_ended: bool
    def __init__(self, session_id: _Optional[str] = ..., include_ended: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[_common_pb2.Group]
    def __init__(self, groups: _Optional[_Iterable[_Union[_common_pb2.Group, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("session_id", "group_ids", "initial", "since_seq", "epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    group_ids: _containers.RepeatedScalarFieldContainer[str]
    initial: bool
    since_seq: int
    epoch: str
    def __init__(self, session_id: _Optional[str] = ..., group_ids: _Optional[_Iterable[str]] = ..., initial: _Optional[bool] = ..., since_seq: _Optional[int] = ..., epoch: _Optional[str] = ...) -> None: ...

class ListOrphansRequest(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: bool
    def __init__(self, sweep: _Optional[bool] = ...) -> None: ...

class ListOrphansResponse(_message.Message):
    __slots__ = ("orphans",)
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    orphans: _containers.RepeatedCompositeFieldContainer[_common_pb2.Orphan]
    def __init__(self, orphans: _Optional[_Iterable[_Union[_common_pb2.Orphan, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("name", "version", "containment", "hostname", "signallers", "instance", "fd_limit", "fds_open", "groups_left", "epoch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTAINMENT_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    SIGNALLERS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    FD_LIMIT_FIELD_NUMBER: _ClassVar[int]
    FDS_OPEN_FIELD_NUMBER: _ClassVar[int]
    GROUPS_LEFT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    containment: _common_pb2.Containment
    hostname: str
    signallers: _containers.RepeatedScalarFieldContainer[str]
    instance: str
    fd_limit: int
    fds_open: int
    groups_left: int
    epoch: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., containment: _Optional[_Union[_common_pb2.Containment, str]] = ..., hostname: _Optional[str] = ..., signallers: _Optional[_Iterable[str]] = ..., instance: _Optional[str] = ..., fd_limit: _Optional[int] = ..., fds_open: _Optional[int] = ..., groups_left: _Optional[int] = ..., epoch: _Optional[str] = ...) -> None: ...

class ListPortsRequest(_message.Message):
    __slots__ = ("port",)
    PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    def __init__(self, port: _Optional[int] = ...) -> None: ...

class ListPortsResponse(_message.Message):
    __slots__ = ("ports",)
    PORTS_FIELD_NUMBER: _ClassVar[int]
    ports: _containers.RepeatedCompositeFieldContainer[_common_pb2.PortOwner]
    def __init__(self, ports: _Optional[_Iterable[_Union[_common_pb2.PortOwner, _Mapping]]] = ...) -> None: ...

class RestartRequest(_message.Message):
    __slots__ = ("group_id", "policy")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    policy: _common_pb2.StopPolicy
    def __init__(self, group_id: _Optional[str] = ..., policy: _Optional[_Union[_common_pb2.StopPolicy, _Mapping]] = ...) -> None: ...

class RestartResponse(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: _common_pb2.Group
    def __init__(self, group: _Optional[_Union[_common_pb2.Group, _Mapping]] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("group_ids",)
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    group_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("forgotten", "errors")
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    forgotten: _containers.RepeatedScalarFieldContainer[str]
    errors: _containers.ScalarMap[str, str]
    def __init__(self, forgotten: _Optional[_Iterable[str]] = ..., errors: _Optional[_Mapping[str, str]] = ...) -> None: ...
