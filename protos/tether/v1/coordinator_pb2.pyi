import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tether.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_STATE_UP: _ClassVar[AgentState]
    AGENT_STATE_UNREACHABLE: _ClassVar[AgentState]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_ACTIVE: _ClassVar[SessionState]
    SESSION_STATE_STOPPING: _ClassVar[SessionState]
    SESSION_STATE_STOPPED: _ClassVar[SessionState]

class LeaseStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATUS_UNSPECIFIED: _ClassVar[LeaseStatus]
    LEASE_STATUS_HELD: _ClassVar[LeaseStatus]
    LEASE_STATUS_ENDED: _ClassVar[LeaseStatus]
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_STATE_UP: AgentState
AGENT_STATE_UNREACHABLE: AgentState
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_ACTIVE: SessionState
SESSION_STATE_STOPPING: SessionState
SESSION_STATE_STOPPED: SessionState
LEASE_STATUS_UNSPECIFIED: LeaseStatus
LEASE_STATUS_HELD: LeaseStatus
LEASE_STATUS_ENDED: LeaseStatus

class Agent(_message.Message):
    __slots__ = ("name", "address", "containment", "version", "state", "last_seen", "epoch", "instance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONTAINMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    containment: _common_pb2.Containment
    version: str
    state: AgentState
    last_seen: _timestamp_pb2.Timestamp
    epoch: str
    instance: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., containment: _Optional[_Union[_common_pb2.Containment, str]] = ..., version: _Optional[str] = ..., state: _Optional[_Union[AgentState, str]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., epoch: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class RegisterAgentRequest(_message.Message):
    __slots__ = ("name", "address", "containment", "version", "epoch", "instance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONTAINMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    containment: _common_pb2.Containment
    version: str
    epoch: str
    instance: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., containment: _Optional[_Union[_common_pb2.Containment, str]] = ..., version: _Optional[str] = ..., epoch: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class RegisterAgentResponse(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "ttl_seconds")
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: float
    ttl_seconds: float
    def __init__(self, heartbeat_interval_seconds: _Optional[float] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("name", "epoch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    epoch: str
    def __init__(self, name: _Optional[str] = ..., epoch: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "window", "labels", "state", "ttl_seconds", "lease_expires_at", "stop_cause", "groups", "created_at", "group_count", "live_count", "stopped_at", "lease_grace_seconds", "lease_held")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STOP_CAUSE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    GROUP_COUNT_FIELD_NUMBER: _ClassVar[int]
    LIVE_COUNT_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_HELD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    window: str
    labels: _containers.ScalarMap[str, str]
    state: SessionState
    ttl_seconds: float
    lease_expires_at: _timestamp_pb2.Timestamp
    stop_cause: str
    groups: _containers.RepeatedCompositeFieldContainer[_common_pb2.Group]
    created_at: _timestamp_pb2.Timestamp
    group_count: int
    live_count: int
    stopped_at: _timestamp_pb2.Timestamp
    lease_grace_seconds: float
    lease_held: bool
    def __init__(self, session_id: _Optional[str] = ..., window: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[SessionState, str]] = ..., ttl_seconds: _Optional[float] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stop_cause: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[_common_pb2.Group, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_count: _Optional[int] = ..., live_count: _Optional[int] = ..., stopped_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_grace_seconds: _Optional[float] = ..., lease_held: _Optional[bool] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "window", "labels", "ttl_seconds")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    window: str
    labels: _containers.ScalarMap[str, str]
    ttl_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., window: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("include_stopped", "page_size", "page_token", "include_groups")
    INCLUDE_STOPPED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    include_stopped: bool
    page_size: int
    page_token: str
    include_groups: bool
    def __init__(self, include_stopped: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_groups: _Optional[bool] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("session_id", "ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class CoordinatorSpawnRequest(_message.Message):
    __slots__ = ("agent", "spec", "idempotency_key")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    agent: str
    spec: _common_pb2.GroupSpec
    idempotency_key: str
    def __init__(self, agent: _Optional[str] = ..., spec: _Optional[_Union[_common_pb2.GroupSpec, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CoordinatorAdoptRequest(_message.Message):
    __slots__ = ("agent", "pid", "start_time", "spec")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    agent: str
    pid: int
    start_time: float
    spec: _common_pb2.GroupSpec
    def __init__(self, agent: _Optional[str] = ..., pid: _Optional[int] = ..., start_time: _Optional[float] = ..., spec: _Optional[_Union[_common_pb2.GroupSpec, _Mapping]] = ...) -> None: ...

class GroupSelector(_message.Message):
    __slots__ = ("group_ids", "labels")
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    group_ids: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group_ids: _Optional[_Iterable[str]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class SignalSessionRequest(_message.Message):
    __slots__ = ("session_id", "signal", "selector")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    signal: str
    selector: GroupSelector
    def __init__(self, session_id: _Optional[str] = ..., signal: _Optional[str] = ..., selector: _Optional[_Union[GroupSelector, _Mapping]] = ...) -> None: ...

class StopSessionRequest(_message.Message):
    __slots__ = ("session_id", "grace_seconds", "selector")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    grace_seconds: float
    selector: GroupSelector
    def __init__(self, session_id: _Optional[str] = ..., grace_seconds: _Optional[float] = ..., selector: _Optional[_Union[GroupSelector, _Mapping]] = ...) -> None: ...

class RestartGroupsRequest(_message.Message):
    __slots__ = ("session_id", "selector", "grace_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    selector: GroupSelector
    grace_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., selector: _Optional[_Union[GroupSelector, _Mapping]] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class ForgetGroupsRequest(_message.Message):
    __slots__ = ("session_id", "selector")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    selector: GroupSelector
    def __init__(self, session_id: _Optional[str] = ..., selector: _Optional[_Union[GroupSelector, _Mapping]] = ...) -> None: ...

class ForgetGroupsResponse(_message.Message):
    __slots__ = ("forgotten",)
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    forgotten: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, forgotten: _Optional[_Iterable[str]] = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("session_id", "timeout_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    timeout_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class GroupReport(_message.Message):
    __slots__ = ("group_id", "label", "agent", "target", "state", "exit", "error", "members_signalled", "stop_order", "attempts", "restarts", "traceparent")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_SIGNALLED_FIELD_NUMBER: _ClassVar[int]
    STOP_ORDER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    label: str
    agent: str
    target: str
    state: _common_pb2.GroupState
    exit: _common_pb2.ExitRecord
    error: str
    members_signalled: int
    stop_order: int
    attempts: int
    restarts: int
    traceparent: str
    def __init__(self, group_id: _Optional[str] = ..., label: _Optional[str] = ..., agent: _Optional[str] = ..., target: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.GroupState, str]] = ..., exit: _Optional[_Union[_common_pb2.ExitRecord, _Mapping]] = ..., error: _Optional[str] = ..., members_signalled: _Optional[int] = ..., stop_order: _Optional[int] = ..., attempts: _Optional[int] = ..., restarts: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...

class SessionReport(_message.Message):
    __slots__ = ("session_id", "groups", "complete", "stop_cause")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    STOP_CAUSE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    groups: _containers.RepeatedCompositeFieldContainer[GroupReport]
    complete: bool
    stop_cause: str
    def __init__(self, session_id: _Optional[str] = ..., groups: _Optional[_Iterable[_Union[GroupReport, _Mapping]]] = ..., complete: _Optional[bool] = ..., stop_cause: _Optional[str] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("session_id", "initial", "since_seq", "epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    initial: bool
    since_seq: int
    epoch: str
    def __init__(self, session_id: _Optional[str] = ..., initial: _Optional[bool] = ..., since_seq: _Optional[int] = ..., epoch: _Optional[str] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("seq", "group", "kind", "at", "epoch", "report", "session_id")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    seq: int
    group: _common_pb2.Group
    kind: str
    at: _timestamp_pb2.Timestamp
    epoch: str
    report: SessionReport
    session_id: str
    def __init__(self, seq: _Optional[int] = ..., group: _Optional[_Union[_common_pb2.Group, _Mapping]] = ..., kind: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., epoch: _Optional[str] = ..., report: _Optional[_Union[SessionReport, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class CoordinatorListOrphansRequest(_message.Message):
    __slots__ = ("sweep",)
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    sweep: bool
    def __init__(self, sweep: _Optional[bool] = ...) -> None: ...

class CoordinatorListOrphansResponse(_message.Message):
    __slots__ = ("orphans", "unreachable")
    class UnreachableEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    orphans: _containers.RepeatedCompositeFieldContainer[_common_pb2.Orphan]
    unreachable: _containers.ScalarMap[str, str]
    def __init__(self, orphans: _Optional[_Iterable[_Union[_common_pb2.Orphan, _Mapping]]] = ..., unreachable: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReadAuditRequest(_message.Message):
    __slots__ = ("since", "limit")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("time", "method", "role", "credential", "proof", "peer", "result", "message", "session_id", "group_id", "agent", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TIME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    method: str
    role: str
    credential: str
    proof: str
    peer: str
    result: str
    message: str
    session_id: str
    group_id: str
    agent: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., method: _Optional[str] = ..., role: _Optional[str] = ..., credential: _Optional[str] = ..., proof: _Optional[str] = ..., peer: _Optional[str] = ..., result: _Optional[str] = ..., message: _Optional[str] = ..., session_id: _Optional[str] = ..., group_id: _Optional[str] = ..., agent: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CoordinatorListPortsRequest(_message.Message):
    __slots__ = ("port", "agent")
    PORT_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    port: int
    agent: str
    def __init__(self, port: _Optional[int] = ..., agent: _Optional[str] = ...) -> None: ...

class CoordinatorListPortsResponse(_message.Message):
    __slots__ = ("ports", "unreachable")
    class UnreachableEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PORTS_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    ports: _containers.RepeatedCompositeFieldContainer[_common_pb2.PortOwner]
    unreachable: _containers.ScalarMap[str, str]
    def __init__(self, ports: _Optional[_Iterable[_Union[_common_pb2.PortOwner, _Mapping]]] = ..., unreachable: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ForgetAgentRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ForgetAgentResponse(_message.Message):
    __slots__ = ("lost_group_ids",)
    LOST_GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    lost_group_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lost_group_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetLeaderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaderInfo(_message.Message):
    __slots__ = ("leader", "epoch", "address", "leading", "lease_remaining_seconds", "store", "problem")
    LEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEADING_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    leader: str
    epoch: int
    address: str
    leading: bool
    lease_remaining_seconds: float
    store: str
    problem: str
    def __init__(self, leader: _Optional[str] = ..., epoch: _Optional[int] = ..., address: _Optional[str] = ..., leading: _Optional[bool] = ..., lease_remaining_seconds: _Optional[float] = ..., store: _Optional[str] = ..., problem: _Optional[str] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("session_id", "window", "labels", "lease_grace_seconds", "resume_token")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LEASE_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    window: str
    labels: _containers.ScalarMap[str, str]
    lease_grace_seconds: float
    resume_token: str
    def __init__(self, session_id: _Optional[str] = ..., window: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., lease_grace_seconds: _Optional[float] = ..., resume_token: _Optional[str] = ...) -> None: ...

class LeaseState(_message.Message):
    __slots__ = ("session_id", "status", "resume_token", "lease_grace_seconds", "renew_interval_seconds", "renew_timeout_seconds", "resumed", "renewals", "stop_cause")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RENEW_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RENEW_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    RENEWALS_FIELD_NUMBER: _ClassVar[int]
    STOP_CAUSE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    status: LeaseStatus
    resume_token: str
    lease_grace_seconds: float
    renew_interval_seconds: float
    renew_timeout_seconds: float
    resumed: bool
    renewals: int
    stop_cause: str
    def __init__(self, session_id: _Optional[str] = ..., status: _Optional[_Union[LeaseStatus, str]] = ..., resume_token: _Optional[str] = ..., lease_grace_seconds: _Optional[float] = ..., renew_interval_seconds: _Optional[float] = ..., renew_timeout_seconds: _Optional[float] = ..., resumed: _Optional[bool] = ..., renewals: _Optional[int] = ..., stop_cause: _Optional[str] = ...) -> None: ...
