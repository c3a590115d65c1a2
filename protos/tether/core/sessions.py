"""Sessions, agents and reports: what the coordinator keeps and what its clients see.

Like ``model.py``, pure data and rules: no gRPC, no storage. The coordinator works
on these; its service converts them at the edge; the Python SDK returns them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace

from tether.core.errors import InvalidSpec
from tether.core.model import (
    Containment,
    EventKind,
    ExitRecord,
    GroupState,
    GroupView,
    PortOwner,
    check_name,
    check_seconds,
)

MAX_TTL = 30 * 24 * 3600.0
#: A stream lease's grace (``OpenLease``): how long a session outlives its lost stream.
DEFAULT_LEASE_GRACE = 10.0
MAX_LEASE_GRACE = 24 * 3600.0


class SessionState(enum.StrEnum):
    """A session's lifecycle: active, stopping (closed to new spawns), stopped."""

    ACTIVE = "active"
    STOPPING = "stopping"
    STOPPED = "stopped"


def check_ttl(ttl: float, *, allow_zero: bool = True) -> float:
    """A lease time-to-live: up to 30 days."""
    return check_seconds(ttl, "ttl", "ttl", allow_zero=allow_zero, high=MAX_TTL)


def check_lease_grace(grace: float) -> float:
    """A stream lease's grace: more than 0, at most a day."""
    return check_seconds(grace, "lease grace", "lease_grace", allow_zero=False,
                         high=MAX_LEASE_GRACE)


def check_window_labels(window: str, labels: dict[str, str] | None) -> None:
    """A session's window name and labels: printable names (checked on every request that
    names them, for a new session or an existing one alike)."""
    check_name(window, "window", allow_empty=True)
    for key, value in (labels or {}).items():
        check_name(key, "label name")
        check_name(value, f"label {key!r}", allow_empty=True)


@dataclass
class Session:
    """What a user thinks of as one unit of work (an editor window, a dev-server run)."""

    session_id: str
    window: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    state: SessionState = SessionState.ACTIVE
    #: Lease time-to-live in seconds; 0: no lease.
    ttl: float = 0.0
    lease_expires_at: float = 0.0
    #: Why it stopped: "requested", "lease_expired" (TTL), "lease_lost" (stream lease).
    stop_cause: str = ""
    created_at: float = field(default_factory=time.time)
    stopped_at: float = 0.0
    #: Stream lease (``OpenLease``): seconds the session outlives a lost stream; 0: none.
    lease_grace: float = 0.0
    #: SHA-256 (hex) of the stream lease's resume token; the token itself is never kept.
    lease_token: str = ""

    def __post_init__(self) -> None:
        check_name(self.session_id, "session")
        check_window_labels(self.window, self.labels)
        check_ttl(self.ttl)
        if self.lease_grace:
            check_lease_grace(self.lease_grace)

    def renew(self, ttl: float, now: float | None = None) -> None:
        check_ttl(ttl, allow_zero=False)
        self.ttl = ttl
        self.lease_expires_at = (time.time() if now is None else now) + ttl


@dataclass(frozen=True)
class AgentInfo:
    """An agent as registered with the coordinator."""

    name: str
    address: str
    containment: Containment = Containment.PGID
    version: str = ""
    #: Changes each time the agent process starts: a new epoch means it restarted.
    epoch: str = ""
    last_seen: float = 0.0
    #: The agent instance's marker (TETHER_AGENT=...).
    instance: str = ""
    #: Who registered the name (a token id or certificate name): a live name cannot be
    #: taken over by another credential.
    credential: str = ""

    def __post_init__(self) -> None:
        check_name(self.name, "agent name")
        if ":" not in self.address:
            raise InvalidSpec(f"agent address {self.address!r} must be HOST:PORT",
                              field="address")

    def seen(self, at: float | None = None) -> AgentInfo:
        return replace(self, last_seen=time.time() if at is None else at)


@dataclass(frozen=True)
class AgentState:
    """An agent and whether it is up (heartbeats within the TTL) now."""

    info: AgentInfo
    up: bool


@dataclass(frozen=True)
class GroupEntry:
    """A group as the coordinator presents it: the agent's view plus where it lives and
    what the coordinator knows about reaching it."""

    agent: str
    view: GroupView
    #: A live group whose agent (or target) does not answer right now (shown as state
    #: ``unreachable``); its last known state is ``view.state``.
    unreachable: bool = False
    error: str = ""
    attempts: int = 0

    @property
    def state(self) -> GroupState:
        return self.view.state


