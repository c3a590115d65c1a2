import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GroupState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_STATE_UNSPECIFIED: _ClassVar[GroupState]
    GROUP_STATE_STARTING: _ClassVar[GroupState]
    GROUP_STATE_RUNNING: _ClassVar[GroupState]
    GROUP_STATE_STOPPING: _ClassVar[GroupState]
    GROUP_STATE_STOPPED: _ClassVar[GroupState]
    GROUP_STATE_EXITED: _ClassVar[GroupState]
    GROUP_STATE_FAILED: _ClassVar[GroupState]
    GROUP_STATE_UNREACHABLE: _ClassVar[GroupState]
    GROUP_STATE_LOST: _ClassVar[GroupState]
    GROUP_STATE_RESTARTING: _ClassVar[GroupState]

class ExitReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXIT_REASON_UNSPECIFIED: _ClassVar[ExitReason]
    EXIT_REASON_NATURAL: _ClassVar[ExitReason]
    EXIT_REASON_REQUESTED: _ClassVar[ExitReason]
    EXIT_REASON_FORCED_KILL: _ClassVar[ExitReason]
    EXIT_REASON_EXTERNAL_SIGNAL: _ClassVar[ExitReason]
    EXIT_REASON_START_FAILED: _ClassVar[ExitReason]
    EXIT_REASON_LOST: _ClassVar[ExitReason]
    EXIT_REASON_OOM_KILLED: _ClassVar[ExitReason]
    EXIT_REASON_RESTART_LIMIT: _ClassVar[ExitReason]
    EXIT_REASON_UNKNOWN: _ClassVar[ExitReason]

class FailureClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_CLASS_UNSPECIFIED: _ClassVar[FailureClass]
    FAILURE_CLASS_COMMAND_NOT_FOUND: _ClassVar[FailureClass]
    FAILURE_CLASS_PERMISSION_DENIED: _ClassVar[FailureClass]
    FAILURE_CLASS_CWD_MISSING: _ClassVar[FailureClass]
    FAILURE_CLASS_PORT_IN_USE: _ClassVar[FailureClass]
    FAILURE_CLASS_IMMEDIATE_CRASH: _ClassVar[FailureClass]
    FAILURE_CLASS_READINESS_TIMEOUT: _ClassVar[FailureClass]
    FAILURE_CLASS_READINESS_FAILED: _ClassVar[FailureClass]
    FAILURE_CLASS_INVALID_SPEC: _ClassVar[FailureClass]
    FAILURE_CLASS_TARGET_UNREACHABLE: _ClassVar[FailureClass]
    FAILURE_CLASS_RESOURCE_EXHAUSTED: _ClassVar[FailureClass]
    FAILURE_CLASS_TOOLCHAIN_MISSING: _ClassVar[FailureClass]

