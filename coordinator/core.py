"""The coordinator: sessions across agents, fan-out with deadlines, leases, persistence.

Agents are reached over gRPC (AgentService) only. Each fan-out returns one
result per group: an agent that fails or times out is retried with backoff
and its groups are reported with the reason, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from tether.coordinator.store import AgentRow, GroupRow, SessionRow, StopIntent, Store
from tether.core.errors import (
    AgentNotFound,
    AgentUnreachable,
    Conflict,
    InvalidSpec,
    SessionNotFound,
    TetherError,
)
from tether.core.model import check_name, parse_signal
from tether.core.tasks import TaskSet
from tether.rpc.security import ClientSecurity
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb

log = logging.getLogger("tether.coordinator")

ENDED = {pb.GROUP_STATE_STOPPED, pb.GROUP_STATE_EXITED, pb.GROUP_STATE_FAILED,
         pb.GROUP_STATE_LOST}
# Agent answers that mean "not done, and never will be as asked": nothing was started.
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION}
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class CoordinatorConfig:
    state_dir: str = ""
    heartbeat_interval: float = 1.0
    agent_ttl: float = 5.0
    # Extra time a Stop call may take beyond the group's grace.
    call_margin: float = 5.0
    retry_backoff_max: float = 2.0
    # Name of the agent that runs in-process under `tether serve` (the default route).
    local_agent: str = ""
    # How the coordinator dials agents (TLS roots, its client certificate, a token).
    dial: ClientSecurity = field(default_factory=ClientSecurity)


@dataclass
class CoordinatorHooks:
    """Metrics hooks; no-ops by default."""

    def session_stopped(self, result: str) -> None: ...
    def fanout(self, operation: str, seconds: float) -> None: ...


@dataclass
class TrackedGroup:
    agent: str
    group: pb.Group
    idempotency_key: str = ""
    error: str = ""
    attempts: int = 0

    @property
    def group_id(self) -> str:
        return str(self.group.group_id)

    @property
    def ended(self) -> bool:
        return self.group.state in ENDED

    def row(self) -> GroupRow:
        return GroupRow(self.agent, self.group_id, self.group.spec.session_id,
                        self.idempotency_key, self.group.SerializeToString(), self.error)


@dataclass
class AgentLink:
    row: AgentRow
    channel: grpc.aio.Channel | None = None
    watch_task: asyncio.Task[None] | None = None
    always_up: bool = False
    instance: str = ""
    dial: ClientSecurity = field(default_factory=ClientSecurity)
    #: `tether serve`'s own agent: an in-process stub instead of a loopback channel.
    local: Any = None
    _stub: agrpc.AgentServiceStub | None = None

    @property
    def stub(self) -> agrpc.AgentServiceStub:
        if self.local is not None:
            return cast(agrpc.AgentServiceStub, self.local)
        if self.channel is not None and self._stub is not None:
            return self._stub
        if self.channel is None:
            # Keepalive pings find a dead path (a partition, a pulled cable) in seconds, so
            # retries reconnect instead of waiting on TCP retransmission timers.
            dial = ClientSecurity(self.dial.ca, self.dial.cert, self.dial.key,
                                  self.dial.token_file, self.dial.server_name, CHANNEL_OPTIONS,
                                  self.dial.token)
            self.channel = dial.channel(self.row.address)
        self._stub = agrpc.AgentServiceStub(self.channel)
        return self._stub


@dataclass
class Subscriber:
    session_id: str
    queue: asyncio.Queue[pb.GroupEvent | None] = field(default_factory=lambda: asyncio.Queue(10000))


class Coordinator:
    def __init__(self, config: CoordinatorConfig, store: Store,
                 hooks: CoordinatorHooks | None = None) -> None:
        self.config = config
        self.store = store
        self.hooks = hooks or CoordinatorHooks()
        self.agents: dict[str, AgentLink] = {}
        self.sessions: dict[str, SessionRow] = {}
        self.groups: dict[tuple[str, str], TrackedGroup] = {}
        # Indexes over ``groups`` (sessions and keys never change once a group is tracked).
        self._by_session: dict[str, dict[tuple[str, str], TrackedGroup]] = {}
        self._by_key: dict[tuple[str, str], TrackedGroup] = {}
        self._stops: dict[str, asyncio.Task[cpb.SessionReport]] = {}
        self._tasks = TaskSet(log)
        self._subscribers: list[Subscriber] = []
        self._lease_changed = asyncio.Event()
        self._seq = 0
        self._dirty: dict[tuple[str, str], TrackedGroup] = {}
        self._flush_scheduled = False
        self._load()

    # ------------------------------------------------------------ lifecycle

    def _load(self) -> None:
        for a in self.store.agents():
            self.agents[a.name] = AgentLink(a, dial=self.config.dial)
        for s in self.store.sessions():
            self.sessions[s.session_id] = s
        for r in self.store.groups():
            g = pb.Group()
            g.ParseFromString(r.group_pb)
            self._track(TrackedGroup(r.agent, g, r.idempotency_key, r.error))
        log.info("loaded state: %d agents, %d sessions, %d groups", len(self.agents),
                 len(self.sessions), len(self.groups))

    def start(self) -> None:
        """Resume persisted stop intents, start lease timers and agent watches."""
        self._tasks.spawn(self._lease_loop(), "leases")
        for link in self.agents.values():
            self._start_watch(link)
        for intent in self.store.intents():
            log.info("resuming the stop of session %r (%s) left by a previous run",
                     intent.session_id, intent.cause)
            self._begin_stop(intent.session_id, intent.grace, intent.cause, persist=False)

    async def close(self) -> None:
        self._flush()
        await self._tasks.cancel_all()
        for link in self.agents.values():
            if link.channel is not None:
                await link.channel.close()
                link.channel = None
        for sub in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    # ------------------------------------------------------------ agents

    def agent_up(self, link: AgentLink) -> bool:
        return link.always_up or time.time() - link.row.last_seen <= self.config.agent_ttl

    def register_agent(self, req: cpb.RegisterAgentRequest, always_up: bool = False,
                       local: Any = None) -> cpb.RegisterAgentResponse:
        """``always_up``/``local``: the agent lives in this process (`tether serve`); ``local``
        is the stub that reaches it without a network round trip."""
        check_name(req.name, "agent name")
        if ":" not in req.address:
            raise InvalidSpec(f"agent address {req.address!r} must be HOST:PORT", field="address")
        old = self.agents.get(req.name)
        row = AgentRow(req.name, req.address, req.containment, req.version, req.epoch, time.time())
        self.store.put_agent(row)
        restarted = old is not None and old.row.epoch != req.epoch
        if old is not None and old.row.address == req.address:
            old.row = row
            link = old
        else:
            if old is not None:
                self._close_link(old)
            link = AgentLink(row, dial=self.config.dial)
            self.agents[req.name] = link
        link.always_up = always_up
        link.local = local
        link.instance = req.instance
        log.info("agent %r registered at %s%s", req.name, req.address,
                 " (restarted: reconciling its groups)" if restarted else "")
        self._start_watch(link)
        if restarted:
            self._tasks.spawn(self._reconcile(link), f"reconcile-{req.name}")
        return cpb.RegisterAgentResponse(heartbeat_interval_seconds=self.config.heartbeat_interval,
                                         ttl_seconds=self.config.agent_ttl)

    def _close_link(self, link: AgentLink) -> None:
        if link.watch_task is not None:
            link.watch_task.cancel()
        if link.channel is not None:
            self._tasks.spawn(link.channel.close(), "close-channel")
            link.channel = None

    def heartbeat(self, name: str, epoch: str) -> bool:
        link = self.agents.get(name)
        if link is None or link.row.epoch != epoch:
            return False
        link.row.last_seen = time.time()
        self.store.put_agent(link.row)
        return True

    def agent_states(self) -> list[cpb.Agent]:
        out = []
        for link in self.agents.values():
            a = cpb.Agent(name=link.row.name, address=link.row.address,
                          containment=cast(Any, link.row.containment), version=link.row.version,
                          epoch=link.row.epoch, instance=link.instance,
                          state=cpb.AGENT_STATE_UP if self.agent_up(link)
                          else cpb.AGENT_STATE_UNREACHABLE)
            a.last_seen.FromNanoseconds(int(link.row.last_seen * 1e9))
            out.append(a)
        return out

    def resolve_agent(self, name: str) -> AgentLink:
        if name:
            link = self.agents.get(name)
            if link is None:
                raise AgentNotFound(name, list(self.agents))
            return link
        if self.config.local_agent and self.config.local_agent in self.agents:
            return self.agents[self.config.local_agent]
        if len(self.agents) == 1:
            return next(iter(self.agents.values()))
        raise AgentNotFound("", list(self.agents)) if not self.agents else InvalidSpec(
            f"{len(self.agents)} agents are registered ({', '.join(sorted(self.agents))}); "
            "name one with --agent", field="agent")

    def _start_watch(self, link: AgentLink) -> None:
        if link.watch_task is None or link.watch_task.done():
            link.watch_task = self._tasks.spawn(self._watch_agent(link), f"watch-{link.row.name}")

    async def _watch_agent(self, link: AgentLink) -> None:
        """Follow an agent's Watch stream: natural exits reach sessions as they happen."""
        backoff = 0.1
        while True:
            try:
                stream = link.stub.Watch(apb.WatchRequest(initial=True))
                async for event in stream:
                    backoff = 0.1
                    self.absorb(link.row.name, event.group, event.kind)
            except grpc.aio.AioRpcError as exc:
                log.debug("watch of agent %r: %s", link.row.name, exc.code().name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.retry_backoff_max)

    def _flush(self) -> None:
        """Write the groups changed since the last flush, in one transaction."""
        self._flush_scheduled = False
        if self._dirty:
            rows = [t.row() for t in self._dirty.values()]
            self._dirty.clear()
            self.store.put_groups(rows)

    def absorb(self, agent: str, group: pb.Group, kind: str = "state",
                persist: bool = True) -> None:
        """Take in what an agent says of a group. ``persist=False`` leaves the write to the
        caller's ``_flush()`` (batched); otherwise it is written at the end of this loop
        turn, together with every other change of the turn."""
        key = (agent, group.group_id)
        tracked = self.groups.get(key)
        if tracked is None:
            if not group.spec.session_id or group.spec.session_id not in self.sessions:
                return  # a group started directly on the agent, outside any session we know
            tracked = self._track(TrackedGroup(agent, group))
        if tracked.ended and group.state not in ENDED:
            return  # never resurrect
        tracked.group.CopyFrom(group)
        tracked.group.agent = agent
        tracked.error = ""
        self._dirty[key] = tracked
        if persist and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        self._publish(tracked, kind)

    async def _reconcile(self, link: AgentLink) -> None:
        """An agent restarted: groups it no longer knows are lost, with what we know."""
        for tracked in [t for t in self.groups.values() if t.agent == link.row.name and not t.ended]:
            try:
                reply = await link.stub.Get(apb.GetRequest(group_id=tracked.group_id), timeout=5)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    continue
                self._mark_lost(tracked, f"agent {link.row.name!r} restarted without this group")
            else:
                self.absorb(link.row.name, reply.group)

    def _mark_lost(self, tracked: TrackedGroup, why: str) -> None:
        tracked.group.state = pb.GROUP_STATE_LOST
        tracked.group.exit.CopyFrom(pb.ExitRecord(reason=pb.EXIT_REASON_LOST, detail=why))
        tracked.group.exit.ended_at.GetCurrentTime()
        self.store.put_group(tracked.row())
        self._publish(tracked, "exit")
        log.warning("group %s of session %r is lost: %s", tracked.group_id,
                    tracked.group.spec.session_id, why)

    # ------------------------------------------------------------ sessions

    def session(self, session_id: str) -> SessionRow:
        s = self.sessions.get(session_id)
        if s is None:
            raise SessionNotFound(session_id)
        return s

    def create_session(self, session_id: str, window: str = "", labels: dict[str, str] | None = None,
                       ttl: float = 0.0) -> SessionRow:
        check_name(session_id, "session")
        check_name(window, "window", allow_empty=True)
        if not (0 <= ttl <= 30 * 24 * 3600) or ttl != ttl:
            raise InvalidSpec(f"ttl {ttl!r} s is out of range (0 to 30 days)", field="ttl")
        s = self.sessions.get(session_id)
        if s is not None and s.state == "stopped":
            # A stopped session's name may be reused: a new run of the same workspace.
            s = None
        if s is None:
            s = SessionRow(session_id, window, dict(labels or {}))
        if ttl:
            s.ttl = ttl
            s.lease_expires_at = time.time() + ttl
            self._lease_changed.set()
        if window and not s.window:
            s.window = window
        self.sessions[session_id] = s
        self.store.put_session(s)
        return s

    def keepalive(self, session_id: str, ttl: float) -> SessionRow:
        s = self.session(session_id)
        if s.state != "active":
            raise Conflict(f"session {session_id!r} is {s.state}; a stopped session cannot be "
                           "kept alive, start a new one")
        if not (0 < ttl <= 30 * 24 * 3600) or ttl != ttl:
            raise InvalidSpec(f"ttl {ttl!r} s is out of range (0 to 30 days]", field="ttl")
        s.ttl = ttl
        s.lease_expires_at = time.time() + ttl
        self.store.put_session(s)
        self._lease_changed.set()
        return s

    async def _lease_loop(self) -> None:
        """Sleep until the earliest lease expires (woken early when a lease changes)."""
        while True:
            self._lease_changed.clear()
            now = time.time()
            leased = [s for s in self.sessions.values() if s.state == "active" and s.ttl > 0]
            for s in leased:
                if s.lease_expires_at <= now:
                    log.warning("session %r: lease of %g s expired without keepalive; stopping it",
                                s.session_id, s.ttl)
                    self._begin_stop(s.session_id, None, "lease_expired")
            pending = [s.lease_expires_at - now for s in leased if s.lease_expires_at > now]
            timeout = min(pending) if pending else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._lease_changed.wait()

    def _track(self, tracked: TrackedGroup) -> TrackedGroup:
        key = (tracked.agent, tracked.group_id)
        self.groups[key] = tracked
        self._by_session.setdefault(tracked.group.spec.session_id, {})[key] = tracked
        if tracked.idempotency_key:
            self._by_key[(tracked.agent, tracked.idempotency_key)] = tracked
        return tracked

    def session_groups(self, session_id: str) -> list[TrackedGroup]:
        return list(self._by_session.get(session_id, {}).values())

    def group_view(self, tracked: TrackedGroup) -> pb.Group:
        g = pb.Group()
        g.CopyFrom(tracked.group)
        g.agent = tracked.agent
        link = self.agents.get(tracked.agent)
        if not tracked.ended and (link is None or not self.agent_up(link)):
            g.state = pb.GROUP_STATE_UNREACHABLE
        return g

    def session_pb(self, s: SessionRow, with_groups: bool = True) -> cpb.Session:
        state = {"active": cpb.SESSION_STATE_ACTIVE, "stopping": cpb.SESSION_STATE_STOPPING,
                 "stopped": cpb.SESSION_STATE_STOPPED}[s.state]
        msg = cpb.Session(session_id=s.session_id, window=s.window, labels=s.labels, state=state,
                          ttl_seconds=s.ttl, stop_cause=s.stop_cause)
        if s.lease_expires_at:
            msg.lease_expires_at.FromNanoseconds(int(s.lease_expires_at * 1e9))
        msg.created_at.FromNanoseconds(int(s.created_at * 1e9))
        if with_groups:
            msg.groups.extend(self.group_view(t) for t in self.session_groups(s.session_id))
        return msg

    # ------------------------------------------------------------ spawn / adopt

    async def spawn(self, agent: str, spec: pb.GroupSpec, key: str) -> pb.Group:
        if not spec.session_id:
            raise InvalidSpec("spawn needs a session (--session NAME)", field="session")
        # Resolve the agent before touching any session: bad input changes nothing.
        link = self.resolve_agent(agent)
        previous = self.sessions.get(spec.session_id)
        s = previous
        if s is None or s.state == "stopped":
            s = self.create_session(spec.session_id, spec.window)
        if s.state != "active":
            raise Conflict(f"session {spec.session_id!r} is {s.state}; wait for the stop to "
                           "finish, then spawn into it again")
        if key:
            seen = self._by_key.get((link.row.name, key))
            if seen is not None:
                return self.group_view(seen)
        try:
            reply = await link.stub.Spawn(apb.SpawnRequest(spec=spec, idempotency_key=key),
                                          timeout=self._spawn_deadline(spec))
        except grpc.aio.AioRpcError as exc:
            if s is not previous and exc.code() in REFUSED:
                self._undo_new_session(s, previous)
            raise self._agent_error(link, exc) from exc
        tracked = TrackedGroup(link.row.name, reply.group, key)
        tracked.group.agent = link.row.name
        existing = self.groups.get((link.row.name, reply.group.group_id))
        if existing is not None and existing.ended and reply.group.state not in ENDED:
            tracked = existing
        self._track(tracked)
        self.store.put_group(tracked.row())
        self._publish(tracked, "state")
        return self.group_view(tracked)

    def _undo_new_session(self, s: SessionRow, previous: SessionRow | None) -> None:
        """The agent refused the spawn outright: forget the session it would have created."""
        if self.sessions.get(s.session_id) is not s or self.session_groups(s.session_id):
            return  # a concurrent spawn put something in it meanwhile: keep it
        if previous is None:
            del self.sessions[s.session_id]
            self.store.delete_session(s.session_id)
        else:
            self.sessions[s.session_id] = previous
            self.store.put_session(previous)
        if s.ttl:
            self._lease_changed.set()

    @staticmethod
    def _spawn_deadline(spec: pb.GroupSpec) -> float:
        start = spec.start_timeout_seconds if spec.HasField("start_timeout_seconds") else 30.0
        return min(max(start, 0.0), 86400.0) + 30.0

    async def adopt(self, agent: str, req: cpb.CoordinatorAdoptRequest) -> pb.Group:
        if not req.spec.session_id:
            raise InvalidSpec("adopt needs a session (--session NAME)", field="session")
        if req.spec.session_id not in self.sessions:
            self.create_session(req.spec.session_id, req.spec.window)
        link = self.resolve_agent(agent)
        areq = apb.AdoptRequest(pid=req.pid, spec=req.spec)
        if req.HasField("start_time"):
            areq.start_time = req.start_time
        try:
            reply = await link.stub.Adopt(areq, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise self._agent_error(link, exc) from exc
        tracked = TrackedGroup(link.row.name, reply.group)
        self._track(tracked)
        self.store.put_group(tracked.row())
        self._publish(tracked, "state")
        return self.group_view(tracked)

    def _agent_error(self, link: AgentLink, exc: grpc.aio.AioRpcError) -> TetherError:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return AgentUnreachable(link.row.name, link.row.address, exc.details() or code.name)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidSpec(exc.details() or "invalid request")
        if code == grpc.StatusCode.NOT_FOUND:
            return _RemoteNotFound(exc.details() or "not found")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return Conflict(exc.details() or "refused")
        return TetherError(f"agent {link.row.name!r}: {exc.details() or code.name}")

    # ------------------------------------------------------------ signal

    async def signal_session(self, session_id: str, signal_name: str) -> cpb.SessionReport:
        self.session(session_id)
        sig = parse_signal(signal_name)
        t0 = time.monotonic()
        live = [t for t in self.session_groups(session_id) if not t.ended]

        async def one(t: TrackedGroup) -> cpb.GroupReport:
            rep = self._report(t)
            link = self.agents.get(t.agent)
            if link is None:
                rep.error = f"agent {t.agent!r} is not registered"
                return rep
            try:
                reply = await link.stub.Signal(
                    apb.SignalRequest(group_id=t.group_id, signal=sig.name), timeout=10)
            except grpc.aio.AioRpcError as exc:
                rep.error = str(self._agent_error(link, exc))
                return rep
            rep.members_signalled = reply.members_signalled
            self.absorb(t.agent, reply.group)
            rep.state = reply.group.state
            return rep

        reports = await asyncio.gather(*(one(t) for t in live))
        self.hooks.fanout("signal", time.monotonic() - t0)
        return cpb.SessionReport(session_id=session_id, groups=reports,
                                 complete=all(not r.error for r in reports))

    def _report(self, t: TrackedGroup) -> cpb.GroupReport:
        g = self.group_view(t)
        rep = cpb.GroupReport(group_id=t.group_id, label=g.spec.label, agent=t.agent,
                              target=g.spec.target or "local", state=g.state,
                              stop_order=g.spec.stop_order, error=t.error,
                              attempts=t.attempts)
        if g.HasField("exit"):
            rep.exit.CopyFrom(g.exit)
        return rep

    # ------------------------------------------------------------ stop

    def _begin_stop(self, session_id: str, grace: float | None, cause: str,
                    persist: bool = True) -> asyncio.Task[cpb.SessionReport]:
        task = self._stops.get(session_id)
        if task is not None and not task.done():
            return task
        s = self.session(session_id)
        s.state = "stopping"
        s.stop_cause = s.stop_cause if (s.stop_cause and not persist) else cause
        self.store.put_session(s)
        if persist:
            self.store.put_intent(StopIntent(session_id, grace, cause, time.time()))
        task = self._tasks.spawn(self._run_stop(session_id, grace), f"stop-{session_id}")
        self._stops[session_id] = task
        return task

    async def stop_session(self, session_id: str, grace: float | None,
                           wait: float | None = None) -> cpb.SessionReport:
        s = self.session(session_id)
        if grace is not None and (not (0 <= grace <= 86400) or grace != grace):
            raise InvalidSpec(f"grace {grace!r} s is out of range (0 to 86400)", field="grace")
        if s.state == "stopped" and all(t.ended for t in self.session_groups(session_id)):
            return self._session_report(session_id, complete=True)
        task = self._begin_stop(session_id, grace, "requested")
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(task)
        except TimeoutError:
            return self._session_report(session_id, complete=False)

    def _session_report(self, session_id: str, complete: bool) -> cpb.SessionReport:
        groups = sorted(self.session_groups(session_id),
                        key=lambda t: (t.group.spec.stop_order, t.group_id))
        s = self.sessions[session_id]
        return cpb.SessionReport(session_id=session_id, groups=[self._report(t) for t in groups],
                                 complete=complete, stop_cause=s.stop_cause)

    async def _run_stop(self, session_id: str, grace: float | None) -> cpb.SessionReport:
        t0 = time.monotonic()
        phases = sorted({t.group.spec.stop_order for t in self.session_groups(session_id)})
        for order in phases:
            todo = [t for t in self.session_groups(session_id)
                    if t.group.spec.stop_order == order and not t.ended]
            by_agent: dict[str, list[TrackedGroup]] = {}
            for t in todo:
                by_agent.setdefault(t.agent, []).append(t)
            log.info("session %r: stopping phase stop_order=%d: %d group(s) on %d agent(s)",
                     session_id, order, len(todo), len(by_agent))
            async with asyncio.TaskGroup() as tg:
                for agent, groups in by_agent.items():
                    tg.create_task(self._stop_on_agent(agent, groups, grace))
        self._flush()
        s = self.sessions[session_id]
        s.state = "stopped"
        self.store.put_session(s)
        self.store.drop_intent(session_id)
        self._lease_changed.set()
        report = self._session_report(session_id, complete=True)
        clean = all(r.exit.survivors == 0 and r.exit.reason != pb.EXIT_REASON_LOST
                    for r in report.groups)
        self.hooks.session_stopped("clean" if clean else "unclean")
        self.hooks.fanout("stop", time.monotonic() - t0)
        log.info("session %r stopped (%s) in %.3f s", session_id, s.stop_cause,
                 time.monotonic() - t0)
        return report

    async def _stop_on_agent(self, agent: str, groups: list[TrackedGroup],
                             grace: float | None) -> None:
        """Stop every group on one agent with one StopGroups call; retry with backoff until
        each has a record. Groups of an agent that does not answer are reported with the
        reason (state unreachable, error set), never dropped."""
        backoff = 0.1
        attempts = 0
        pending = list(groups)
        while pending:
            attempts += 1
            link = self.agents.get(agent)
            if link is None:
                for t in pending:
                    self._mark_lost(t, f"agent {agent!r} is not registered any more")
                return
            pending = await self._stop_batch(link, pending, grace)
            for t in pending:
                t.attempts = attempts
            if not pending:
                return
            self.store.put_groups([t.row() for t in pending])
            for t in pending:
                self._publish(t, "unreachable")
            log.warning("agent %r: %d group(s) not stopped yet (attempt %d: %s); retrying in "
                        "%.1f s", agent, len(pending), attempts, pending[0].error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.retry_backoff_max)

    async def _stop_batch(self, link: AgentLink, groups: list[TrackedGroup],
                          grace: float | None) -> list[TrackedGroup]:
        """One StopGroups call; returns the groups that still have no record."""
        req = apb.StopGroupsRequest(group_ids=[t.group_id for t in groups])
        if grace is not None:
            req.policy.grace_seconds = grace

        def effective(t: TrackedGroup) -> float:
            if grace is not None:
                return grace
            stop = t.group.spec.stop
            return stop.grace_seconds if stop.HasField("grace_seconds") else 5.0

        deadline = max(effective(t) for t in groups) + self.config.call_margin
        try:
            reply = await link.stub.StopGroups(req, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            error = str(self._agent_error(link, exc))
            for t in groups:
                t.error = error
            return list(groups)
        by_id: dict[str, TrackedGroup | None] = {t.group_id: t for t in groups}
        for g in reply.groups:
            self.absorb(link.row.name, g, "exit", persist=False)
            by_id.pop(g.group_id, None)
        for gid, why in reply.errors.items():
            unknown = by_id.pop(gid, None)
            if unknown is not None:
                self._mark_lost(unknown, f"agent {link.row.name!r} does not know this group "
                                f"({why})")
        self._flush()
        return [t for t in by_id.values() if t is not None]

    # ------------------------------------------------------------ watch

    def _publish(self, tracked: TrackedGroup, kind: str) -> None:
        self._seq += 1
        subs = [sub for sub in self._subscribers
                if sub.session_id == tracked.group.spec.session_id]
        if not subs:
            return  # nobody watches this session: build no event
        event = pb.GroupEvent(seq=self._seq, kind=kind, group=self.group_view(tracked))
        event.at.GetCurrentTime()
        for sub in subs:
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._subscribers.remove(sub)

    async def watch_session(self, session_id: str, initial: bool) -> AsyncIterator[pb.GroupEvent]:
        self.session(session_id)
        sub = Subscriber(session_id)
        self._subscribers.append(sub)
        try:
            if initial:
                for t in self.session_groups(session_id):
                    yield pb.GroupEvent(seq=self._seq, kind="initial", group=self.group_view(t))
            while True:
                event = await sub.queue.get()
                if event is None:
                    return
                yield event
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(sub)

    # ------------------------------------------------------------ orphans

    async def list_orphans(self, sweep: bool) -> cpb.CoordinatorListOrphansResponse:
        out = cpb.CoordinatorListOrphansResponse()

        async def one(link: AgentLink) -> None:
            try:
                reply = await link.stub.ListOrphans(apb.ListOrphansRequest(sweep=sweep), timeout=10)
            except grpc.aio.AioRpcError as exc:
                out.unreachable[link.row.name] = exc.details() or exc.code().name
                return
            for o in reply.orphans:
                o.agent = link.row.name
                out.orphans.append(o)

        await asyncio.gather(*(one(link) for link in self.agents.values()))
        return out


class _RemoteNotFound(TetherError):
    pass

