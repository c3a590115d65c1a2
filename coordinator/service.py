"""CoordinatorService: the gRPC face of the Coordinator. Translation only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tether.coordinator.core import Coordinator
from tether.core.errors import InvalidSpec
from tether.rpc.status import stream, unary
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

# A StopSession call answers within this long even if an agent stays unreachable;
# the stop itself goes on (persisted) and WatchSession / GetSession show its end.
STOP_ANSWER_WITHIN = 300.0


class CoordinatorServicer(cgrpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    @unary
    async def RegisterAgent(self, request: cpb.RegisterAgentRequest, context: Any
                            ) -> cpb.RegisterAgentResponse:
        return self.c.register_agent(request)

    @unary
    async def Heartbeat(self, request: cpb.HeartbeatRequest, context: Any
                        ) -> cpb.HeartbeatResponse:
        return cpb.HeartbeatResponse(known=self.c.heartbeat(request.name, request.epoch))

    @unary
    async def ListAgents(self, request: cpb.ListAgentsRequest, context: Any
                         ) -> cpb.ListAgentsResponse:
        return cpb.ListAgentsResponse(agents=self.c.agent_states())

    @unary
    async def CreateSession(self, request: cpb.CreateSessionRequest, context: Any) -> cpb.Session:
        s = self.c.create_session(request.session_id, request.window, dict(request.labels),
                                  request.ttl_seconds)
        return self.c.session_pb(s)

    @unary
    async def GetSession(self, request: cpb.GetSessionRequest, context: Any) -> cpb.Session:
        return self.c.session_pb(self.c.session(request.session_id))

    @unary
    async def ListSessions(self, request: cpb.ListSessionsRequest, context: Any
                           ) -> cpb.ListSessionsResponse:
        return cpb.ListSessionsResponse(sessions=[
            self.c.session_pb(s) for s in self.c.sessions.values()
            if request.include_stopped or s.state != "stopped"
        ])

    @unary
    async def KeepAlive(self, request: cpb.KeepAliveRequest, context: Any) -> cpb.Session:
        return self.c.session_pb(self.c.keepalive(request.session_id, request.ttl_seconds))

    @unary
    async def Spawn(self, request: cpb.CoordinatorSpawnRequest, context: Any) -> pb.Group:
        return await self.c.spawn(request.agent, request.spec, request.idempotency_key)

    @unary
    async def Adopt(self, request: cpb.CoordinatorAdoptRequest, context: Any) -> pb.Group:
        if request.pid <= 0:
            raise InvalidSpec(f"pid {request.pid} is not a process id", field="pid")
        return await self.c.adopt(request.agent, request)

    @unary
    async def SignalSession(self, request: cpb.SignalSessionRequest, context: Any
                            ) -> cpb.SessionReport:
        return await self.c.signal_session(request.session_id, request.signal)

    @unary
    async def StopSession(self, request: cpb.StopSessionRequest, context: Any
                          ) -> cpb.SessionReport:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        remaining = context.time_remaining()
        wait = STOP_ANSWER_WITHIN if remaining is None else max(0.0, min(remaining - 0.5,
                                                                        STOP_ANSWER_WITHIN))
        return await self.c.stop_session(request.session_id, grace, wait)

    @stream
    async def WatchSession(self, request: cpb.WatchSessionRequest, context: Any
                           ) -> AsyncIterator[pb.GroupEvent]:
        async for event in self.c.watch_session(request.session_id, request.initial):
            yield event

    @unary
    async def ListOrphans(self, request: cpb.CoordinatorListOrphansRequest, context: Any
                          ) -> cpb.CoordinatorListOrphansResponse:
        return await self.c.list_orphans(request.sweep)


def add_to_server(server: grpc.aio.Server, servicer: CoordinatorServicer) -> None:
    cgrpc.add_CoordinatorServiceServicer_to_server(servicer, server)
