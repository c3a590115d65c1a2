"""The lifecycle model: states and their one transition table, specs, exit records.

Nothing here knows about gRPC, Docker or SSH. Servicers translate protobuf to
these types at the edge (``tether.agent.convert``).
"""

from __future__ import annotations

import enum
import shlex
import signal
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from tether.agent.errors import InvalidSpec

MARKER_ENV: Final = "TETHER_GROUP"
"""Every child carries this variable (its group id): how orphans are found."""
AGENT_ENV: Final = "TETHER_AGENT"
"""...and this one (the agent's name), so agents sharing a host never claim each other's."""

DEFAULT_GRACE: Final = 5.0
DEFAULT_START_TIMEOUT: Final = 30.0
DEFAULT_PROBE_TIMEOUT: Final = 5.0
MAX_ENV_BYTES: Final = 128 * 1024
MAX_ARGV_BYTES: Final = 128 * 1024


class GroupState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXITED = "exited"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in ENDED_STATES


ENDED_STATES: Final = frozenset({GroupState.STOPPED, GroupState.EXITED, GroupState.FAILED})


class Transition(enum.Enum):
    READY = "ready"
    START_FAILED = "start_failed"
    STOP = "stop"
    EMPTY = "empty"
    EXITED = "exited"


# The only place a state may change. (state, event) -> new state.
TRANSITIONS: Final = MappingProxyType(
    {
        (GroupState.STARTING, Transition.READY): GroupState.RUNNING,
        (GroupState.STARTING, Transition.START_FAILED): GroupState.FAILED,
        (GroupState.STARTING, Transition.STOP): GroupState.STOPPING,
        (GroupState.RUNNING, Transition.STOP): GroupState.STOPPING,
        (GroupState.RUNNING, Transition.EXITED): GroupState.EXITED,
        (GroupState.STOPPING, Transition.EMPTY): GroupState.STOPPED,
    }
)


class IllegalTransition(Exception):
    """A bug: code asked for a transition the table does not allow."""

    def __init__(self, state: GroupState, event: Transition) -> None:
        super().__init__(f"no transition from {state.value} on {event.value}")
        self.state = state
        self.event = event


def next_state(state: GroupState, event: Transition) -> GroupState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


class ExitReason(enum.Enum):
    NATURAL = "natural"
    REQUESTED = "requested"
    FORCED_KILL = "forced_kill"
    EXTERNAL_SIGNAL = "external_signal"
    START_FAILED = "start_failed"
    LOST = "lost"


class FailureClass(enum.Enum):
    COMMAND_NOT_FOUND = "command_not_found"
    PERMISSION_DENIED = "permission_denied"
    CWD_MISSING = "cwd_missing"
    PORT_IN_USE = "port_in_use"
    IMMEDIATE_CRASH = "immediate_crash"
    READINESS_TIMEOUT = "readiness_timeout"
    READINESS_FAILED = "readiness_failed"
    INVALID_SPEC = "invalid_spec"
    TARGET_UNREACHABLE = "target_unreachable"


class Containment(enum.Enum):
    """How strongly a group is held together, strongest first."""

    CGROUP = "cgroup"
    SUBREAPER = "subreaper"
    PGID = "pgid"


class OrphanPolicy(enum.Enum):
    KILL = "kill"
    KEEP = "keep"


def parse_signal(name: str | int) -> signal.Signals:
    """``"TERM"``, ``"SIGTERM"``, ``"sigterm"`` or ``15`` to a Signals member."""
    if isinstance(name, int):
        try:
            return signal.Signals(name)
        except ValueError:
            raise InvalidSpec(f"unknown signal number {name}", field="signal") from None
    text = name.strip().upper()
    if text.isdigit():
        return parse_signal(int(text))
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        known = ", ".join(s.name.removeprefix("SIG") for s in signal.Signals if "_" not in s.name)
        raise InvalidSpec(
            f"unknown signal {name!r}; use a name like TERM, INT, HUP, KILL (known: {known})",
            field="signal",
        ) from None


@dataclass(frozen=True)
class StopPolicy:
    signal: signal.Signals = signal.SIGTERM
    grace: float = DEFAULT_GRACE

    def __post_init__(self) -> None:
        if not (0 <= self.grace <= 24 * 3600):
            raise InvalidSpec(
                f"grace {self.grace!r} s is out of range; give 0 to 86400 seconds", field="grace"
            )


class ProbeKind(enum.Enum):
    TCP = "tcp"
    HTTP = "http"
    LOG = "log"
    EXEC = "exec"