@dataclass(frozen=True)
class GroupReport:
    """One group's line in a session stop or signal report."""

    group_id: str
    label: str
    agent: str
    target: str
    state: GroupState
    exit: ExitRecord | None = None
    #: Set when the agent could not be reached or refused; says what to do next.
    error: str = ""
    members_signalled: int = 0
    stop_order: int = 0
    attempts: int = 0
    #: Shown as state ``unreachable``: live, but its agent or target does not answer.
    unreachable: bool = False
    #: Runs started after the first (restart policy, liveness, restart requests).
    restarts: int = 0
    #: The W3C traceparent the group was started under ("" if none).
    traceparent: str = ""


@dataclass(frozen=True)
class SessionReport:
    """The answer to a session stop or signal: one report per group."""

    session_id: str
    groups: tuple[GroupReport, ...]
    #: Stop: every group has an exit record. Signal: every group was reached.
    complete: bool
    stop_cause: str = ""

    @property
    def clean(self) -> bool:
        """Every group ended with zero survivors and none was lost."""
        return all(g.exit is not None and g.exit.clean for g in self.groups)


@dataclass(frozen=True)
class SessionView:
    """A session with its groups (or only their counts, in listings)."""

    session: Session
    groups: tuple[GroupEntry, ...] = ()
    group_count: int = 0
    live_count: int = 0
    #: A stream holds the session's lease right now (``OpenLease``).
    lease_held: bool = False


@dataclass(frozen=True)
class SessionEvent:
    """An event of a session as its watchers see it: a group's (``group`` set), or the
    session's own (``session_stopped``: ``group`` is None, ``report`` holds the stop)."""

    seq: int
    kind: EventKind
    group: GroupEntry | None
    at: float
    #: The sender's epoch: a watcher resumes with (epoch, seq).
    epoch: str = ""
    #: ``session_stopped``: the whole stop report, every group with its record.
    report: SessionReport | None = None
    session_id: str = ""


@dataclass(frozen=True)
class GroupSelector:
    """Which groups of a session a command is for: these ids, plus every group with one of
    these labels. Empty: the whole session."""

    group_ids: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for label in self.labels:
            check_name(label, "label")

    @property
    def everything(self) -> bool:
        return not self.group_ids and not self.labels

    def describe(self) -> str:
        parts = [*self.group_ids, *(f"label {label!r}" for label in self.labels)]
        return ", ".join(parts) or "every group"


#: The empty selector: the whole session.
EVERY_GROUP = GroupSelector()


@dataclass(frozen=True)
class Orphan:
    """A live process of an agent's that belongs to no live group."""

    pid: int
    command: str
    former_group: str
    age: float
    #: "marker" (carries this agent instance's marker) or "cgroup" (in its cgroup tree).
    found_by: str
    reaped: bool = False
    create_time: float = 0.0
    cgroup: str = ""
    agent: str = ""


@dataclass(frozen=True)
class OrphanReport:
    """Orphans across agents, and the agents that could not be asked."""

    orphans: tuple[Orphan, ...]
    #: Agents that could not be asked, with the reason.
    unreachable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StopIntent:
    """A session stop that was asked for and must finish, even across a restart."""

    session_id: str
    grace: float | None
    cause: str
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PortReport:
    """Listening ports and their owners, across agents."""

    ports: tuple[PortOwner, ...]
    #: Agents that could not be asked, with the reason.
    unreachable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaseState:
    """What the coordinator says of a stream lease (``OpenLease``), in answer to its opening
    and to each renewal."""

    session_id: str
    #: True while this stream holds the lease; False once the session stopped.
    held: bool
    #: Given in the first answer only: present it to take the lease back after a reconnect.
    resume_token: str = ""
    grace: float = 0.0
    #: Renew at least every ``renew_interval`` s; silence for ``renew_timeout`` s counts as
    #: a lost stream (the grace starts then).
    renew_interval: float = 0.0
    renew_timeout: float = 0.0
    #: This stream took an existing lease back with its token.
    resumed: bool = False
    renewals: int = 0
    #: Why the session stopped (when ``held`` is False).
    stop_cause: str = ""
