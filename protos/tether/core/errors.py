"""One exception root for tether; adapters translate foreign errors into these.

Errors carry their data as fields. Servicers map them to gRPC status codes in
one place (``tether.rpc.status``); the CLI maps them to exit statuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tether.core.model import FailureClass


class TetherError(Exception):
    """Root of every error tether raises on purpose."""


class InvalidSpec(TetherError):
    """A request that can never succeed as written (empty argv, unknown signal, bad probe)."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class NotFound(TetherError):
    """Something named in a request does not exist (a group, session or agent)."""


class AlreadyExists(TetherError):
    """A request collides with an earlier, different one (an idempotency key, a group id)."""


class SignallerNotFound(InvalidSpec):
    """The target names a kind of signaller that is not installed."""
    def __init__(self, kind: str, known: list[str]) -> None:
        super().__init__(
            f"no signaller {kind!r} is installed; known signallers: {', '.join(sorted(known))}. "
            "Use a target like local, docker:CONTAINER or ssh:[USER@]HOST[:PORT].",
            field="target",
        )
        self.kind = kind
        self.known = known


class GroupNotFound(NotFound):
    """No group with this id on the agent asked."""
    def __init__(self, group_id: str) -> None:
        super().__init__(
            f"no group {group_id!r} on this agent; list the known ones with `tether show SESSION`"
        )
        self.group_id = group_id


class AdoptRefused(TetherError):
    """The process asked to be adopted is not ours to take."""

    def __init__(self, pid: int, why: str) -> None:
        super().__init__(f"cannot adopt pid {pid}: {why}")
        self.pid = pid
        self.why = why


class StartFailed(TetherError):
    """A start that failed for a classified reason; the group is recorded as failed."""

    def __init__(self, failure: FailureClass, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


class TargetUnreachable(TetherError):
    """The container or host a group lives on cannot be reached right now."""

    def __init__(self, target: str, why: str) -> None:
        super().__init__(f"target {target!r} is unreachable: {why}")
        self.target = target
        self.why = why


class SessionNotFound(NotFound):
    """No session with this name on the coordinator."""
    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"no session {session_id!r}; list sessions with `tether sessions`"
        )
        self.session_id = session_id


class NotInSession(NotFound):
    """A ``--group`` or ``--label`` names nothing in the session; nothing was done."""

    def __init__(self, session_id: str, what: str, why: str) -> None:
        super().__init__(f"{what} {why}; nothing was done (list the session's groups with "
                         f"`tether show {session_id}`)")
        self.session_id = session_id
        self.what = what


class AgentNotFound(NotFound):
    """No agent registered under this name."""
    def __init__(self, name: str, known: list[str]) -> None:
        hint = ", ".join(sorted(known)) if known else "none registered yet"
        super().__init__(f"no agent named {name!r}; known agents: {hint}. See `tether agents`.")
        self.name = name
        self.known = known


class AgentUnreachable(TetherError):
    """An agent did not answer (in time), or refused the coordinator's credentials."""
    def __init__(self, name: str, address: str, why: str) -> None:
        super().__init__(
            f"agent {name!r} at {address} is unreachable ({why}); "
            "check that `tether agent` runs there and the network path is open"
        )
        self.name = name
        self.address = address
        self.why = why


class Conflict(TetherError):
    """The request does not fit the current state (e.g. spawn into a stopping session)."""


class ResourceExhausted(TetherError):
    """The agent is at a limit (file descriptors, state storage); nothing was started."""


class IdempotencyConflict(AlreadyExists):
    """An idempotency key was used before for a different request."""

    def __init__(self, key: str, first: str) -> None:
        where = f"group {first}" if first else "still starting"
        super().__init__(
            f"idempotency key {key!r} was already used for another request ({where}); "
            "a retry must repeat the request exactly, to the same agent; a new request "
            "needs a new key")
        self.key = key
        self.first = first


class StateUnwritable(ResourceExhausted):
    """A change could not be made durable (disk full, I/O error): it is not acknowledged."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(
            f"cannot write the state file {path}: {why}; free space or fix the state "
            "directory, then retry")
        self.path = path
        self.why = why


class StateFileError(TetherError):
    """The state file exists but cannot be read (corrupted, not a database)."""

    def __init__(self, path: str, why: str, advice: str) -> None:
        super().__init__(f"cannot read the state file {path}: {why}; {advice}")
        self.path = path
        self.why = why


class PermissionDenied(TetherError):
    """The caller is known but its role does not allow this call."""


class Unauthenticated(TetherError):
    """The caller presented no credential this daemon accepts."""


class StoreUnavailable(TetherError):
    """The shared store (PostgreSQL) does not answer, or refuses this coordinator."""

    def __init__(self, where: str, why: str, advice: str = "") -> None:
        super().__init__(f"the store {where} is unavailable: {why}; "
                         + (advice or "check that the database runs and this host can reach "
                            "it; the coordinator keeps trying"))
        self.where = where
        self.why = why


class NotLeader(TetherError):
    """This coordinator does not lead (a standby, or one that lost its lease): the call
    must go to the leader, at ``leader`` if known."""

    def __init__(self, why: str, leader: str = "") -> None:
        where = (f"the leader is at {leader}: retry there (clients given several "
                 "--coordinator addresses follow it)") if leader else \
            "no coordinator leads right now: retry in a few seconds"
        super().__init__(f"{why}; {where}")
        self.why = why
        self.leader = leader


class Fenced(TetherError):
    """An agent refused a command from a coordinator epoch older than the newest it saw."""

    def __init__(self, agent: str, epoch: int, newest: int) -> None:
        super().__init__(
            f"agent {agent!r} refused a command of coordinator epoch {epoch}: it has obeyed "
            f"epoch {newest} since, so another coordinator leads (fencing); the coordinator "
            "that sent it must step down")
        self.agent = agent
        self.epoch = epoch
        self.newest = newest
