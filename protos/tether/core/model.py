"""The lifecycle model: states and their one transition table, specs, records, views.

Nothing here knows about gRPC, Docker or SSH. The edges translate protobuf to
these types (``tether.rpc.convert``); the agent, the coordinator and the
clients all speak them.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import re
import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from tether.core.errors import InvalidSpec

MARKER_ENV: Final = "TETHER_GROUP"
"""Every child carries this variable (its group id): how orphans are found."""
AGENT_ENV: Final = "TETHER_AGENT"
"""...and this one (the agent instance's marker), so agents sharing a host never claim each
other's processes, even when they share a name."""

DEFAULT_GRACE: Final = 5.0
DEFAULT_START_TIMEOUT: Final = 30.0
DEFAULT_PROBE_TIMEOUT: Final = 5.0
MAX_SECONDS: Final = 24 * 3600.0
MAX_ENV_BYTES: Final = 128 * 1024
MAX_ARGV_BYTES: Final = 128 * 1024
MAX_PATH: Final = 4096
MAX_NAME: Final = 256
MAX_LABELS: Final = 64
GROUP_ID: Final = re.compile(r"g-[0-9a-f]{8,32}\Z")
MAX_PORTS: Final = 16
PORT_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")
#: ``$PORT``, ``${PORT}``, ``$TETHER_PORT_HTTP``, ``${TETHER_PORT_HTTP}`` in a probe.
PORT_REF: Final = re.compile(
    r"\$(?:\{(PORT|TETHER_PORT_[A-Z0-9_]+)\}|(PORT|TETHER_PORT_[A-Z0-9_]+)(?![A-Za-z0-9_]))")
#: POSIX portable user and group names (plus the trailing $ of machine accounts), or ids.
ACCOUNT_NAME: Final = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10})\Z")
MEMORY_MIN: Final = 1 << 20
MEMORY_MAX: Final = 1 << 50
CPUS_MIN: Final = 0.01
CPUS_MAX: Final = 1024.0
PIDS_MAX: Final = 1 << 22


class GroupState(enum.Enum):
    """A group's place in its lifecycle; changed only through ``next_state``."""

    STARTING = "starting"
    RUNNING = "running"
    #: A run ended and the group's restart policy (or a restart request) starts another, in
    #: the same place under the same id: waiting out the backoff, then starting and probing.
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXITED = "exited"
    FAILED = "failed"
    #: The coordinator's word for a group its agent no longer knows; never an agent state.
    LOST = "lost"

    @property
    def ended(self) -> bool:
        return self in ENDED_STATES


ENDED_STATES: Final = frozenset({GroupState.STOPPED, GroupState.EXITED, GroupState.FAILED,
                                 GroupState.LOST})


class Transition(enum.Enum):
    """What happened to a group (the events of the transition table)."""

    READY = "ready"
    START_FAILED = "start_failed"
    STOP = "stop"
    EMPTY = "empty"
    EXITED = "exited"
    #: A run ended and another one will start (restart policy, liveness, a restart request).
    RUN_ENDED = "run_ended"
    #: Restarting stopped for good: the restart limit was reached (or a run left survivors).
    GIVE_UP = "give_up"


# The only place a state may change. (state, event) -> new state.
TRANSITIONS: Final = MappingProxyType(
    {
        (GroupState.STARTING, Transition.READY): GroupState.RUNNING,
        (GroupState.STARTING, Transition.START_FAILED): GroupState.FAILED,
        (GroupState.STARTING, Transition.STOP): GroupState.STOPPING,
        (GroupState.RUNNING, Transition.STOP): GroupState.STOPPING,
        (GroupState.RUNNING, Transition.EXITED): GroupState.EXITED,
        (GroupState.STOPPING, Transition.EMPTY): GroupState.STOPPED,
        # Supervision: a restart is a state of its own, never "exited, then running again".
        (GroupState.RUNNING, Transition.RUN_ENDED): GroupState.RESTARTING,
        (GroupState.RUNNING, Transition.GIVE_UP): GroupState.FAILED,
        (GroupState.RESTARTING, Transition.READY): GroupState.RUNNING,
        (GroupState.RESTARTING, Transition.STOP): GroupState.STOPPING,
        (GroupState.RESTARTING, Transition.GIVE_UP): GroupState.FAILED,
    }
)


class IllegalTransition(Exception):
    """A bug: code asked for a transition the table does not allow."""

    def __init__(self, state: GroupState, event: Transition) -> None:
        super().__init__(f"no transition from {state.value} on {event.value}")
        self.state = state
        self.event = event


