"""What a standby coordinator answers itself: reads, from the shared store.

``GetSession``, ``ListSessions`` and ``ListAgents`` are served by any coordinator, also
while none leads (a failover, the leader's host gone): from a snapshot of the store at
most ``FRESH`` seconds old (plus what the leader has not written yet, a few
milliseconds). Everything else goes to the leader (``gate.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tether.coordinator.model import TrackedGroup
from tether.coordinator.sessions import MAX_PAGE, _order, _parse_token, _token
from tether.coordinator.store import Snapshot, Store
from tether.core.errors import InvalidSpec, SessionNotFound, StoreUnavailable
from tether.core.sessions import AgentState, GroupEntry, Session, SessionState, SessionView
from tether.rpc.convert import agent_to_pb, session_to_pb
from tether.rpc.status import unary
from tether.v1 import coordinator_pb2 as cpb

FRESH = 1.0
#: A read the store does not answer this fast fails, naming the store (well within the
#: 2 s a client waits for a read before it asks another coordinator).
READ_TIMEOUT = 1.5


class StoreView:
    """Sessions, groups and agents as one snapshot of the store shows them."""

    def __init__(self, snap: Snapshot, agent_ttl: float) -> None:
        self.sessions = {s.session_id: s for s in snap.sessions}
        self.groups: dict[str, list[TrackedGroup]] = {}
        for t in snap.groups:
            self.groups.setdefault(t.session_id, []).append(t)
        now = time.time()
        self.agents = [AgentState(a, now - a.last_seen <= agent_ttl)
                       for a in sorted(snap.agents, key=lambda a: a.name)]
        self._up = {a.info.name for a in self.agents if a.up}

    def entry(self, t: TrackedGroup) -> GroupEntry:
        unreachable = not t.ended and (t.agent not in self._up or t.view.unreachable)
        return GroupEntry(t.agent, t.view, unreachable, t.error, t.attempts)

    def view(self, s: Session, with_groups: bool = True) -> SessionView:
        groups = self.groups.get(s.session_id, [])
        entries = tuple(self.entry(t) for t in groups) if with_groups else ()
        return SessionView(s, entries, len(groups), sum(1 for t in groups if not t.ended))

    def session(self, session_id: str) -> SessionView:
        s = self.sessions.get(session_id)
        if s is None:
            raise SessionNotFound(session_id)
        return self.view(s)

    def page(self, include_stopped: bool, size: int, token: str, with_groups: bool
             ) -> tuple[list[SessionView], str]:
        if size < 0 or size > MAX_PAGE:
            raise InvalidSpec(f"page size {size} is out of range (0 to {MAX_PAGE}; 0 means "
                              "the default)", field="page_size")
        size = size or 100
        ordered = sorted((s for s in self.sessions.values()
                          if include_stopped or s.state is not SessionState.STOPPED), key=_order)
        if token:
            after = _parse_token(token)
            ordered = [s for s in ordered if _order(s) > after]
        out = ordered[:size]
        next_token = _token(out[-1]) if len(ordered) > size else ""
        return [self.view(s, with_groups) for s in out], next_token


class StandbyReads:
    """The read calls a standby serves, each from a recent snapshot (one load at a time)."""

    def __init__(self, store: Store, agent_ttl: float, fresh: float = FRESH) -> None:
        self.store = store
        self.agent_ttl = agent_ttl
        self.fresh = fresh
        self._view: StoreView | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def view(self) -> StoreView:
        async with self._lock:
            if self._view is None or time.monotonic() - self._at > self.fresh:
                at = time.monotonic()
                try:
                    async with asyncio.timeout(READ_TIMEOUT):
                        snap = await self.store.load()
                except TimeoutError:
                    raise StoreUnavailable(self.store.where, f"no answer within "
                                           f"{READ_TIMEOUT:g} s") from None
                self._view = StoreView(snap, self.agent_ttl)
                self._at = at
            return self._view

    @unary
    async def GetSession(self, request: cpb.GetSessionRequest, context: Any) -> cpb.Session:
        return session_to_pb((await self.view()).session(request.session_id))

    @unary
    async def ListSessions(self, request: cpb.ListSessionsRequest, context: Any
                           ) -> cpb.ListSessionsResponse:
        views, token = (await self.view()).page(request.include_stopped, request.page_size,
                                                request.page_token, request.include_groups)
        return cpb.ListSessionsResponse(sessions=[session_to_pb(v) for v in views],
                                        next_page_token=token)

    @unary
    async def ListAgents(self, request: cpb.ListAgentsRequest, context: Any
                         ) -> cpb.ListAgentsResponse:
        return cpb.ListAgentsResponse(agents=[agent_to_pb(a) for a in (await self.view()).agents])
