"""How the coordinator talks to an agent: one Protocol in domain types, two ways to do it.

``GrpcAgentClient`` (``grpc_agent.py``) dials an agent over gRPC (deadlines, keepalives, TLS and its
credential) and converts at this edge; ``InProcessAgent`` (``inprocess.py``) calls
the agent living in the same process under ``tether serve``. The coordinator's core
sees neither protobuf nor gRPC: errors arrive as ``tether.core.errors``
(``AgentUnreachable`` for a deadline or a dead path).
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from tether.core.model import (
    GroupEvent,
    GroupSpec,
    GroupView,
    PortOwner,
    SignalOutcome,
    StopOverride,
)
from tether.core.output import AttachOpen, LogQuery, OutputChunk, StdinInput
from tether.core.sessions import Orphan


class AgentClient(Protocol):
    """The agent API as the coordinator uses it."""

    async def spawn(self, spec: GroupSpec, *, key: str, group_id: str,
                    timeout: float) -> GroupView: ...

    async def adopt(self, pid: int, start_time: float | None, spec: GroupSpec, *,
                    timeout: float) -> GroupView: ...

    async def signal(self, group_id: str, sig: signal.Signals, *,
                     timeout: float) -> SignalOutcome: ...

    async def stop_groups(self, group_ids: Sequence[str], override: StopOverride | None, *,
                          timeout: float) -> tuple[list[GroupView], dict[str, str]]: ...

    async def get(self, group_id: str, *, timeout: float) -> GroupView: ...

    async def restart(self, group_id: str, override: StopOverride | None, *,
                      timeout: float) -> GroupView:
        """End the group's run and start it again in place; returns once it runs again (or
        ended: a stop won)."""
        ...

    async def forget(self, group_ids: Sequence[str], *,
                     timeout: float) -> tuple[list[str], dict[str, str]]:
        """Drop ended groups from the agent's memory: (forgotten, id -> why not)."""
        ...

    def watch(self, since: int, epoch: str) -> AsyncIterator[tuple[str, GroupEvent]]:
        """(epoch, event) pairs: the events after ``since`` of ``epoch`` if the agent still
        has them, else a snapshot of every group first (``INITIAL`` events)."""
        ...

    async def list_orphans(self, sweep: bool, *, timeout: float) -> list[Orphan]: ...

    async def list_ports(self, port: int, *, timeout: float) -> list[PortOwner]:
        """Listening TCP ports on the agent's host (or one) and their owners."""
        ...

    def logs(self, query: LogQuery) -> AsyncIterator[OutputChunk]:
        """Captured output of the agent's groups (``AgentService.Logs``); raises
        ``AgentUnreachable`` when the agent cannot be asked, ``GroupNotFound`` for an id it
        does not hold."""
        ...

    def attach(self, opened: AttachOpen, inputs: AsyncIterator[StdinInput]
               ) -> AsyncIterator[OutputChunk]:
        """A group's stdio (``AgentService.Attach``): ``inputs`` go to its stdin (writer),
        its output comes back."""
        ...

    async def close(self) -> None: ...