def next_state(state: GroupState, event: Transition) -> GroupState:
    """The state after ``event``; raises ``IllegalTransition`` if the table has none."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


class ExitReason(enum.Enum):
    """Why a group ended (see DESIGN.md, Lifecycle)."""

    NATURAL = "natural"
    REQUESTED = "requested"
    FORCED_KILL = "forced_kill"
    EXTERNAL_SIGNAL = "external_signal"
    START_FAILED = "start_failed"
    LOST = "lost"
    #: The kernel's OOM killer ended the leader under the group's memory limit.
    OOM_KILLED = "oom_killed"
    #: The group kept ending and was restarted ``--restart-max`` times within
    #: ``--restart-window``: it is failed now (its ``runs`` say how each ended).
    RESTART_LIMIT = "restart_limit"
    #: The run ended but its leader's status could not be read (a group re-adopted after an
    #: agent restart is not the new agent's child): neither a clean exit nor a known failure.
    UNKNOWN = "unknown"


class FailureClass(enum.Enum):
    """Why a start failed; decided from the exec itself, never from logs."""

    COMMAND_NOT_FOUND = "command_not_found"
    PERMISSION_DENIED = "permission_denied"
    CWD_MISSING = "cwd_missing"
    PORT_IN_USE = "port_in_use"
    IMMEDIATE_CRASH = "immediate_crash"
    READINESS_TIMEOUT = "readiness_timeout"
    READINESS_FAILED = "readiness_failed"
    INVALID_SPEC = "invalid_spec"
    TARGET_UNREACHABLE = "target_unreachable"
    #: The agent or host ran out of something a start needs (file descriptors, processes).
    RESOURCE_EXHAUSTED = "resource_exhausted"
    #: A version file names a toolchain version that is not installed on the agent's host.
    TOOLCHAIN_MISSING = "toolchain_missing"


class Containment(enum.Enum):
    """How strongly a group is held together, strongest first."""

    CGROUP = "cgroup"
    SUBREAPER = "subreaper"
    PGID = "pgid"


class OrphanPolicy(enum.Enum):
    """What becomes of a group when its agent dies: killed by the guardian, or kept."""

    KILL = "kill"
    KEEP = "keep"


# ---------------------------------------------------------------- validation


def check_seconds(value: float, what: str, field_: str, *, allow_zero: bool = True,
                  high: float = MAX_SECONDS) -> float:
    """One rule for every duration: a finite number from 0 (or above 0) to ``high``."""
    low_ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, int | float) or math.isnan(value) or not low_ok or value > high:
        span = f"{'0' if allow_zero else 'more than 0'} to {high:g}"
        raise InvalidSpec(f"{what} {value!r} s is out of range; give {span} seconds",
                          field=field_)
    return float(value)


def check_grace(value: float) -> float:
    """A stop grace: 0 to 86400 seconds."""
    return check_seconds(value, "grace", "grace")


def check_text(text: str, what: str, *, limit: int = MAX_PATH) -> str:
    """Free text that reaches a kernel interface (paths, argv): no NUL byte, bounded size."""
    if "\0" in text:
        raise InvalidSpec(f"{what} contains a NUL byte, which no process or path can hold",
                          field=what)
    if len(text.encode(errors="surrogateescape")) > limit:
        raise InvalidSpec(f"{what} is longer than {limit} bytes", field=what)
    return text


def check_name(text: str, what: str, *, allow_empty: bool = False) -> str:
    """Names (sessions, labels, agents) are printable, without control characters."""
    if not text and not allow_empty:
        raise InvalidSpec(f"{what} is empty; give a name", field=what)
    if len(text) > MAX_NAME:
        raise InvalidSpec(f"{what} is longer than {MAX_NAME} characters", field=what)
    if any(not ch.isprintable() for ch in text):
        raise InvalidSpec(f"{what} {text!r} contains control characters", field=what)
    return text


def check_group_id(text: str) -> str:
    """A group id as agents give them out (``g-`` and hex digits)."""
    if not GROUP_ID.match(text):
        raise InvalidSpec(f"group id {text!r} is not of the form g-<8 to 32 hex digits>",
                          field="group_id")
    return text


def new_group_id() -> str:
    """A fresh, random group id."""
    return "g-" + os.urandom(6).hex()


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


# ---------------------------------------------------------------- stop policy


@dataclass(frozen=True)
class StopPolicy:
    """How a group is stopped: the effective policy, every field known."""

    signal: signal.Signals = signal.SIGTERM
    grace: float = DEFAULT_GRACE

    def __post_init__(self) -> None:
        check_grace(self.grace)


@dataclass(frozen=True)
class StopOverride:
    """What a spec or a stop request says about stopping; ``None`` leaves a field as it is.

    The one place policies combine: the agent's default, then the spec's, then a stop
    request's, each changing only what it names (``tether stop --grace 1`` keeps a
    group's ``--stop-signal INT``).
    """

    signal: signal.Signals | None = None
    grace: float | None = None

    def __post_init__(self) -> None:
        if self.grace is not None:
            check_grace(self.grace)

    def apply(self, policy: StopPolicy) -> StopPolicy:
        return StopPolicy(self.signal if self.signal is not None else policy.signal,
                          self.grace if self.grace is not None else policy.grace)


# ---------------------------------------------------------------- readiness probes


class ProbeKind(enum.Enum):
    """The kinds of readiness (and liveness) probes."""

    TCP = "tcp"
    HTTP = "http"
    LOG = "log"
    EXEC = "exec"


_USERINFO: Final = re.compile(r"//[^/?#]*@")


def public_url(text: str) -> str:
    """A URL (or an ``http:URL`` probe) without what may be secret in it: the user and
    password, the query string and the fragment. For messages, records and logs; the
    probe itself keeps them (the user and password go out as Basic authentication)."""
    return re.split(r"[?#]", _USERINFO.sub("//", text, count=1), maxsplit=1)[0]


@dataclass(frozen=True)
class Probe:
    """A parsed probe: ``tcp:``, ``http:``, ``log:`` or ``exec:`` (see ``Probe.parse``)."""

    kind: ProbeKind
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""
    pattern: str = ""
    argv: tuple[str, ...] = ()
    timeout: float = DEFAULT_PROBE_TIMEOUT
    #: The probe as written, when it refers to ports the agent assigns at spawn
    #: (``tcp:$PORT``, ``http://127.0.0.1:${TETHER_PORT_API}/health``): ``resolve`` fills
    #: them in. Empty for a probe that needs nothing filled in.
    template: str = ""

    @classmethod
    def parse(cls, text: str, *, timeout: float | None = None, field_: str = "ready") -> Probe:
        """Parse ``tcp:PORT``, ``tcp:HOST:PORT``, ``http:URL`` (or a bare ``http://`` URL),
        ``log:REGEX``, ``exec:ARGV``; any of them may refer to assigned ports as ``$PORT`` or
        ``$TETHER_PORT_<NAME>`` (checked here with a stand-in port, filled in by ``resolve``).
        ``field_`` names the option in errors: ``ready`` (readiness) or ``live`` (liveness)."""
        check_text(text, field_)
        if PORT_REF.search(text):
            probe = cls._parse(PORT_REF.sub("1", text), timeout, field_)
            return replace(probe, template=text)
        return cls._parse(text, timeout, field_)

    @property
    def port_refs(self) -> frozenset[str]:
        """The variables the probe refers to (``PORT``, ``TETHER_PORT_API``)."""
        return frozenset((m.group(1) or m.group(2)) for m in PORT_REF.finditer(self.template))

    def resolve(self, values: Mapping[str, str], field_: str = "ready") -> Probe:
        """The probe with its port references filled in from ``values``."""
        if not self.template:
            return self
        text = PORT_REF.sub(lambda m: values[m.group(1) or m.group(2)], self.template)
        return Probe.parse(text, timeout=self.timeout, field_=field_)

    @classmethod
    def _parse(cls, text: str, timeout: float | None, field_: str) -> Probe:
        noun = "liveness probe" if field_ == "live" else "readiness probe"
        if text.startswith(("http://", "https://")):
            text = "http:" + text
        kind_text, sep, rest = text.partition(":")
        hint = "use tcp:PORT, http:URL, log:REGEX or exec:COMMAND ARGS"
        if not sep or not rest:
            raise InvalidSpec(f"{noun} {text!r} is not understood; {hint}", field=field_)
        try:
            kind = ProbeKind(kind_text.lower())
        except ValueError:
            raise InvalidSpec(
                f"{noun} kind {kind_text!r} is unknown; {hint}", field=field_
            ) from None
        t = DEFAULT_PROBE_TIMEOUT if timeout is None else timeout
        check_seconds(t, "probe timeout", "probe_timeout", allow_zero=False, high=3600)
        if kind is ProbeKind.TCP:
            host, _, port_text = rest.rpartition(":")
            try:
                port = int(port_text)
            except ValueError:
                port = -1
            if not 0 < port < 65536:
                raise InvalidSpec(
                    f"{noun} {text!r}: {port_text!r} is not a TCP port (1-65535)",
                    field=field_,
                )
            # [::1]:8080 names an IPv6 address (kept without its brackets).
            return cls(kind, host=host.strip("[]") or "127.0.0.1", port=port, timeout=t)
        if kind is ProbeKind.HTTP:
            try:
                parts = urlsplit(rest)
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError as exc:
                raise InvalidSpec(f"{noun} {text!r}: {exc}", field=field_) from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidSpec(
                    f"{noun} {text!r}: give a full URL, e.g. http://127.0.0.1:8080/health",
                    field=field_,
                )
            return cls(kind, host=parts.hostname, port=port, url=rest, timeout=t)
        if kind is ProbeKind.LOG:
            try:
                re.compile(rest)
            except re.error as exc:
                raise InvalidSpec(
                    f"{noun} {text!r}: bad regular expression ({exc})", field=field_
                ) from None
            return cls(kind, pattern=rest, timeout=t)
        try:
            argv = tuple(shlex.split(rest))
        except ValueError as exc:
            raise InvalidSpec(f"{noun} {text!r}: {exc}", field=field_) from None
        if not argv:
            raise InvalidSpec(f"{noun} {text!r} has no command", field=field_)
        return cls(kind, argv=argv, timeout=t)

    @property
    def shown(self) -> str:
        """The probe as messages, records and logs show it: an ``http:`` URL without its
        user, password, query string and fragment (see ``public_url``)."""
        return public_url(str(self)) if self.kind is ProbeKind.HTTP else str(self)

    def __str__(self) -> str:
        if self.template:
            return self.template
        match self.kind:
            case ProbeKind.TCP:
                host = f"[{self.host}]" if ":" in self.host else self.host
                return f"tcp:{host}:{self.port}"
            case ProbeKind.HTTP:
                return f"http:{self.url}"
            case ProbeKind.LOG:
                return f"log:{self.pattern}"
            case _:
                return "exec:" + shlex.join(self.argv)


# ---------------------------------------------------------------- ports, limits, hooks, users


@dataclass(frozen=True)
class PortRequest:
    """``--port NAME`` (the agent picks a free port) or ``--port NAME=PORT`` (this one)."""

    name: str
    #: 0: the agent picks a free TCP port on 127.0.0.1 at spawn.
    port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not PORT_NAME.match(self.name):
            raise InvalidSpec(
                f"port name {self.name!r} is not valid; use letters, digits and '_' (at most "
                "32, starting with a letter), e.g. --port http", field="ports")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 0 <= self.port < 65536:
            raise InvalidSpec(f"port {self.name}={self.port!r} is not a TCP port (1-65535)",
                              field="ports")

    @property
    def env_name(self) -> str:
        return "TETHER_PORT_" + self.name.upper()

    @classmethod
    def parse(cls, text: str) -> PortRequest:
        """``NAME`` or ``NAME=PORT``."""
        name, sep, port_text = text.partition("=")
        if not sep:
            return cls(name)
        try:
            port = int(port_text, 10)
        except ValueError:
            port = -1
        if port == 0:
            raise InvalidSpec(f"--port {text!r}: 0 is not a fixed port; write --port {name} to "
                              "let the agent pick a free one, or give 1-65535", field="ports")
        if not 0 < port < 65536:
            raise InvalidSpec(f"--port {text!r}: {port_text!r} is not a TCP port (1-65535); "
                              f"write --port {name} to let the agent pick one", field="ports")
        return cls(name, port)

    def __str__(self) -> str:
        return f"{self.name}={self.port}" if self.port else self.name


_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(text: str | int) -> int:
    """``512M``, ``2G``, ``1048576`` (bytes; K, M, G, T are powers of 1024, an optional
    ``B``/``iB`` after them is accepted) to a byte count within the accepted range."""
    if isinstance(text, bool):
        raise InvalidSpec(f"memory {text!r} is not a size", field="memory")
    if isinstance(text, int):
        return check_memory(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if m is None:
        raise InvalidSpec(f"memory {text!r} is not understood; give bytes or a number with K, "
                          "M, G or T, e.g. --memory 512M", field="memory")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value) or value > MEMORY_MAX:
        raise InvalidSpec(f"memory {text!r} is more than the 1P tether accepts", field="memory")
    return check_memory(int(value))


def check_memory(value: int) -> int:
    if not MEMORY_MIN <= value <= MEMORY_MAX:
        hint = " (a unit is missing? e.g. 512M)" if 0 < value < MEMORY_MIN else ""
        raise InvalidSpec(f"memory limit {value} bytes is out of range{hint}; give 1M to 1P",
                          field="memory")
    return value


def check_cpus(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) \
            or not CPUS_MIN <= value <= CPUS_MAX:
        raise InvalidSpec(f"cpus {value!r} is out of range; give {CPUS_MIN:g} to {CPUS_MAX:g} "
                          "(1.5 = one and a half CPUs)", field="cpus")
    return float(value)


def check_pids(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PIDS_MAX:
        raise InvalidSpec(f"pids {value!r} is out of range; give 1 to {PIDS_MAX} (the most "
                          "processes and threads the group may have at once)", field="pids")
    return value


def format_bytes(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


@dataclass(frozen=True)
class Limits:
    """cgroup limits of a group; ``None`` leaves a resource unlimited."""

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None

    def __post_init__(self) -> None:
        if self.memory is not None:
            check_memory(self.memory)
        if self.cpus is not None:
            check_cpus(self.cpus)
        if self.pids is not None:
            check_pids(self.pids)

    def __bool__(self) -> bool:
        return self.memory is not None or self.cpus is not None or self.pids is not None

    @property
    def controllers(self) -> tuple[str, ...]:
        """The cgroup controllers these limits need."""
        return tuple(c for c, v in (("memory", self.memory), ("cpu", self.cpus),
                                    ("pids", self.pids)) if v is not None)

    def describe(self) -> str:
        parts = []
        if self.memory is not None:
            parts.append(f"memory {format_bytes(self.memory)}")
        if self.cpus is not None:
            parts.append(f"cpus {self.cpus:g}")
        if self.pids is not None:
            parts.append(f"pids {self.pids}")
        return ", ".join(parts)


@dataclass(frozen=True)
class PreStop:
    """A command run before a group's stop signal, inside its grace."""

    argv: tuple[str, ...]
    #: Its own timeout; ``None``: only the grace bounds it.
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise InvalidSpec("the pre-stop hook has no command; write e.g. "
                              "--pre-stop 'exec:tunnel close'", field="pre_stop")
        if any("\0" in a for a in self.argv):
            raise InvalidSpec("the pre-stop hook's argv contains a NUL byte", field="pre_stop")
        if sum(len(a) + 1 for a in self.argv) > MAX_ARGV_BYTES:
            raise InvalidSpec(f"the pre-stop hook's argv is larger than {MAX_ARGV_BYTES} bytes",
                              field="pre_stop")
        if self.timeout is not None:
            check_seconds(self.timeout, "pre-stop timeout", "pre_stop_timeout",
                          allow_zero=False, high=3600)

    @classmethod
    def parse(cls, text: str, *, timeout: float | None = None) -> PreStop:
        """``exec:COMMAND ARGS`` (shlex-split; no shell runs it)."""
        check_text(text, "pre_stop", limit=MAX_ARGV_BYTES)
        kind, sep, rest = text.partition(":")
        if not sep or kind.lower() != "exec":
            raise InvalidSpec(f"pre-stop hook {text!r} is not understood; write "
                              "exec:COMMAND ARGS (it runs on the group's target)",
                              field="pre_stop")
        try:
            argv = tuple(shlex.split(rest))
        except ValueError as exc:
            raise InvalidSpec(f"pre-stop hook {text!r}: {exc}", field="pre_stop") from None
        return cls(argv, timeout)

    def __str__(self) -> str:
        return "exec:" + shlex.join(self.argv)


def check_user(text: str) -> str:
    """``USER``, ``USER:GROUP`` or numeric ids; resolved on the agent's host."""
    if not text:
        return text
    user, sep, group = text.partition(":")
    for part, what in ((user, "user"), *(((group, "group"),) if sep else ())):
        if not ACCOUNT_NAME.match(part):
            raise InvalidSpec(f"{what} {part!r} in --user {text!r} is not a user or group name "
                              "(letters, digits, '.', '_', '-') or a numeric id", field="user")
    return text


class StdinMode(enum.Enum):
    """``--stdin``: what a group reads on its standard input."""

    #: ``/dev/null`` (the default): the program reads end-of-file at once.
    NULL = "null"
    #: A pipe the agent holds: clients write it through ``Attach`` (one writer at a time),
    #: and a stop closes it first (``stop_stdin_grace``), as MCP and LSP servers expect.
    PIPE = "pipe"


#: ``--stop-stdin-grace``: how long a stop waits after closing a ``--stdin pipe`` group's
#: stdin before it sends the stop signal.
DEFAULT_STOP_STDIN_GRACE: Final = 2.0
MAX_STOP_STDIN_GRACE: Final = 3600.0


def check_stdin(mode: StdinMode, grace: float | None) -> None:
    if not isinstance(mode, StdinMode):
        raise InvalidSpec(f"stdin {mode!r} is not a stdin mode; use null or pipe", field="stdin")
    if grace is None:
        return
    if mode is not StdinMode.PIPE:
        raise InvalidSpec("--stop-stdin-grace needs --stdin pipe: only a group whose stdin "
                          "the agent holds has a stdin to close first", field="stop_stdin_grace")
    check_seconds(grace, "stop stdin grace", "stop_stdin_grace", high=MAX_STOP_STDIN_GRACE)


# ---------------------------------------------------------------- supervision

DEFAULT_LIVE_INTERVAL: Final = 10.0
DEFAULT_LIVE_FAILURES: Final = 3
MIN_LIVE_INTERVAL: Final = 0.1
MAX_LIVE_FAILURES: Final = 1000
DEFAULT_RESTART_MAX: Final = 5
DEFAULT_RESTART_WINDOW: Final = 60.0
MAX_RESTART_MAX: Final = 10000
#: Restart backoff: the first pause, doubled per run that ended before it was stable, capped.
RESTART_BACKOFF_FIRST: Final = 0.5
RESTART_BACKOFF_MAX: Final = 30.0
#: A run that lasted this long was stable: the next restart starts the backoff over.
RESTART_STABLE_AFTER: Final = 10.0
#: Runs kept per group (the oldest are dropped; ``restarts`` keeps counting).
RUNS_KEPT: Final = 50


class UnhealthyAction(enum.Enum):
    """What the agent does once a group's liveness probe failed ``failures`` times in a row."""

    NONE = "none"
    RESTART = "restart"
    STOP = "stop"


class RestartMode(enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@dataclass(frozen=True)
class Liveness:
    """``--live``: is a running group still answering? Checked every ``interval`` seconds;
    ``failures`` failed checks in a row mark it unhealthy, and ``on_unhealthy`` acts."""

    probe: Probe
    interval: float = DEFAULT_LIVE_INTERVAL
    failures: int = DEFAULT_LIVE_FAILURES
    on_unhealthy: UnhealthyAction = UnhealthyAction.NONE

    def __post_init__(self) -> None:
        if self.probe.kind is ProbeKind.LOG:
            raise InvalidSpec("a log: probe cannot tell whether a running program still "
                              "answers; give --live tcp:PORT, http:URL or exec:COMMAND",
                              field="live")
        check_seconds(self.interval, "live interval", "live_interval", allow_zero=False)
        if self.interval < MIN_LIVE_INTERVAL:
            raise InvalidSpec(f"live interval {self.interval:g} s is too short; give "
                              f"{MIN_LIVE_INTERVAL:g} s or more", field="live_interval")
        if isinstance(self.failures, bool) or not 1 <= self.failures <= MAX_LIVE_FAILURES:
            raise InvalidSpec(f"live failures {self.failures!r} is out of range; give 1 to "
                              f"{MAX_LIVE_FAILURES} failed checks in a row",
                              field="live_failures")


@dataclass(frozen=True)
class RestartPolicy:
    """``--restart``: whether a run that ended starts again, and how often at most."""

    mode: RestartMode = RestartMode.NO
    #: At most this many automatic restarts within ``window`` seconds; one more ends the
    #: group ``failed`` (reason ``restart_limit``).
    limit: int = DEFAULT_RESTART_MAX
    window: float = DEFAULT_RESTART_WINDOW

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not 1 <= self.limit <= MAX_RESTART_MAX:
            raise InvalidSpec(f"restart max {self.limit!r} is out of range; give 1 to "
                              f"{MAX_RESTART_MAX} restarts (use --restart no for none)",
                              field="restart_max")
        check_seconds(self.window, "restart window", "restart_window", allow_zero=False)

    def wants(self, record: ExitRecord) -> bool:
        """Does a run that ended like ``record`` start again? ``on-failure``: anything but a
        clean exit 0 or an end somebody asked for through tether (a signal sent through
        tether is somebody's decision, not a failure). So a non-zero exit code, a signal
        nobody here sent, the OOM killer, and an end whose status is unknown (a re-adopted
        leader: a crash cannot be told from a clean exit, and a service that stays down is
        the worse mistake) all restart it."""
        if self.mode is RestartMode.ALWAYS:
            return True
        if self.mode is RestartMode.ON_FAILURE:
            if record.reason in _DECIDED_ENDS:
                return False
            return (record.reason is not ExitReason.NATURAL
                    or record.exit_code not in (None, 0) or record.signal is not None)
        return False


#: Ends somebody decided through tether: never a failure for ``--restart on-failure``.
_DECIDED_ENDS = frozenset({ExitReason.REQUESTED, ExitReason.FORCED_KILL})


def restart_delay(unstable_runs: int, jitter: float) -> float:
    """The pause before a restart: ``RESTART_BACKOFF_FIRST`` doubled for each earlier run
    in a row that ended before it was stable, capped at ``RESTART_BACKOFF_MAX``; ``jitter``
    in [0, 1) spreads it over 75 % to 125 % (never above the cap), so groups that crash
    together do not restart together."""
    base = RESTART_BACKOFF_FIRST * 2.0 ** min(max(unstable_runs, 0), 30)
    return min(RESTART_BACKOFF_MAX, base * (0.75 + 0.5 * jitter))


# ---------------------------------------------------------------- the spec


def _frozen(mapping: Mapping[str, str] | None = None) -> MappingProxyType[str, str]:
    return MappingProxyType(dict(mapping or {}))


#: An adopted group's argv is this and the adopted pid: nothing tether could run again.
ADOPTED_PREFIX = "adopted:"


@dataclass(frozen=True)
class GroupSpec:
    """What to start, and how to treat it. Validated on construction: every field that
    reaches a kernel interface or a log line is checked here, before anything starts."""

    argv: tuple[str, ...]
    cwd: str = ""
    env: MappingProxyType[str, str] = field(default_factory=_frozen)
    inherit_env: bool = False
    log_path: str = ""
    ready: Probe | None = None
    start_timeout: float = DEFAULT_START_TIMEOUT
    stop: StopOverride = StopOverride()
    orphan_policy: OrphanPolicy = OrphanPolicy.KILL
    label: str = ""
    labels: MappingProxyType[str, str] = field(default_factory=_frozen)
    session_id: str = ""
    window: str = ""
    stop_order: int = 0
    target: str = "local"
    owns_target: bool = False
    #: Run as this user (``USER[:GROUP]``), resolved on the agent's host; "" keeps the agent's.
    user: str = ""
    #: Ports the agent assigns (``PORT``, ``TETHER_PORT_<NAME>``) and keeps reserved.
    ports: tuple[PortRequest, ...] = ()
    limits: Limits = Limits()
    pre_stop: PreStop | None = None
    #: Apply the agent's toolchain plugins (``--no-plugins`` turns them off).
    plugins: bool = True
    #: ``--live``: liveness checks while running (None: none, and no cost).
    liveness: Liveness | None = None
    #: ``--restart``: whether a run that ended starts again (default: no).
    restart: RestartPolicy = RestartPolicy()
    #: The W3C traceparent of the call that started the group (``tether.core.trace``):
    #: in the child's environment as TRACEPARENT, on its events, records and log lines.
    traceparent: str = ""
    #: ``--stdin``: /dev/null (default) or a pipe clients write through ``Attach``.
    stdin: StdinMode = StdinMode.NULL
    #: ``--stop-stdin-grace``: a stop closes a piped stdin first and waits this long
    #: before the stop signal (None: ``DEFAULT_STOP_STDIN_GRACE``).
    stop_stdin_grace: float | None = None

    @property
    def stdin_grace(self) -> float:
        """The wait after closing stdin in a stop (0 unless ``--stdin pipe``)."""
        if self.stdin is not StdinMode.PIPE:
            return 0.0
        return DEFAULT_STOP_STDIN_GRACE if self.stop_stdin_grace is None \
            else self.stop_stdin_grace

    def __post_init__(self) -> None:
        if isinstance(self.stop, StopPolicy):  # a full policy names both fields
            object.__setattr__(self, "stop", StopOverride(self.stop.signal, self.stop.grace))
        if not self.argv or not self.argv[0]:
            raise InvalidSpec(
                "argv is empty: give the command to run, e.g. `-- python -m http.server`",
                field="argv",
            )
        for name, values in (("argv", self.argv), ("env", (*self.env, *self.env.values()))):
            if any("\0" in a for a in values):
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
        check_seconds(self.start_timeout, "start timeout", "start_timeout", allow_zero=False)
        for path, what in ((self.cwd, "cwd"), (self.log_path, "log_path")):
            check_text(path, what)
            if path and not path.startswith("/"):
                raise InvalidSpec(f"{what} {path!r} must be an absolute path", field=what)
        if self.ready is not None and self.ready.kind is ProbeKind.LOG and not self.log_path:
            raise InvalidSpec("a log: readiness probe needs a log file (--log FILE)",
                              field="ready")
        if not (-(2**31) <= self.stop_order < 2**31):
            raise InvalidSpec(f"stop_order {self.stop_order} is out of range "
                              f"({-(2**31)} to {2**31 - 1})", field="stop_order")
        for text, name in ((self.label, "label"), (self.session_id, "session"),
                           (self.window, "window")):
            check_name(text, name, allow_empty=True)
        check_name(self.target, "target")
        if len(self.labels) > MAX_LABELS:
            raise InvalidSpec(f"{len(self.labels)} labels; at most {MAX_LABELS}", field="labels")
        for key, value in self.labels.items():
            check_name(key, "label name")
            check_name(value, f"label {key!r}", allow_empty=True)
        check_user(self.user)
        if not isinstance(self.limits, Limits):
            raise InvalidSpec("limits must be a Limits value", field="limits")
        if self.pre_stop is not None and not isinstance(self.pre_stop, PreStop):
            raise InvalidSpec("pre_stop must be a PreStop value", field="pre_stop")
        check_stdin(self.stdin, self.stop_stdin_grace)
        self._check_ports()

    @property
    def adopted(self) -> bool:
        """A tree tether took over (``tether adopt``) rather than started: it cannot be
        started again, so it is never restarted."""
        return bool(self.argv) and self.argv[0].startswith(ADOPTED_PREFIX)

    def _check_ports(self) -> None:
        if len(self.ports) > MAX_PORTS:
            raise InvalidSpec(f"{len(self.ports)} ports asked for; a group may have at most "
                              f"{MAX_PORTS}", field="ports")
        names: dict[str, str] = {}
        fixed: dict[int, str] = {}
        for p in self.ports:
            if not isinstance(p, PortRequest):
                raise InvalidSpec("ports must be PortRequest values", field="ports")
            if p.env_name in names:
                raise InvalidSpec(f"ports {names[p.env_name]!r} and {p.name!r} would both be "
                                  f"{p.env_name}; give them different names", field="ports")
            names[p.env_name] = p.name
            if p.port in fixed:
                raise InvalidSpec(f"ports {fixed[p.port]!r} and {p.name!r} both ask for port "
                                  f"{p.port}", field="ports")
            if p.port:
                fixed[p.port] = p.name
        if self.ports:
            for key in ("PORT", *names):
                if key in self.env:
                    raise InvalidSpec(f"--env {key} conflicts with --port, which sets {key}; "
                                      "drop one of them", field="env")
        known = {"PORT", *names} if self.ports else set()
        live = self.liveness.probe if self.liveness is not None else None
        for probe, noun, field_ in ((self.ready, "readiness", "ready"),
                                    (live, "liveness", "live")):
            if probe is None or not probe.template:
                continue
            missing = sorted(probe.port_refs - known)
            if missing:
                have = ", ".join(sorted(known)) or "none: add --port NAME"
                raise InvalidSpec(f"{noun} probe {probe.shown!r} refers to ${missing[0]}, "
                                  f"which no --port sets (ports: {have})", field=field_)


def spec_to_dict(spec: GroupSpec) -> dict[str, Any]:
    """A JSON-able form of a spec (the agent's state file, idempotency fingerprints)."""
    d: dict[str, Any] = {
        "argv": list(spec.argv), "cwd": spec.cwd, "env": dict(spec.env),
        "inherit_env": spec.inherit_env, "log_path": spec.log_path,
        "ready": str(spec.ready) if spec.ready else "",
        "probe_timeout": spec.ready.timeout if spec.ready else None,
        "start_timeout": spec.start_timeout,
        "stop_signal": spec.stop.signal.name if spec.stop.signal else None,
        "grace": spec.stop.grace,
        "orphan_policy": spec.orphan_policy.value, "label": spec.label,
        "labels": dict(spec.labels), "session_id": spec.session_id, "window": spec.window,
        "stop_order": spec.stop_order, "target": spec.target, "owns_target": spec.owns_target,
        **_supervision_to_dict(spec),
    }
    # Keys of later features only when used: fingerprints of earlier specs stay as they were.
    if spec.user:
        d["user"] = spec.user
    if spec.ports:
        d["ports"] = [[p.name, p.port] for p in spec.ports]
    if spec.limits:
        d["limits"] = {"memory": spec.limits.memory, "cpus": spec.limits.cpus,
                       "pids": spec.limits.pids}
    if spec.pre_stop is not None:
        d["pre_stop"] = list(spec.pre_stop.argv)
        d["pre_stop_timeout"] = spec.pre_stop.timeout
    if not spec.plugins:
        d["plugins"] = False
    if spec.traceparent:
        d["traceparent"] = spec.traceparent
    if spec.stdin is not StdinMode.NULL:
        d["stdin"] = spec.stdin.value
        d["stop_stdin_grace"] = spec.stop_stdin_grace
    return d


def _supervision_to_dict(spec: GroupSpec) -> dict[str, Any]:
    """Only what differs from the defaults: a spec without supervision keeps the form (and
    the idempotency fingerprint) it had before supervision existed."""
    out: dict[str, Any] = {}
    live = spec.liveness
    if live is not None:
        out.update(live=str(live.probe), live_timeout=live.probe.timeout,
                   live_interval=live.interval, live_failures=live.failures,
                   on_unhealthy=live.on_unhealthy.value)
    if spec.restart != RestartPolicy():
        out.update(restart=spec.restart.mode.value, restart_max=spec.restart.limit,
                   restart_window=spec.restart.window)
    return out


def spec_from_dict(d: Mapping[str, Any]) -> GroupSpec:
    """The inverse of ``spec_to_dict`` (also reads state files written before
    ``probe_timeout`` and partial stop policies existed)."""
    ready = d.get("ready") or ""
    return GroupSpec(
        argv=tuple(d["argv"]), cwd=d["cwd"], env=_frozen(d["env"]),
        inherit_env=d["inherit_env"], log_path=d["log_path"],
        ready=Probe.parse(ready, timeout=d.get("probe_timeout")) if ready else None,
        start_timeout=d["start_timeout"],
        stop=StopOverride(parse_signal(d["stop_signal"]) if d.get("stop_signal") else None,
                          d.get("grace")),
        orphan_policy=OrphanPolicy(d["orphan_policy"]), label=d["label"],
        labels=_frozen(d["labels"]), session_id=d["session_id"], window=d["window"],
        stop_order=d["stop_order"], target=d["target"] or "local",
        owns_target=d["owns_target"], user=d.get("user", ""),
        ports=tuple(PortRequest(name, port) for name, port in d.get("ports", ())),
        limits=Limits(**(d.get("limits") or {})),
        pre_stop=(PreStop(tuple(d["pre_stop"]), d.get("pre_stop_timeout"))
                  if d.get("pre_stop") else None),
        plugins=d.get("plugins", True),
        liveness=Liveness(Probe.parse(d["live"], timeout=d.get("live_timeout"), field_="live"),
                          d["live_interval"], d["live_failures"],
                          UnhealthyAction(d["on_unhealthy"])) if d.get("live") else None,
        restart=RestartPolicy(RestartMode(d["restart"]), d["restart_max"], d["restart_window"])
        if d.get("restart") else RestartPolicy(),
        traceparent=d.get("traceparent", ""),
        stdin=StdinMode(d.get("stdin", StdinMode.NULL.value)),
        stop_stdin_grace=d.get("stop_stdin_grace"))


def spec_fingerprint(spec: GroupSpec) -> str:
    """Equal for equal specs: what an idempotency key is bound to. The trace context is
    not part of the request (a retry may come under another trace)."""
    d = spec_to_dict(spec)
    d.pop("traceparent", None)
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()[:32]


def key_fingerprint(agent: str, spec: GroupSpec) -> str:
    """What an idempotency key is bound to: the spec and the agent it was sent to."""
    text = agent + "\0" + spec_fingerprint(spec)
    return hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()[:32]


# ---------------------------------------------------------------- records and views


@dataclass(frozen=True)
class AssignedPort:
    name: str
    port: int
    #: Asked for as NAME=PORT (else picked by the agent).
    fixed: bool = False

    @property
    def env_name(self) -> str:
        return "TETHER_PORT_" + self.name.upper()


@dataclass(frozen=True)
class RunContext:
    """What a group runs with, beyond its spec: decided by the agent at spawn."""

    #: One line per change a toolchain plugin made ("pyenv: PATH += …/3.12.1/bin").
    plugins: tuple[str, ...] = ()
    #: The user it runs as ("alice (uid 1001, gid 1001)"); "" for the agent's own.
    user: str = ""
    ports: tuple[AssignedPort, ...] = ()
    #: The limits in force and how they are enforced.
    limits: str = ""

    def __bool__(self) -> bool:
        return bool(self.plugins or self.user or self.ports or self.limits)

    def port_env(self) -> dict[str, str]:
        """``PORT`` (the first port) and ``TETHER_PORT_<NAME>`` for each."""
        if not self.ports:
            return {}
        env = {"PORT": str(self.ports[0].port)}
        env.update((p.env_name, str(p.port)) for p in self.ports)
        return env


def context_to_dict(c: RunContext) -> dict[str, Any]:
    return {"plugins": list(c.plugins), "user": c.user,
            "ports": [[p.name, p.port, p.fixed] for p in c.ports], "limits": c.limits}


def context_from_dict(d: Mapping[str, Any]) -> RunContext:
    return RunContext(tuple(d.get("plugins", ())), d.get("user", ""),
                      tuple(AssignedPort(n, p, f) for n, p, f in d.get("ports", ())),
                      d.get("limits", ""))


class PreStopResult(enum.StrEnum):
    OK = "ok"
    #: The hook exited with a code other than 0 (or was killed by a signal).
    FAILED = "failed"
    #: It ran into its timeout (or the grace); its whole tree was killed.
    TIMEOUT = "timeout"
    #: It could not be started (command not found, target unreachable).
    ERROR = "error"
    #: It ran to its end on a target that does not report exit codes (SSH).
    EXITED = "exited"
    #: The group had already ended: there was nothing to prepare.
    SKIPPED = "skipped"


@dataclass(frozen=True)
class PreStopOutcome:
    result: PreStopResult
    exit_code: int | None = None
    signal: int | None = None
    duration: float = 0.0
    detail: str = ""
    #: Processes the hook left behind (a daemon it forked), killed with its tree.
    leftovers: int = 0


@dataclass(frozen=True)
class ExitRecord:
    """How a group ended. ``clean`` is decided here, once: zero survivors and not lost."""

    reason: ExitReason
    exit_code: int | None = None
    signal: int | None = None
    survivors: int = 0
    failure: FailureClass | None = None
    message: str = ""
    stop_duration: float = 0.0
    ended_at: float = 0.0
    detail: str = ""
    clean: bool = field(init=False)
    #: What the group ran with (plugin changes, user, ports, limits).
    context: RunContext = RunContext()
    pre_stop: PreStopOutcome | None = None
    #: Members the kernel's OOM killer ended.
    oom_kills: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "clean",
                           self.survivors == 0 and self.reason is not ExitReason.LOST)


@dataclass(frozen=True)
class RunRecord:
    """One run of a group that was restarted: when it started and how it ended."""

    started_at: float
    exit: ExitRecord

    @property
    def duration(self) -> float:
        return max(0.0, self.exit.ended_at - self.started_at)


@dataclass(frozen=True)
class LeaderStatus:
    """How the leader process ended, from its wait status."""

    exit_code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> LeaderStatus:
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        if os.WIFEXITED(status):
            return cls(exit_code=os.WEXITSTATUS(status))
        return cls()

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        if self.exit_code is not None:
            return f"exit code {self.exit_code}"
        return "status unknown"


@dataclass(frozen=True)
class GroupView:
    """A snapshot of one group, as clients see it."""

    group_id: str
    spec: GroupSpec
    state: GroupState
    containment: Containment
    #: The stop policy in force: the agent's default, then the spec's.
    stop: StopPolicy = StopPolicy()
    leader_pid: int = 0
    pgid: int = 0
    detached: bool = False
    #: The target (host, container) holding the group cannot be reached right now.
    unreachable: bool = False
    exit: ExitRecord | None = None
    started_at: float = 0.0
    member_count: int = 0
    leader_start_time: float = 0.0
    cgroup: str = ""
    #: What the group runs with beyond its spec (plugin changes, user, ports, limits).
    context: RunContext = RunContext()
    #: Its liveness probe failed ``failures`` times in a row (cleared by a passing check or
    #: a new run); ``health`` says what the last failed check saw.
    unhealthy: bool = False
    health: str = ""
    #: Runs started after the first (automatic and requested), and the ended runs kept
    #: (at most ``RUNS_KEPT``, oldest first).
    restarts: int = 0
    runs: tuple[RunRecord, ...] = ()
    #: While ``restarting`` in a backoff: when (``time.time()``) the next run starts.
    next_restart_at: float = 0.0
    #: ``--stdin pipe``: the current run's stdin is open, and who writes it (an
    #: ``Attach``: its credential and peer), if anybody does.
    stdin_open: bool = False
    stdin_writer: str = ""

    def with_state(self, state: GroupState, exit: ExitRecord | None = None) -> GroupView:
        return replace(self, state=state, exit=exit if exit is not None else self.exit)

    def not_restartable(self) -> str:
        """Why ``tether restart`` refuses this live group (the agent's own rules, so a
        coordinator can refuse a multi-group restart whole, before any group is touched);
        empty: it may be restarted."""
        if self.spec.adopted:
            return ("was adopted: tether did not start it and cannot start it again; leave it "
                    "out (--group/--label) or stop it")
        if self.state is GroupState.STARTING:
            return "is still starting; restart it once it runs"
        if self.state is GroupState.STOPPING:
            return "is being stopped"
        return ""


class EventKind(enum.StrEnum):
    """What a group event reports."""

    #: The current state of a group, sent first to a new watcher.
    INITIAL = "initial"
    #: The group changed state (starting, running, stopping).
    STATE = "state"
    #: The leader exited while members live on: the group keeps running, detached.
    DETACHED = "detached"
    #: The group ended; its view carries the exit record.
    EXIT = "exit"
    #: Its target (SSH host, container) cannot be reached; the watcher keeps trying.
    UNREACHABLE = "unreachable"
    #: Its target answers again.
    REACHABLE = "reachable"
    #: Its liveness probe failed ``--live-failures`` times in a row.
    UNHEALTHY = "unhealthy"
    #: A liveness check passed again after it was unhealthy.
    HEALTHY = "healthy"
    #: An ended group was dropped from its session's listing (``tether forget``).
    FORGOTTEN = "forgotten"
    #: Every group of a stopping session has its record; the event carries the report.
    SESSION_STOPPED = "session_stopped"


@dataclass(frozen=True)
class GroupEvent:
    """One change of one group, numbered within its sender's epoch."""

    seq: int
    kind: EventKind
    group: GroupView
    at: float


@dataclass(frozen=True)
class SignalOutcome:
    """What a signal to a group did."""

    members_signalled: int
    #: True when the group had already ended (or had no member left): nothing was sent.
    already_gone: bool
    group: GroupView


@dataclass(frozen=True)
class PortOwner:
    """Who holds a TCP port: a group (``group_id`` set) or another process."""

    port: int
    #: The listening address; "" for a reservation nobody listens on yet.
    address: str = ""
    pid: int = 0
    user: str = ""
    command: str = ""
    group_id: str = ""
    session_id: str = ""
    label: str = ""
    #: The port's name in its group (``--port NAME``).
    name: str = ""
    listening: bool = True
    agent: str = ""

    def describe(self) -> str:
        """One line for a message: who it is."""
        if self.group_id:
            who = f"group {self.group_id}"
            if self.label:
                who += f" ({self.label})"
            if self.session_id:
                who += f" of session {self.session_id!r}"
            if self.name:
                who += f", port {self.name}"
            return who + ("" if self.listening else ", reserved")
        if self.pid:
            return f"pid {self.pid} ({self.command or '?'}, user {self.user or '?'})"
        return "a process this agent cannot see (another user's or network namespace)"
