"""AgentService: the gRPC face of the Authority. Translation only; no lifecycle logic here."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

import tether
from tether.agent.authority import Authority, GroupEvent
from tether.agent.convert import (
    CONTAINMENT_TO_PB,
    event_to_pb,
    group_to_pb,
    spec_from_pb,
    stop_policy_from_pb,
)
from tether.agent.errors import GroupNotFound, InvalidSpec
from tether.agent.grpc_errors import stream, unary
from tether.agent.model import StopPolicy, parse_signal
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc
from tether.v1 import common_pb2 as pb


class AgentServicer(agrpc.AgentServiceServicer):
    def __init__(self, authority: Authority,
                 orphans: Callable[[bool], Any] | None = None) -> None:
        self.authority = authority
        self._orphans = orphans

    @unary
    async def Spawn(self, request: apb.SpawnRequest, context: Any) -> apb.SpawnResponse:
        view = await self.authority.spawn(spec_from_pb(request.spec), request.idempotency_key)
        return apb.SpawnResponse(group=group_to_pb(view))

    @unary
    async def Adopt(self, request: apb.AdoptRequest, context: Any) -> apb.AdoptResponse:
        if request.pid <= 0:
            raise InvalidSpec(f"pid {request.pid} is not a process id", field="pid")
        spec = request.spec
        if not spec.argv:
            spec.argv.append(f"adopted:{request.pid}")
        start = request.start_time if request.HasField("start_time") else None
        view = await self.authority.adopt(request.pid, start, spec_from_pb(spec))
        return apb.AdoptResponse(group=group_to_pb(view))

    @unary
    async def Signal(self, request: apb.SignalRequest, context: Any) -> apb.SignalResponse:
        out = await self.authority.signal(request.group_id, parse_signal(request.signal))
        return apb.SignalResponse(members_signalled=out.members_signalled,
                                  already_gone=out.already_gone, group=group_to_pb(out.group))

    @unary
    async def Stop(self, request: apb.StopRequest, context: Any) -> apb.StopResponse:
        policy = None
        if request.HasField("policy"):
            current = self.authority.get(request.group_id).spec.stop
            policy = stop_policy_from_pb(request.policy, default_grace=current.grace)
        view = await self.authority.stop(request.group_id, policy)
        return apb.StopResponse(group=group_to_pb(view))

    @unary
    async def StopGroups(self, request: apb.StopGroupsRequest, context: Any
                         ) -> apb.StopGroupsResponse:
        reply = apb.StopGroupsResponse()
        known = []
        for gid in request.group_ids:
            try:
                self.authority.get(gid)
            except GroupNotFound as exc:
                reply.errors[gid] = str(exc)
            else:
                known.append(gid)
        policies: dict[str, StopPolicy | None] = {}
        for gid in known:
            policies[gid] = None
            if request.HasField("policy"):
                current = self.authority.get(gid).spec.stop
                policies[gid] = stop_policy_from_pb(request.policy, default_grace=current.grace)
        views = await self.authority.stop_many(policies.items(), requested_at=time.monotonic())
        reply.groups.extend(group_to_pb(v) for v in views)
        return reply

    @unary
    async def Get(self, request: apb.GetRequest, context: Any) -> apb.GetResponse:
        view = self.authority.get(request.group_id)
        msg = group_to_pb(view)
        msg.member_count = await self.authority.member_count(request.group_id)
        return apb.GetResponse(group=msg)

    @unary
    async def List(self, request: apb.ListRequest, context: Any) -> apb.ListResponse:
        views = self.authority.views(request.session_id, request.include_ended)
        return apb.ListResponse(groups=[group_to_pb(v) for v in views])

    @stream
    async def Watch(self, request: apb.WatchRequest, context: Any
                    ) -> AsyncIterator[pb.GroupEvent]:
        ids = set(request.group_ids)
        session = request.session_id

        def accept(ev: GroupEvent) -> bool:
            return ((not session or ev.group.spec.session_id == session)
                    and (not ids or ev.group.group_id in ids))

        initial = [v for v in self.authority.views(session) if not ids or v.group_id in ids] \
            if request.initial else []
        async for event in self.authority.watch(accept, initial):
            yield event_to_pb(event)

    @unary
    async def ListOrphans(self, request: apb.ListOrphansRequest, context: Any
                          ) -> apb.ListOrphansResponse:
        if self._orphans is None:
            return apb.ListOrphansResponse()
        found = await self._orphans(request.sweep)
        return apb.ListOrphansResponse(orphans=[
            pb.Orphan(pid=o.pid, command=o.command, former_group=o.former_group,
                      age_seconds=o.age, found_by=o.found_by, agent=self.authority.name,
                      reaped=o.reaped)
            for o in found
        ])

    @unary
    async def Info(self, request: apb.InfoRequest, context: Any) -> apb.InfoResponse:
        local = self.authority.signallers.get("local")
        from tether.signallers.registry import known_kinds

        return apb.InfoResponse(name=self.authority.name, version=tether.__version__,
                                containment=CONTAINMENT_TO_PB[local.containment],
                                hostname=socket.gethostname(), signallers=known_kinds())




def add_to_server(server: grpc.aio.Server, servicer: AgentServicer) -> None:
    agrpc.add_AgentServiceServicer_to_server(servicer, server)