@dataclass(frozen=True)
class Probe:
    kind: ProbeKind
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""
    pattern: str = ""
    argv: tuple[str, ...] = ()
    timeout: float = DEFAULT_PROBE_TIMEOUT

    @classmethod
    def parse(cls, text: str, *, timeout: float | None = None) -> Probe:
        """Parse ``tcp:PORT``, ``tcp:HOST:PORT``, ``http:URL``, ``log:REGEX``, ``exec:ARGV``."""
        import re

        kind_text, sep, rest = text.partition(":")
        hint = "use tcp:PORT, http:URL, log:REGEX or exec:COMMAND ARGS"
        if not sep or not rest:
            raise InvalidSpec(f"readiness probe {text!r} is not understood; {hint}", field="ready")
        try:
            kind = ProbeKind(kind_text.lower())
        except ValueError:
            raise InvalidSpec(
                f"readiness probe kind {kind_text!r} is unknown; {hint}", field="ready"
            ) from None
        t = DEFAULT_PROBE_TIMEOUT if timeout is None else timeout
        if not (0 < t <= 3600):
            raise InvalidSpec(f"probe timeout {t!r} s is out of range (0, 3600]", field="ready")
        if kind is ProbeKind.TCP:
            host, _, port_text = rest.rpartition(":")
            try:
                port = int(port_text)
            except ValueError:
                port = -1
            if not 0 < port < 65536:
                raise InvalidSpec(
                    f"readiness probe {text!r}: {port_text!r} is not a TCP port (1-65535)",
                    field="ready",
                )
            return cls(kind, host=host or "127.0.0.1", port=port, timeout=t)
        if kind is ProbeKind.HTTP:
            parts = urlsplit(rest)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidSpec(
                    f"readiness probe {text!r}: give a full URL, e.g. http:http://127.0.0.1:8080/health",
                    field="ready",
                )
            return cls(kind, host=parts.hostname, port=parts.port or 80, url=rest, timeout=t)
        if kind is ProbeKind.LOG:
            try:
                re.compile(rest)
            except re.error as exc:
                raise InvalidSpec(
                    f"readiness probe {text!r}: bad regular expression ({exc})", field="ready"
                ) from None
            return cls(kind, pattern=rest, timeout=t)
        try:
            argv = tuple(shlex.split(rest))
        except ValueError as exc:
            raise InvalidSpec(f"readiness probe {text!r}: {exc}", field="ready") from None
        if not argv:
            raise InvalidSpec(f"readiness probe {text!r} has no command", field="ready")
        return cls(kind, argv=argv, timeout=t)

    def __str__(self) -> str:
        match self.kind:
            case ProbeKind.TCP:
                return f"tcp:{self.host}:{self.port}"
            case ProbeKind.HTTP:
                return f"http:{self.url}"
            case ProbeKind.LOG:
                return f"log:{self.pattern}"
            case _:
                return "exec:" + shlex.join(self.argv)


@dataclass(frozen=True)
class GroupSpec:
    """What to start, and how to treat it. Validated on construction."""

    argv: tuple[str, ...]
    cwd: str = ""
    env: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    inherit_env: bool = False
    log_path: str = ""
    ready: Probe | None = None
    start_timeout: float = DEFAULT_START_TIMEOUT
    stop: StopPolicy = StopPolicy()
    orphan_policy: OrphanPolicy = OrphanPolicy.KILL
    label: str = ""
    labels: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    session_id: str = ""
    window: str = ""
    stop_order: int = 0
    target: str = "local"
    owns_target: bool = False

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise InvalidSpec(
                "argv is empty: give the command to run, e.g. `-- python -m http.server`",
                field="argv",
            )
        for name, value in (("argv", self.argv), ("env", (*self.env, *self.env.values()))):
            if any("\0" in a for a in value):
                raise InvalidSpec(f"{name} contains a NUL byte, which no process can receive",
                                  field=name)
        if sum(len(a) + 1 for a in self.argv) > MAX_ARGV_BYTES:
            raise InvalidSpec(f"argv is larger than {MAX_ARGV_BYTES} bytes", field="argv")
        env_size = sum(len(k) + len(v) + 2 for k, v in self.env.items())
        if env_size > MAX_ENV_BYTES:
            raise InvalidSpec(
                f"environment is {env_size} bytes, more than the {MAX_ENV_BYTES} allowed; "
                "pass large values through a file",
                field="env",
            )
        for key in self.env:
            if not key or "=" in key:
                raise InvalidSpec(f"environment name {key!r} is not valid (empty or has '=')",
                                  field="env")
        if not (0 < self.start_timeout <= 24 * 3600):
            raise InvalidSpec(
                f"start timeout {self.start_timeout!r} s is out of range (0, 86400]",
                field="start_timeout",
            )
        if self.cwd and not self.cwd.startswith("/"):
            raise InvalidSpec(f"cwd {self.cwd!r} must be an absolute path", field="cwd")
        if self.log_path and not self.log_path.startswith("/"):
            raise InvalidSpec(f"log path {self.log_path!r} must be an absolute path",
                              field="log_path")
        if self.ready is not None and self.ready.kind is ProbeKind.LOG and not self.log_path:
            raise InvalidSpec("a log: readiness probe needs a log file (--log FILE)",
                              field="ready")
        if not (-(2**31) <= self.stop_order < 2**31):
            raise InvalidSpec("stop_order is out of range", field="stop_order")
        for text, name in ((self.label, "label"), (self.session_id, "session"),
                           (self.window, "window")):
            check_name(text, name, allow_empty=True)


def check_name(text: str, what: str, *, allow_empty: bool = False) -> str:
    """Names (sessions, labels, agents) are printable, without control characters."""
    if not text and not allow_empty:
        raise InvalidSpec(f"{what} is empty; give a name", field=what)
    if len(text) > 256:
        raise InvalidSpec(f"{what} is longer than 256 characters", field=what)
    if any(not ch.isprintable() for ch in text):
        raise InvalidSpec(f"{what} {text!r} contains control characters", field=what)
    return text


@dataclass(frozen=True)
class ExitRecord:
    reason: ExitReason
    exit_code: int | None = None
    signal: int | None = None
    survivors: int = 0
    failure: FailureClass | None = None
    message: str = ""
    stop_duration: float = 0.0
    ended_at: float = 0.0
    detail: str = ""

    @property
    def clean(self) -> bool:
        return self.survivors == 0 and self.reason is not ExitReason.LOST


@dataclass(frozen=True)
class LeaderStatus:
    """How the leader process ended, from its wait status."""

    exit_code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> LeaderStatus:
        import os

        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        if os.WIFEXITED(status):
            return cls(exit_code=os.WEXITSTATUS(status))
        return cls()
