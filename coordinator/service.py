"""CoordinatorService: the gRPC face of the Coordinator. Translation only."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from tether.coordinator.core import Coordinator
from tether.core.audit import MAX_READ, AuditEntry, AuditLog
from tether.core.errors import InvalidSpec, NotFound
from tether.core.model import Containment, check_name, check_seconds
from tether.core.sessions import MAX_TTL, AgentInfo
from tether.rpc.auth import current_caller
from tether.rpc.convert import (
    CONTAINMENT_FROM_PB,
    agent_to_pb,
    audit_event_to_pb,
    group_to_pb,
    orphan_to_pb,
    port_owner_to_pb,
    report_to_pb,
    selector_from_pb,
    session_event_to_pb,
    session_to_pb,
    spec_from_pb,
)
from tether.rpc.status import stream, subscribed, unary
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

# A StopSession call answers within this long even if an agent stays unreachable;
# the stop itself goes on (persisted) and WatchSession / GetSession show its end.
STOP_ANSWER_WITHIN = 300.0
MAX_PID = 2**31


#: What a registration may give as its address: HOST:PORT (a DNS name, an IPv4 address
#: or a bracketed IPv6 one), never a gRPC target scheme (unix:, dns:///...) that would
#: have the coordinator dial somewhere else than a TCP port.
AGENT_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))"
                           r":([1-9][0-9]{0,4})")


def check_address(address: str) -> str:
    m = AGENT_ADDRESS.fullmatch(address)
    if m is None or int(m[2]) > 65535:
        raise InvalidSpec(f"agent address {address!r} is not HOST:PORT (a host name, an IPv4 "
                          "address or [an IPv6 one], and a port 1-65535); give the address "
                          "the coordinator should dial (--advertise)", field="address")
    return address


def agent_info(req: cpb.RegisterAgentRequest, credential: str) -> AgentInfo:
    check_name(req.name, "agent name")
    check_address(req.address)
    # Stored as text (PostgreSQL refuses a NUL in text): refuse here, with a message,
    # rather than hand the store a row it cannot write.
    check_name(req.version, "agent version", allow_empty=True)
    check_name(req.epoch, "agent epoch", allow_empty=True)
    check_name(req.instance, "agent instance", allow_empty=True)
    return AgentInfo(req.name, req.address,
                     CONTAINMENT_FROM_PB.get(req.containment, Containment.PGID), req.version,
                     req.epoch, instance=req.instance, credential=credential)


class CoordinatorServicer(cgrpc.CoordinatorServiceServicer):
    """``leader``: what GetLeader answers (several coordinators: ``gate.py`` answers it);
    by default, this coordinator leads alone."""

    def __init__(self, coordinator: Coordinator, audit: AuditLog | None = None,
                 leader: Callable[[], cpb.LeaderInfo] | None = None) -> None:
        self.c = coordinator
        self.audit = audit
        self.leader = leader or (lambda: cpb.LeaderInfo(
            leading=True, epoch=self.c.term.epoch if self.c.term else 0,
            store=self.c.store.where))

    @unary
    async def RegisterAgent(self, request: cpb.RegisterAgentRequest, context: Any
                            ) -> cpb.RegisterAgentResponse:
        # The name is bound to the caller's credential (its role was checked already:
        # an agent:NAME caller registers NAME only).
        self.c.agents.register(agent_info(request, current_caller().credential))
        await self.c.durable()
        return cpb.RegisterAgentResponse(
            heartbeat_interval_seconds=self.c.config.heartbeat_interval,
            ttl_seconds=self.c.config.agent_ttl)

    @unary
    async def Heartbeat(self, request: cpb.HeartbeatRequest, context: Any
                        ) -> cpb.HeartbeatResponse:
        return cpb.HeartbeatResponse(known=self.c.agents.heartbeat(
            request.name, request.epoch, current_caller().credential))

    @unary
    async def ForgetAgent(self, request: cpb.ForgetAgentRequest, context: Any
                          ) -> cpb.ForgetAgentResponse:
        lost = self.c.agents.forget(request.name, request.force)
        await self.c.durable()
        return cpb.ForgetAgentResponse(lost_group_ids=lost)

    @unary
    async def ListAgents(self, request: cpb.ListAgentsRequest, context: Any
                         ) -> cpb.ListAgentsResponse:
        return cpb.ListAgentsResponse(agents=[agent_to_pb(a) for a in self.c.agents.states()])

    @unary
    async def CreateSession(self, request: cpb.CreateSessionRequest, context: Any) -> cpb.Session:
        s, _ = self.c.sessions.create(request.session_id, request.window, dict(request.labels),
                                      request.ttl_seconds, explicit=True)
        await self.c.durable()
        return session_to_pb(self.c.sessions.view(s))

    @unary
    async def GetSession(self, request: cpb.GetSessionRequest, context: Any) -> cpb.Session:
        return session_to_pb(self.c.sessions.view(self.c.session(request.session_id)))

    @unary
    async def ListSessions(self, request: cpb.ListSessionsRequest, context: Any
                           ) -> cpb.ListSessionsResponse:
        views, token = self.c.sessions.page(request.include_stopped, request.page_size,
                                            request.page_token, request.include_groups)
        return cpb.ListSessionsResponse(sessions=[session_to_pb(v) for v in views],
                                        next_page_token=token)

    @unary
    async def KeepAlive(self, request: cpb.KeepAliveRequest, context: Any) -> cpb.Session:
        s = self.c.sessions.keepalive(request.session_id, request.ttl_seconds)
        await self.c.durable()
        return session_to_pb(self.c.sessions.view(s))

    @unary
    async def Spawn(self, request: cpb.CoordinatorSpawnRequest, context: Any) -> pb.Group:
        agent, view = await self.c.fanout.spawn(request.agent, spec_from_pb(request.spec),
                                                request.idempotency_key)
        msg = group_to_pb(view, redact=False)  # the caller sent the environment
        msg.agent = agent
        return msg

    @unary
    async def Adopt(self, request: cpb.CoordinatorAdoptRequest, context: Any) -> pb.Group:
        if not 0 < request.pid < MAX_PID:
            raise InvalidSpec(f"pid {request.pid} is not a process id; give the pid of the "
                              "tree's leader", field="pid")
        spec = request.spec
        if not spec.argv:
            spec.argv.append(f"adopted:{request.pid}")
        start = request.start_time if request.HasField("start_time") else None
        agent, view = await self.c.fanout.adopt(request.agent, request.pid, start,
                                                spec_from_pb(spec))
        msg = group_to_pb(view)
        msg.agent = agent
        return msg

    @unary
    async def SignalSession(self, request: cpb.SignalSessionRequest, context: Any
                            ) -> cpb.SessionReport:
        return report_to_pb(await self.c.fanout.signal_session(
            request.session_id, request.signal, selector_from_pb(request.selector)))

    @unary
    async def StopSession(self, request: cpb.StopSessionRequest, context: Any
                          ) -> cpb.SessionReport:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        wait = _answer_within(context, STOP_ANSWER_WITHIN)
        selector = selector_from_pb(request.selector)
        if not selector.everything:
            return report_to_pb(await self.c.fanout.stop_groups(request.session_id, selector,
                                                                grace, wait))
        return report_to_pb(await self.c.fanout.stop_session(request.session_id, grace, wait))

    @unary
    async def RestartGroups(self, request: cpb.RestartGroupsRequest, context: Any
                            ) -> cpb.SessionReport:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        return report_to_pb(await self.c.fanout.restart(
            request.session_id, selector_from_pb(request.selector), grace))

    @unary
    async def ForgetGroups(self, request: cpb.ForgetGroupsRequest, context: Any
                           ) -> cpb.ForgetGroupsResponse:
        done = await self.c.fanout.forget(request.session_id,
                                          selector_from_pb(request.selector))
        return cpb.ForgetGroupsResponse(forgotten=done)

    @unary
    async def Wait(self, request: cpb.WaitRequest, context: Any) -> cpb.SessionReport:
        limit = _answer_within(context, None)
        if request.HasField("timeout_seconds"):
            asked = check_seconds(request.timeout_seconds, "wait timeout", "timeout",
                                  high=MAX_TTL)
            limit = asked if limit is None else min(asked, limit)
        return report_to_pb(await self.c.wait_idle(request.session_id, limit))

    @stream
    async def WatchSession(self, request: cpb.WatchSessionRequest, context: Any
                           ) -> AsyncIterator[cpb.SessionEvent]:
        since = request.since_seq if request.epoch == self.c.epoch else 0
        events = self.c.watch_session(request.session_id, request.initial, since)
        await subscribed(context, self.c.events.seq, self.c.epoch)
        async for event in events:
            yield session_event_to_pb(event, self.c.epoch)

    @unary
    async def ListOrphans(self, request: cpb.CoordinatorListOrphansRequest, context: Any
                          ) -> cpb.CoordinatorListOrphansResponse:
        report = await self.c.agents.list_orphans(request.sweep)
        return cpb.CoordinatorListOrphansResponse(
            orphans=[orphan_to_pb(o) for o in report.orphans], unreachable=report.unreachable)

    @stream
    async def ReadAudit(self, request: cpb.ReadAuditRequest, context: Any
                        ) -> AsyncIterator[cpb.AuditEvent]:
        if not 0 <= request.limit <= MAX_READ:
            raise InvalidSpec(f"limit {request.limit} is not between 0 and {MAX_READ}",
                              field="limit")
        if self.audit is None:
            raise NotFound("this coordinator keeps no audit log")
        since = request.since.ToNanoseconds() / 1e9 if request.HasField("since") else 0.0
        for entry in await self.audit.read(since, request.limit or 1000):
            try:
                yield audit_event_to_pb(AuditEntry.from_dict(entry))
            except (KeyError, ValueError, TypeError):
                continue  # a line written by hand, or by a newer tether

    @unary
    async def GetLeader(self, request: cpb.GetLeaderRequest, context: Any) -> cpb.LeaderInfo:
        return self.leader()


    @unary
    async def ListPorts(self, request: cpb.CoordinatorListPortsRequest, context: Any
                        ) -> cpb.CoordinatorListPortsResponse:
        if not 0 <= request.port < 65536:
            raise InvalidSpec(f"port {request.port} is not a TCP port; give 1-65535 (or 0 for "
                              "every port)", field="port")
        found, unreachable = await self.c.agents.list_ports(request.port, request.agent)
        return cpb.CoordinatorListPortsResponse(ports=[port_owner_to_pb(o) for o in found],
                                                unreachable=unreachable)


def _answer_within(context: Any, ceiling: float | None) -> float | None:
    """How long a call may wait before it answers with what is known: its deadline (less a
    margin for the answer to travel), at most ``ceiling``."""
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return ceiling
    left = max(0.0, remaining - 0.5)
    return left if ceiling is None else min(left, ceiling)


def add_to_server(server: grpc.aio.Server, servicer: CoordinatorServicer) -> None:
    cgrpc.add_CoordinatorServiceServicer_to_server(servicer, server)