class Containment(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTAINMENT_UNSPECIFIED: _ClassVar[Containment]
    CONTAINMENT_CGROUP: _ClassVar[Containment]
    CONTAINMENT_SUBREAPER: _ClassVar[Containment]
    CONTAINMENT_PGID: _ClassVar[Containment]

class OrphanPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORPHAN_POLICY_KILL: _ClassVar[OrphanPolicy]
    ORPHAN_POLICY_KEEP: _ClassVar[OrphanPolicy]

class UnhealthyAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNHEALTHY_ACTION_NONE: _ClassVar[UnhealthyAction]
    UNHEALTHY_ACTION_RESTART: _ClassVar[UnhealthyAction]
    UNHEALTHY_ACTION_STOP: _ClassVar[UnhealthyAction]

class RestartMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESTART_MODE_NO: _ClassVar[RestartMode]
    RESTART_MODE_ON_FAILURE: _ClassVar[RestartMode]
    RESTART_MODE_ALWAYS: _ClassVar[RestartMode]

class StdinMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STDIN_MODE_NULL: _ClassVar[StdinMode]
    STDIN_MODE_PIPE: _ClassVar[StdinMode]

class OutputStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_STREAM_UNSPECIFIED: _ClassVar[OutputStream]
    OUTPUT_STREAM_STDOUT: _ClassVar[OutputStream]
    OUTPUT_STREAM_STDERR: _ClassVar[OutputStream]
    OUTPUT_STREAM_TETHER: _ClassVar[OutputStream]
GROUP_STATE_UNSPECIFIED: GroupState
GROUP_STATE_STARTING: GroupState
GROUP_STATE_RUNNING: GroupState
GROUP_STATE_STOPPING: GroupState
GROUP_STATE_STOPPED: GroupState
GROUP_STATE_EXITED: GroupState
GROUP_STATE_FAILED: GroupState
GROUP_STATE_UNREACHABLE: GroupState
GROUP_STATE_LOST: GroupState
GROUP_STATE_RESTARTING: GroupState
EXIT_REASON_UNSPECIFIED: ExitReason
EXIT_REASON_NATURAL: ExitReason
EXIT_REASON_REQUESTED: ExitReason
EXIT_REASON_FORCED_KILL: ExitReason
EXIT_REASON_EXTERNAL_SIGNAL: ExitReason
EXIT_REASON_START_FAILED: ExitReason
EXIT_REASON_LOST: ExitReason
EXIT_REASON_OOM_KILLED: ExitReason
EXIT_REASON_RESTART_LIMIT: ExitReason
EXIT_REASON_UNKNOWN: ExitReason
FAILURE_CLASS_UNSPECIFIED: FailureClass
FAILURE_CLASS_COMMAND_NOT_FOUND: FailureClass
FAILURE_CLASS_PERMISSION_DENIED: FailureClass
FAILURE_CLASS_CWD_MISSING: FailureClass
FAILURE_CLASS_PORT_IN_USE: FailureClass
FAILURE_CLASS_IMMEDIATE_CRASH: FailureClass
FAILURE_CLASS_READINESS_TIMEOUT: FailureClass
FAILURE_CLASS_READINESS_FAILED: FailureClass
FAILURE_CLASS_INVALID_SPEC: FailureClass
FAILURE_CLASS_TARGET_UNREACHABLE: FailureClass
FAILURE_CLASS_RESOURCE_EXHAUSTED: FailureClass
FAILURE_CLASS_TOOLCHAIN_MISSING: FailureClass
CONTAINMENT_UNSPECIFIED: Containment
CONTAINMENT_CGROUP: Containment
CONTAINMENT_SUBREAPER: Containment
CONTAINMENT_PGID: Containment
ORPHAN_POLICY_KILL: OrphanPolicy
ORPHAN_POLICY_KEEP: OrphanPolicy
UNHEALTHY_ACTION_NONE: UnhealthyAction
UNHEALTHY_ACTION_RESTART: UnhealthyAction
UNHEALTHY_ACTION_STOP: UnhealthyAction
RESTART_MODE_NO: RestartMode
RESTART_MODE_ON_FAILURE: RestartMode
RESTART_MODE_ALWAYS: RestartMode
STDIN_MODE_NULL: StdinMode
STDIN_MODE_PIPE: StdinMode
OUTPUT_STREAM_UNSPECIFIED: OutputStream
OUTPUT_STREAM_STDOUT: OutputStream
OUTPUT_STREAM_STDERR: OutputStream
OUTPUT_STREAM_TETHER: OutputStream

class StopPolicy(_message.Message):
    __slots__ = ("signal", "grace_seconds")
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    signal: str
    grace_seconds: float
    def __init__(self, signal: _Optional[str] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class GroupSpec(_message.Message):
    __slots__ = ("argv", "cwd", "env", "inherit_env", "log_path", "ready", "start_timeout_seconds", "stop", "orphan_policy", "label", "labels", "session_id", "stop_order", "target", "window", "owns_target", "probe_timeout_seconds", "user", "ports", "limits", "pre_stop", "no_plugins", "live", "live_interval_seconds", "live_timeout_seconds", "live_failures", "on_unhealthy", "restart", "restart_max", "restart_window_seconds", "traceparent", "stdin", "stop_stdin_grace_seconds")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARGV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    INHERIT_ENV_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    START_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    ORPHAN_POLICY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_ORDER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    OWNS_TARGET_FIELD_NUMBER: _ClassVar[int]
    PROBE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PRE_STOP_FIELD_NUMBER: _ClassVar[int]
    NO_PLUGINS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    LIVE_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LIVE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    ON_UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    RESTART_MAX_FIELD_NUMBER: _ClassVar[int]
    RESTART_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STOP_STDIN_GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    env: _containers.ScalarMap[str, str]
    inherit_env: bool
    log_path: str
    ready: str
    start_timeout_seconds: float
    stop: StopPolicy
    orphan_policy: OrphanPolicy
    label: str
    labels: _containers.ScalarMap[str, str]
    session_id: str
    stop_order: int
    target: str
    window: str
    owns_target: bool
    probe_timeout_seconds: float
    user: str
    ports: _containers.RepeatedCompositeFieldContainer[PortRequest]
    limits: ResourceLimits
    pre_stop: PreStopHook
    no_plugins: bool
    live: str
    live_interval_seconds: float
    live_timeout_seconds: float
    live_failures: int
    on_unhealthy: UnhealthyAction
    restart: RestartMode
    restart_max: int
    restart_window_seconds: float
    traceparent: str
    stdin: StdinMode
    stop_stdin_grace_seconds: float
    def __init__(self, argv: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., inherit_env: _Optional[bool] = ..., log_path: _Optional[str] = ..., ready: _Optional[str] = ..., start_timeout_seconds: _Optional[float] = ..., stop: _Optional[_Union[StopPolicy, _Mapping]] = ..., orphan_policy: _Optional[_Union[OrphanPolicy, str]] = ..., label: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., session_id: _Optional[str] = ..., stop_order: _Optional[int] = ..., target: _Optional[str] = ..., window: _Optional[str] = ..., owns_target: _Optional[bool] = ..., probe_timeout_seconds: _Optional[float] = ..., user: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[PortRequest, _Mapping]]] = ..., limits: _Optional[_Union[ResourceLimits, _Mapping]] = ..., pre_stop: _Optional[_Union[PreStopHook, _Mapping]] = ..., no_plugins: _Optional[bool] = ..., live: _Optional[str] = ..., live_interval_seconds: _Optional[float] = ..., live_timeout_seconds: _Optional[float] = ..., live_failures: _Optional[int] = ..., on_unhealthy: _Optional[_Union[UnhealthyAction, str]] = ..., restart: _Optional[_Union[RestartMode, str]] = ..., restart_max: _Optional[int] = ..., restart_window_seconds: _Optional[float] = ..., traceparent: _Optional[str] = ..., stdin: _Optional[_Union[StdinMode, str]] = ..., stop_stdin_grace_seconds: _Optional[float] = ...) -> None: ...

