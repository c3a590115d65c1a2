"""The coordinator: sessions across agents, fan-out with deadlines, leases, persistence.

This module holds the state every part shares (sessions, tracked groups and their
indexes, the events of each session, the write-behind to the store) and wires the
parts: ``agents.py`` (registration, heartbeats, watching agents), ``sessions.py``
(sessions and leases), ``fanout.py`` (spawns, signals, phased stops, orphans). It
imports no protobuf and no gRPC: agents are reached through ``AgentClient``, the
service converts at the edge.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from tether.coordinator.agent_client import AgentClient
from tether.coordinator.agents import Agents
from tether.coordinator.fanout import GROUP_STOP, Fanout
from tether.coordinator.leases import Leases
from tether.coordinator.model import InFlight, TrackedGroup
from tether.coordinator.output import OutputRoutes
from tether.coordinator.sessions import Sessions
from tether.coordinator.spawns import adopt_spawns
from tether.coordinator.store import Batch, Key, SpawnIntent, Store, Term, Value
from tether.core.errors import AgentUnreachable
from tether.core.events import Broadcaster
from tether.core.model import (
    EventKind,
    ExitReason,
    ExitRecord,
    GroupState,
    GroupView,
)
from tether.core.sessions import (
    AgentInfo,
    GroupEntry,
    GroupReport,
    Session,
    SessionEvent,
    SessionReport,
    SessionState,
    StopIntent,
)
from tether.core.tasks import TaskSet
from tether.core.writebehind import WriteBehind

log = logging.getLogger(__name__)

#: How long an acknowledged change may take to reach the store.
STATE_DEADLINE = 10.0
#: Forgotten groups remembered, so an agent's later snapshot does not bring them back.
FORGOTTEN_MAX = 10000


def _no_transport(info: AgentInfo) -> AgentClient:
    raise AgentUnreachable(info.name, info.address, "this coordinator has no way to dial agents")


@dataclass
class CoordinatorConfig:
    state_dir: str = ""
    heartbeat_interval: float = 1.0
    agent_ttl: float = 5.0
    #: Extra time a stop call may take beyond the longest grace of its groups.
    call_margin: float = 5.0
    retry_backoff_max: float = 2.0
    #: Name of the agent that runs in-process under `tether serve` (the default route).
    local_agent: str = ""
    #: How the coordinator reaches an agent it does not host (gRPC, set by the daemon).
    connect: Callable[[AgentInfo], AgentClient] = field(default=_no_transport)
    #: How long stopped sessions (and their groups' records) are kept.
    retain_stopped: float = 7 * 24 * 3600.0
    #: At most this many stopped sessions are kept (oldest dropped first).
    retain_max_stopped: int = 10000
    #: Lease streams (OpenLease) open at once: per credential, and in all.
    max_lease_streams_per_credential: int = 1000
    max_lease_streams: int = 10000
    #: Logs calls one credential may have open at once (``--max-logs-streams``).
    max_logs_streams_per_credential: int = 64


class CoordinatorHooks:
    """Metrics hooks; no-ops by default."""

    def session_stopped(self, result: str, session_id: str = "", seconds: float = 0.0
                        ) -> None: ...
    def fanout(self, operation: str, seconds: float) -> None: ...
    def state_write_error(self) -> None: ...


class Coordinator:
    """The state and parts of one coordinator while it leads. Under a ``term`` (several
    coordinators on one store) every write is fenced by the store: it commits only while
    this coordinator's lease holds."""

    def __init__(self, config: CoordinatorConfig, store: Store,
                 hooks: CoordinatorHooks | None = None, term: Term | None = None) -> None:
        self.config = config
        self.store = store
        self.hooks = hooks or CoordinatorHooks()
        self.term = term
        #: The epoch of event sequences: the store's lineage once loaded, so a watcher
        #: resumes on whichever coordinator leads (and across restarts).
        self.epoch = os.urandom(6).hex()
        self._seq = 0
        self.groups: dict[tuple[str, str], TrackedGroup] = {}
        # Indexes over ``groups`` (sessions and keys never change once a group is tracked).
        self._by_session: dict[str, dict[tuple[str, str], TrackedGroup]] = {}
        #: Idempotency keys are global: a key names one spawn whichever agent it went to.
        self._by_key: dict[str, TrackedGroup] = {}
        self.inflight: dict[str, dict[str, InFlight]] = {}
        #: (agent, group id) of groups dropped with ``tether forget``.
        self.forgotten: collections.OrderedDict[tuple[str, str], None] = (
            collections.OrderedDict())
        #: Callers of ``Wait``, per session: resolved once it has no live group.
        self._idle_waiters: dict[str, list[asyncio.Future[None]]] = {}
        #: Callers waiting for a group's state to change (a retried spawn waiting for a
        #: start's outcome), per (agent, group id).
        self._state_waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self.events: Broadcaster[SessionEvent] = Broadcaster()
        self.tasks = TaskSet(log)
        self.persist: WriteBehind[Key, Value] = WriteBehind(
            self._write, where=store.where, on_error=self.hooks.state_write_error,
            on_written=self._written)
        self.agents = Agents(self)
        self.sessions = Sessions(self)
        self.leases = Leases(self)
        self.fanout = Fanout(self)
        self.output = OutputRoutes(self)
        self._intents: list[StopIntent] = []
        self._spawns: list[SpawnIntent] = []

    # ------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        snap = await self.store.load()
        self.agents.load(snap.agents)
        self.sessions.load(snap.sessions)
        for n, t in enumerate(snap.groups):
            self.track(t)
            if n % 2000 == 1999:
                await asyncio.sleep(0)  # a big history: let the lease be renewed meanwhile
        self._intents = snap.intents
        self._spawns = snap.spawns
        self.epoch = snap.lineage or self.epoch
        self._seq = max(snap.last_seq, self._seq)
        self.events.seed(snap.events, snap.last_seq)
        log.info("loaded state: %d agents, %d sessions, %d groups, %d spawn(s) in flight, "
                 "events up to %d", len(snap.agents), len(snap.sessions), len(snap.groups),
                 len(snap.spawns), snap.last_seq)

    def start(self) -> None:
        """Resume persisted stop intents and spawns in flight, start lease timers and agent
        watches."""
        self.sessions.start()
        self.agents.start()
        # Spawns first: a resumed stop must wait for them too.
        adopt_spawns(self, self._spawns)
        self._spawns = []
        for intent in self._intents:
            if not self.sessions.has(intent.session_id):
                log.warning("dropping the stop intent of session %r (%s): the session is not "
                            "in the store any more", intent.session_id, intent.cause)
                self.persist.put(("intent", intent.session_id), None)
                continue
            if intent.cause.startswith(GROUP_STOP):
                self.fanout.resume_group_stop(intent)
                continue
            log.info("resuming the stop of session %r (%s) left by a previous run",
                     intent.session_id, intent.cause)
            self.fanout.begin_stop(intent.session_id, intent.grace, intent.cause, resumed=True)
        self._intents = []

    async def close(self) -> None:
        self.leases.close()
        await self.tasks.cancel_all()
        await self.agents.close()
        self.events.close()
        await self.persist.drain()

    async def durable(self) -> None:
        await self.persist.durable(STATE_DEADLINE)

    async def _write(self, batch: Batch) -> None:
        await self.store.write(batch, self.term)

    def _written(self, batch: Batch) -> None:
        """Events go out once they are in the store: a watcher never sees what the next
        leader would not know, and resumes there exactly where it was."""
        events = sorted((v for k, v in batch.items() if k[0] == "event"),
                        key=lambda e: e.seq if isinstance(e, SessionEvent) else 0)
        for ev in events:
            assert isinstance(ev, SessionEvent)
            self.events.seq = max(self.events.seq, ev.seq)
            self.events.publish(ev)

    # ------------------------------------------------------------ persistence

    def save_group(self, t: TrackedGroup) -> None:
        self.persist.put(("group", t.agent, t.group_id), t)

    def save_session(self, s: Session) -> None:
        self.persist.put(("session", s.session_id), s)

    # ------------------------------------------------------------ groups

    def track(self, t: TrackedGroup) -> TrackedGroup:
        self.groups[t.key] = t
        self._by_session.setdefault(t.session_id, {})[t.key] = t
        if t.idempotency_key:
            self._by_key[t.idempotency_key] = t
        return t

    def forget(self, t: TrackedGroup) -> None:
        self.groups.pop(t.key, None)
        self._by_session.get(t.session_id, {}).pop(t.key, None)
        if t.idempotency_key and self._by_key.get(t.idempotency_key) is t:
            del self._by_key[t.idempotency_key]
        self.persist.put(("group", t.agent, t.group_id), None)

    def bind_key(self, t: TrackedGroup, key: str, fingerprint: str) -> None:
        t.fingerprint = t.fingerprint or fingerprint
        if key and not t.idempotency_key:
            t.idempotency_key = key
            self._by_key[key] = t

    def by_key(self, key: str) -> TrackedGroup | None:
        return self._by_key.get(key)

    def session_groups(self, session_id: str) -> list[TrackedGroup]:
        return list(self._by_session.get(session_id, {}).values())

    def drop_session_index(self, session_id: str) -> None:
        self._by_session.pop(session_id, None)

    def session(self, session_id: str) -> Session:
        return self.sessions.get(session_id)

    def absorb(self, agent: str, view: GroupView, kind: EventKind = EventKind.STATE) -> None:
        """Take in what an agent says of a group; written behind with the rest of the turn."""
        tracked = self.groups.get((agent, view.group_id))
        if tracked is None:
            if (agent, view.group_id) in self.forgotten:
                return  # dropped from its session on purpose: a snapshot must not restore it
            flight = self.inflight.get(view.spec.session_id, {}).get(view.group_id)
            if flight is None or flight.agent != agent:
                # Not a spawn of ours to that agent (a group started directly on the agent,
                # or an agent credential naming a session it was never sent): an agent
                # reports only into sessions that sent it work.
                if view.spec.session_id and self.sessions.has(view.spec.session_id):
                    log.warning("agent %r reported group %s in session %r, which never sent "
                                "it there; ignored", agent, view.group_id,
                                view.spec.session_id)
                return
            tracked = self.track(TrackedGroup(agent, view))
        else:
            before = tracked.view
            if not tracked.absorb(view):
                return  # never resurrect
            if EventKind(kind) is EventKind.INITIAL:
                # A snapshot item (a new watch of the agent: after a failover, a restart):
                # what watchers already know is not news; what changed while nobody
                # watched is a change, and an end is an exit.
                if tracked.view == before:
                    return
                kind = EventKind.EXIT if tracked.view.state.ended and not before.state.ended \
                    else EventKind.STATE
        self.save_group(tracked)
        self.publish(tracked, kind)
        self._changed(tracked)

    def _changed(self, tracked: TrackedGroup) -> None:
        for fut in self._state_waiters.pop(tracked.key, ()):
            if not fut.done():
                fut.set_result(None)

    async def start_outcome(self, tracked: TrackedGroup, timeout: float) -> TrackedGroup:
        """Wait (at most ``timeout``) until ``tracked`` is no longer starting: what a spawn
        answers once the agent's start is over (running, or failed to start)."""
        async with asyncio.timeout(timeout):
            while tracked.view.state is GroupState.STARTING:
                fut = asyncio.get_running_loop().create_future()
                self._state_waiters.setdefault(tracked.key, []).append(fut)
                await fut
        return tracked

    def mark_lost(self, tracked: TrackedGroup, why: str) -> None:
        tracked.view = replace(tracked.view, state=GroupState.LOST,
                               exit=ExitRecord(ExitReason.LOST, detail=why, ended_at=time.time()))
        self.save_group(tracked)
        self.publish(tracked, EventKind.EXIT)
        self._changed(tracked)
        log.warning("group %s of session %r is lost: %s", tracked.group_id, tracked.session_id,
                    why)

    def entry(self, t: TrackedGroup) -> GroupEntry:
        """A group as clients see it: ``unreachable`` while it cannot be reached."""
        unreachable = False
        if not t.ended:
            link = self.agents.links.get(t.agent)
            unreachable = link is None or not self.agents.up(link) or t.view.unreachable
        return GroupEntry(t.agent, t.view, unreachable, t.error, t.attempts)

    def report(self, t: TrackedGroup, members_signalled: int = 0) -> GroupReport:
        e = self.entry(t)
        spec = t.view.spec
        return GroupReport(t.group_id, spec.label, t.agent, spec.target or "local", e.state,
                           t.view.exit, t.error, members_signalled, spec.stop_order, t.attempts,
                           e.unreachable, t.view.restarts, spec.traceparent)

    def session_report(self, session_id: str, complete: bool) -> SessionReport:
        groups = sorted(self.session_groups(session_id),
                        key=lambda t: (t.view.spec.stop_order, t.group_id))
        s = self.session(session_id)
        return SessionReport(session_id, tuple(self.report(t) for t in groups), complete,
                             s.stop_cause)

    # ------------------------------------------------------------ events

    def publish(self, tracked: TrackedGroup, kind: EventKind | str) -> None:
        """An event for the session's watchers, numbered now, sent once it is stored."""
        self._seq += 1
        self.persist.put(("event", str(self._seq)), SessionEvent(
            self._seq, EventKind(kind), self.entry(tracked), time.time(),
            session_id=tracked.session_id))
        if self._idle_waiters:
            self.check_idle(tracked.session_id)

    def publish_stopped(self, report: SessionReport) -> None:
        """A stopping session is done: one event with the whole report."""
        self._seq += 1
        self.persist.put(("event", str(self._seq)), SessionEvent(
            self._seq, EventKind.SESSION_STOPPED, None, time.time(), report=report,
            session_id=report.session_id))

    def forget_group(self, t: TrackedGroup) -> None:
        """Drop an ended group from its session's listing, for good (``tether forget``)."""
        self.publish(t, EventKind.FORGOTTEN)
        self.forget(t)
        self.forgotten[t.key] = None
        while len(self.forgotten) > FORGOTTEN_MAX:
            self.forgotten.popitem(last=False)

    # ------------------------------------------------------------ waiting for a session

    def busy(self, session_id: str) -> bool:
        """Does the session have a live group, or a spawn in flight?"""
        return bool(self.inflight.get(session_id)) or any(
            not t.ended for t in self._by_session.get(session_id, {}).values())

    def check_idle(self, session_id: str) -> None:
        waiters = self._idle_waiters.get(session_id)
        if waiters and not self.busy(session_id):
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def wait_idle(self, session_id: str, timeout: float | None) -> SessionReport:
        """Return once the session has no live group and no spawn in flight (``complete``),
        or at ``timeout`` with what is known. Event-driven: woken by the group events that
        end its last live group. A caller that goes away leaves nothing behind."""
        self.session(session_id)
        try:
            async with asyncio.timeout(timeout):
                # Again after each wake-up: a spawn that landed may have added a live group
                # in the same turn that took its in-flight mark away.
                while self.busy(session_id):
                    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    waiters = self._idle_waiters.setdefault(session_id, [])
                    waiters.append(fut)
                    try:
                        await fut
                    finally:
                        waiters.remove(fut)
                        if not waiters:
                            self._idle_waiters.pop(session_id, None)
        except TimeoutError:
            return self.session_report(session_id, complete=False)
        return self.session_report(session_id, complete=True)

    def watch_session(self, session_id: str, initial: bool, since: int = 0
                      ) -> AsyncIterator[SessionEvent]:
        self.session(session_id)

        def accept(ev: SessionEvent) -> bool:
            return ev.session_id == session_id

        first: list[SessionEvent] | None = None
        if since:
            missed = self.events.missed(since)
            first = [e for e in missed if accept(e)] if missed is not None else None
        if first is None:
            now = time.time()
            first = [SessionEvent(self.events.seq, EventKind.INITIAL, self.entry(t), now,
                                  session_id=session_id)
                     for t in self.session_groups(session_id)] if initial else []
            s = self.session(session_id)
            if initial and s.state is SessionState.STOPPED and not self.busy(session_id):
                # A watcher that comes (back) after the stop still learns the session is done.
                first.append(SessionEvent(self.events.seq, EventKind.SESSION_STOPPED, None, now,
                                          report=self.session_report(session_id, True),
                                          session_id=session_id))
        return self.events.subscribe(accept, first)
