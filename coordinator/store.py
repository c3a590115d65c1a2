"""The coordinator's persisted state: the ``Store`` interface.

Implementations: ``sqlite_store.py`` (the default, one file in the state
directory). Writes arrive in batches (``Batch``) from the coordinator's
write-behind; a store applies each batch atomically or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tether.coordinator.model import TrackedGroup
from tether.core.sessions import AgentInfo, Session, StopIntent


@dataclass
class Snapshot:
    agents: list[AgentInfo] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    groups: list[TrackedGroup] = field(default_factory=list)
    intents: list[StopIntent] = field(default_factory=list)


#: Keys of a batch: ("agent", name), ("session", id), ("group", agent, group_id),
#: ("intent", session_id). A value of None deletes.
Key = tuple[str, ...]
Value = AgentInfo | Session | TrackedGroup | StopIntent | None
Batch = Mapping[Key, Value]


class Store(Protocol):
    """Where the coordinator's state lives. SQLite by default (``tether serve``)."""

    where: str

    async def load(self) -> Snapshot:
        """Everything stored; raises ``StateFileError`` if it cannot be read."""
        ...

    async def write(self, batch: Batch) -> None:
        """Apply a batch atomically (all or nothing)."""
        ...

    async def close(self) -> None: ...