class PortRequest(_message.Message):
    __slots__ = ("name", "port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class ResourceLimits(_message.Message):
    __slots__ = ("memory_bytes", "cpus", "pids")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    cpus: float
    pids: int
    def __init__(self, memory_bytes: _Optional[int] = ..., cpus: _Optional[float] = ..., pids: _Optional[int] = ...) -> None: ...

class PreStopHook(_message.Message):
    __slots__ = ("argv", "timeout_seconds")
    ARGV_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    timeout_seconds: float
    def __init__(self, argv: _Optional[_Iterable[str]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class RunRecord(_message.Message):
    __slots__ = ("started_at", "exit", "duration_seconds")
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    started_at: _timestamp_pb2.Timestamp
    exit: ExitRecord
    duration_seconds: float
    def __init__(self, started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exit: _Optional[_Union[ExitRecord, _Mapping]] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class ExitRecord(_message.Message):
    __slots__ = ("reason", "exit_code", "signal", "survivors", "failure", "message", "stop_duration_seconds", "ended_at", "detail", "clean", "context", "pre_stop", "oom_kills")
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STOP_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CLEAN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PRE_STOP_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    reason: ExitReason
    exit_code: int
    signal: int
    survivors: int
    failure: FailureClass
    message: str
    stop_duration_seconds: float
    ended_at: _timestamp_pb2.Timestamp
    detail: str
    clean: bool
    context: RunContext
    pre_stop: PreStopOutcome
    oom_kills: int
    def __init__(self, reason: _Optional[_Union[ExitReason, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., survivors: _Optional[int] = ..., failure: _Optional[_Union[FailureClass, str]] = ..., message: _Optional[str] = ..., stop_duration_seconds: _Optional[float] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., detail: _Optional[str] = ..., clean: _Optional[bool] = ..., context: _Optional[_Union[RunContext, _Mapping]] = ..., pre_stop: _Optional[_Union[PreStopOutcome, _Mapping]] = ..., oom_kills: _Optional[int] = ...) -> None: ...

class AssignedPort(_message.Message):
    __slots__ = ("name", "port", "fixed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    FIXED_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    fixed: bool
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., fixed: _Optional[bool] = ...) -> None: ...

class RunContext(_message.Message):
    __slots__ = ("plugin_changes", "user", "ports", "limits")
    PLUGIN_CHANGES_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    plugin_changes: _containers.RepeatedScalarFieldContainer[str]
    user: str
    ports: _containers.RepeatedCompositeFieldContainer[AssignedPort]
    limits: str
    def __init__(self, plugin_changes: _Optional[_Iterable[str]] = ..., user: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[AssignedPort, _Mapping]]] = ..., limits: _Optional[str] = ...) -> None: ...

class PreStopOutcome(_message.Message):
    __slots__ = ("result", "exit_code", "signal", "duration_seconds", "detail", "leftovers")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LEFTOVERS_FIELD_NUMBER: _ClassVar[int]
    result: str
    exit_code: int
    signal: int
    duration_seconds: float
    detail: str
    leftovers: int
    def __init__(self, result: _Optional[str] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., detail: _Optional[str] = ..., leftovers: _Optional[int] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("group_id", "spec", "state", "containment", "leader_pid", "pgid", "detached", "exit", "started_at", "member_count", "agent", "stop", "unreachable", "env_names", "context", "unhealthy", "health", "restarts", "runs", "next_restart_at", "stdin_open", "stdin_writer")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONTAINMENT_FIELD_NUMBER: _ClassVar[int]
    LEADER_PID_FIELD_NUMBER: _ClassVar[int]
    PGID_FIELD_NUMBER: _ClassVar[int]
    DETACHED_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    MEMBER_COUNT_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    ENV_NAMES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESTART_AT_FIELD_NUMBER: _ClassVar[int]
    STDIN_OPEN_FIELD_NUMBER: _ClassVar[int]
    STDIN_WRITER_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    spec: GroupSpec
    state: GroupState
    containment: Containment
    leader_pid: int
    pgid: int
    detached: bool
    exit: ExitRecord
    started_at: _timestamp_pb2.Timestamp
    member_count: int
    agent: str
    stop: StopPolicy
    unreachable: bool
    env_names: _containers.RepeatedScalarFieldContainer[str]
    context: RunContext
    unhealthy: bool
    health: str
    restarts: int
    runs: _containers.RepeatedCompositeFieldContainer[RunRecord]
    next_restart_at: _timestamp_pb2.Timestamp
    stdin_open: bool
    stdin_writer: str
    def __init__(self, group_id: _Optional[str] = ..., spec: _Optional[_Union[GroupSpec, _Mapping]] = ..., state: _Optional[_Union[GroupState, str]] = ..., containment: _Optional[_Union[Containment, str]] = ..., leader_pid: _Optional[int] = ..., pgid: _Optional[int] = ..., detached: _Optional[bool] = ..., exit: _Optional[_Union[ExitRecord, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., member_count: _Optional[int] = ..., agent: _Optional[str] = ..., stop: _Optional[_Union[StopPolicy, _Mapping]] = ..., unreachable: _Optional[bool] = ..., env_names: _Optional[_Iterable[str]] = ..., context: _Optional[_Union[RunContext, _Mapping]] = ..., unhealthy: _Optional[bool] = ..., health: _Optional[str] = ..., restarts: _Optional[int] = ..., runs: _Optional[_Iterable[_Union[RunRecord, _Mapping]]] = ..., next_restart_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stdin_open: _Optional[bool] = ..., stdin_writer: _Optional[str] = ...) -> None: ...

class GroupEvent(_message.Message):
    __slots__ = ("seq", "group", "kind", "at", "epoch")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    group: Group
    kind: str
    at: _timestamp_pb2.Timestamp
    epoch: str
    def __init__(self, seq: _Optional[int] = ..., group: _Optional[_Union[Group, _Mapping]] = ..., kind: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., epoch: _Optional[str] = ...) -> None: ...

class Orphan(_message.Message):
    __slots__ = ("pid", "command", "former_group", "age_seconds", "found_by", "agent", "reaped")
    PID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    FORMER_GROUP_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FOUND_BY_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    REAPED_FIELD_NUMBER: _ClassVar[int]
    pid: int
    command: str
    former_group: str
    age_seconds: float
    found_by: str
    agent: str
    reaped: bool
    def __init__(self, pid: _Optional[int] = ..., command: _Optional[str] = ..., former_group: _Optional[str] = ..., age_seconds: _Optional[float] = ..., found_by: _Optional[str] = ..., agent: _Optional[str] = ..., reaped: _Optional[bool] = ...) -> None: ...

class PortOwner(_message.Message):
    __slots__ = ("port", "address", "pid", "user", "command", "group_id", "session_id", "label", "name", "listening", "agent")
    PORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LISTENING_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    port: int
    address: str
    pid: int
    user: str
    command: str
    group_id: str
    session_id: str
    label: str
    name: str
    listening: bool
    agent: str
    def __init__(self, port: _Optional[int] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., user: _Optional[str] = ..., command: _Optional[str] = ..., group_id: _Optional[str] = ..., session_id: _Optional[str] = ..., label: _Optional[str] = ..., name: _Optional[str] = ..., listening: _Optional[bool] = ..., agent: _Optional[str] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("group_id", "stream", "data", "at", "run", "dropped", "event", "offset", "seq", "session_id", "label", "agent")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    stream: OutputStream
    data: bytes
    at: _timestamp_pb2.Timestamp
    run: int
    dropped: int
    event: str
    offset: int
    seq: int
    session_id: str
    label: str
    agent: str
    def __init__(self, group_id: _Optional[str] = ..., stream: _Optional[_Union[OutputStream, str]] = ..., data: _Optional[bytes] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run: _Optional[int] = ..., dropped: _Optional[int] = ..., event: _Optional[str] = ..., offset: _Optional[int] = ..., seq: _Optional[int] = ..., session_id: _Optional[str] = ..., label: _Optional[str] = ..., agent: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("group_ids", "session_id", "tail_lines", "since", "follow")
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    group_ids: _containers.RepeatedScalarFieldContainer[str]
    session_id: str
    tail_lines: int
    since: _timestamp_pb2.Timestamp
    follow: bool
    def __init__(self, group_ids: _Optional[_Iterable[str]] = ..., session_id: _Optional[str] = ..., tail_lines: _Optional[int] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., follow: _Optional[bool] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("group_id", "session_id", "write", "stdin", "close_stdin", "tail_lines", "close_stdin_on_detach", "on_behalf_of")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_ON_DETACH_FIELD_NUMBER: _ClassVar[int]
    ON_BEHALF_OF_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    session_id: str
    write: bool
    stdin: bytes
    close_stdin: bool
    tail_lines: int
    close_stdin_on_detach: bool
    on_behalf_of: str
    def __init__(self, group_id: _Optional[str] = ..., session_id: _Optional[str] = ..., write: _Optional[bool] = ..., stdin: _Optional[bytes] = ..., close_stdin: _Optional[bool] = ..., tail_lines: _Optional[int] = ..., close_stdin_on_detach: _Optional[bool] = ..., on_behalf_of: _Optional[str] = ...) -> None: ...
