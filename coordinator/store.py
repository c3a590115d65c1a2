"""The coordinator's persisted state: the ``Store`` interface.

Implementations: ``sqlite_store.py`` (the default, one file in the state directory;
one coordinator) and ``postgres_store.py`` (PostgreSQL, shared by any number of
coordinators: one leader, the others standbys). Writes arrive in batches (``Batch``)
from the coordinator's write-behind; a store applies each batch atomically or not at
all. The same contract tests run against both (``tests/test_store_contract.py``).

Leadership is a row in the store: a holder, an epoch and an expiry, read and written
with the store's own clock (``now()`` of the database, never a coordinator's). A
batch written under a ``Term`` commits only while the store still names that holder
and epoch: a deposed leader (paused, partitioned) can change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tether.coordinator.model import TrackedGroup
from tether.core.sessions import AgentInfo, Session, SessionEvent, StopIntent

#: Events kept in the store for watchers that resume on another leader (the newest).
EVENTS_KEPT = 10000


@dataclass(frozen=True)
class SpawnIntent:
    """A spawn about to be sent to an agent, recorded first: whoever leads next asks the
    agent about ``group_id`` and tracks it, so no group runs that nobody has on record."""

    group_id: str
    agent: str
    session_id: str
    idempotency_key: str = ""
    fingerprint: str = ""
    stop_order: int = 0
    created_at: float = 0.0


@dataclass
class Snapshot:
    agents: list[AgentInfo] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    groups: list[TrackedGroup] = field(default_factory=list)
    intents: list[StopIntent] = field(default_factory=list)
    spawns: list[SpawnIntent] = field(default_factory=list)
    #: The newest events (at most ``EVENTS_KEPT``), oldest first, and the last sequence.
    events: list[SessionEvent] = field(default_factory=list)
    last_seq: int = 0
    #: Made with the schema, never changed: the epoch of event sequences (a watcher resumes
    #: on any leader of the same store).
    lineage: str = ""


@dataclass(frozen=True)
class Lease:
    """The leadership row as the store sees it now."""

    holder: str
    address: str
    epoch: int
    #: Seconds until it expires, by the store's clock (zero or less: expired).
    remaining: float


@dataclass
class Term:
    """One leadership term: who holds the lease, under which epoch (raised only by the
    store, see ``Store.raise_epoch``)."""

    holder: str
    epoch: int


#: Keys of a batch: ("agent", name), ("session", id), ("group", agent, group_id),
#: ("intent", session_id), ("spawn", group_id), ("event", seq as text). None deletes.
Key = tuple[str, ...]
Value = AgentInfo | Session | TrackedGroup | StopIntent | SpawnIntent | SessionEvent | None
Batch = Mapping[Key, Value]


class Store(Protocol):
    """Where the coordinator's state lives. SQLite by default (``tether serve``)."""

    #: Names the store for messages, never with a password.
    where: str
    #: Several coordinators may use it at once (they elect a leader).
    shared: bool

    async def load(self) -> Snapshot:
        """Everything stored; raises ``StateFileError`` if it cannot be read,
        ``StoreUnavailable`` if it cannot be reached."""
        ...

    async def write(self, batch: Batch, term: Term | None = None) -> None:
        """Apply a batch atomically (all or nothing). Under ``term``, only while the lease
        still names its holder and epoch, else ``NotLeader`` and nothing is written."""
        ...

    async def acquire(self, holder: str, address: str, ttl: float) -> Lease:
        """Take the lease, with a new epoch, if nobody holds it or it expired; returns the
        lease as it is now (``holder`` tells whether it is ours)."""
        ...

    async def renew(self, term: Term, ttl: float) -> bool:
        """Extend our unexpired lease to ``ttl`` from now; False once it is not ours."""
        ...

    async def raise_epoch(self, term: Term, above: int) -> int | None:
        """Move our unexpired lease to an epoch above ``above`` (an agent has seen a newer
        one than the store holds: a restored or re-created store); None if not ours."""
        ...

    async def release(self, term: Term) -> None:
        """Give the lease up now (a standby may take it at once)."""
        ...

    async def lease(self) -> Lease | None:
        """The lease as it is, or None if nobody ever held it."""
        ...

    async def close(self) -> None: ...
