"""The coordinator's own records of groups and spawns in flight (no protobuf here)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from tether.core.model import GroupSpec, GroupState, GroupView


@dataclass
class TrackedGroup:
    """What the coordinator knows of one group: the agent's latest view of it."""

    agent: str
    view: GroupView
    idempotency_key: str = ""
    fingerprint: str = ""
    #: Why the last attempt to reach it failed (stop retries); empty once it answered.
    error: str = ""
    attempts: int = 0

    @property
    def group_id(self) -> str:
        return self.view.group_id

    @property
    def session_id(self) -> str:
        return self.view.spec.session_id

    @property
    def spec(self) -> GroupSpec:
        return self.view.spec

    @property
    def ended(self) -> bool:
        return self.view.state.ended

    @property
    def key(self) -> tuple[str, str]:
        return (self.agent, self.group_id)

    def absorb(self, view: GroupView) -> bool:
        """Take in the agent's newer view. Agents send environment values only in a spawn's
        answer, so the spec we hold is kept. An ended group is never resurrected.
        Returns False when the view was refused."""
        if self.ended and not view.state.ended:
            return False
        self.view = replace(view, spec=self.view.spec)
        self.error = ""
        return True


@dataclass
class InFlight:
    """A spawn sent to an agent and not answered yet: a session stop must stop it too."""

    group_id: str
    agent: str
    stop_order: int
    #: The spawn's idempotency key: a retry with it waits for this spawn's outcome.
    key: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


def lost(view: GroupView) -> bool:
    return view.state is GroupState.LOST
