"""CoordinatorService: the gRPC face of the Coordinator. Translation only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tether.coordinator.core import Coordinator
from tether.core.errors import InvalidSpec
from tether.core.model import Containment, check_name, check_seconds
from tether.core.sessions import MAX_TTL, AgentInfo
from tether.rpc.convert import (
    CONTAINMENT_FROM_PB,
    agent_to_pb,
    group_to_pb,
    orphan_to_pb,
    report_to_pb,
    selector_from_pb,
    session_event_to_pb,
    session_to_pb,
    spec_from_pb,
)
from tether.rpc.status import stream, unary
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

# A StopSession call answers within this long even if an agent stays unreachable;
# the stop itself goes on (persisted) and WatchSession / GetSession show its end.
STOP_ANSWER_WITHIN = 300.0
MAX_PID = 2**31


def agent_info(req: cpb.RegisterAgentRequest) -> AgentInfo:
    check_name(req.name, "agent name")
    return AgentInfo(req.name, req.address,
                     CONTAINMENT_FROM_PB.get(req.containment, Containment.PGID), req.version,
                     req.epoch, instance=req.instance)


class CoordinatorServicer(cgrpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    @unary
    async def RegisterAgent(self, request: cpb.RegisterAgentRequest, context: Any
                            ) -> cpb.RegisterAgentResponse:
        self.c.agents.register(agent_info(request))
        await self.c.durable()
        return cpb.RegisterAgentResponse(
            heartbeat_interval_seconds=self.c.config.heartbeat_interval,
            ttl_seconds=self.c.config.agent_ttl)

    @unary
    async def Heartbeat(self, request: cpb.HeartbeatRequest, context: Any
                        ) -> cpb.HeartbeatResponse:
        return cpb.HeartbeatResponse(known=self.c.agents.heartbeat(request.name, request.epoch))

    @unary
    async def ListAgents(self, request: cpb.ListAgentsRequest, context: Any
                         ) -> cpb.ListAgentsResponse:
        return cpb.ListAgentsResponse(agents=[agent_to_pb(a) for a in self.c.agents.states()])

    @unary
    async def CreateSession(self, request: cpb.CreateSessionRequest, context: Any) -> cpb.Session:
        s, _ = self.c.sessions.create(request.session_id, request.window, dict(request.labels),
                                      request.ttl_seconds)
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
        async for event in self.c.watch_session(request.session_id, request.initial, since):
            yield session_event_to_pb(event, self.c.epoch)

    @unary
    async def ListOrphans(self, request: cpb.CoordinatorListOrphansRequest, context: Any
                          ) -> cpb.CoordinatorListOrphansResponse:
        report = await self.c.fanout.list_orphans(request.sweep)
        return cpb.CoordinatorListOrphansResponse(
            orphans=[orphan_to_pb(o) for o in report.orphans], unreachable=report.unreachable)


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

