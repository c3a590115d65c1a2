"""AgentService: the gRPC face of the Authority. Translation only; no lifecycle logic here."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

import tether
from tether.agent.authority import Authority
from tether.agent.capture import attach_stream
from tether.core import trace
from tether.core.errors import InvalidSpec
from tether.core.model import GroupEvent, StopOverride, check_name, parse_signal
from tether.core.output import StdinInput
from tether.core.sessions import Orphan
from tether.rpc.auth import RoleKind, current_caller
from tether.rpc.convert import (
    CONTAINMENT_TO_PB,
    attach_open_from_pb,
    chunk_to_pb,
    event_to_pb,
    group_to_pb,
    override_from_pb,
    port_owner_to_pb,
    query_from_pb,
    spec_from_pb,
    stdin_from_pb,
)
from tether.rpc.status import stream, subscribed, unary
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc
from tether.v1 import common_pb2 as pb

MAX_PID = 2**31


def orphan_to_pb(o: Orphan, agent: str) -> pb.Orphan:
    return pb.Orphan(pid=o.pid, command=o.command, former_group=o.former_group,
                     age_seconds=o.age, found_by=o.found_by, agent=agent, reaped=o.reaped)


class AgentServicer(agrpc.AgentServiceServicer):
    def __init__(self, authority: Authority,
                 orphans: Callable[[bool], Awaitable[list[Orphan]]] | None = None,
                 info: Callable[[], dict[str, Any]] | None = None, epoch: str = "") -> None:
        self.authority = authority
        self._orphans = orphans
        self._info = info
        self.epoch = epoch

    @unary
    async def Spawn(self, request: apb.SpawnRequest, context: Any) -> apb.SpawnResponse:
        spec = spec_from_pb(request.spec)
        tp = trace.from_metadata(context.invocation_metadata(), "a Spawn call")
        if tp:
            spec = dataclasses.replace(spec, traceparent=tp)
        with trace.span("tether.agent.spawn", spec.traceparent, session=spec.session_id,
                        label=spec.label, group_id=request.group_id):
            key = check_name(request.idempotency_key, "idempotency_key", allow_empty=True)
            view = await self.authority.spawn(spec, key, request.group_id)
        # The caller sent the environment: it may have it back.
        return apb.SpawnResponse(group=group_to_pb(view, redact=False))

    @unary
    async def Adopt(self, request: apb.AdoptRequest, context: Any) -> apb.AdoptResponse:
        if not 0 < request.pid < MAX_PID:
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
        override = override_from_pb(request.policy) if request.HasField("policy") else None
        view = await self.authority.stop(request.group_id, override)
        return apb.StopResponse(group=group_to_pb(view))

    @unary
    async def StopGroups(self, request: apb.StopGroupsRequest, context: Any
                         ) -> apb.StopGroupsResponse:
        override: StopOverride | None = (override_from_pb(request.policy)
                                         if request.HasField("policy") else None)
        views, unknown = await self.authority.stop_groups(
            [(gid, override) for gid in request.group_ids], requested_at=time.monotonic())
        return apb.StopGroupsResponse(groups=[group_to_pb(v) for v in views], errors=unknown)

    @unary
    async def Restart(self, request: apb.RestartRequest, context: Any) -> apb.RestartResponse:
        override = override_from_pb(request.policy) if request.HasField("policy") else None
        view = await self.authority.restart(request.group_id, override)
        return apb.RestartResponse(group=group_to_pb(view))

    @unary
    async def Forget(self, request: apb.ForgetRequest, context: Any) -> apb.ForgetResponse:
        done, errors = self.authority.forget(request.group_ids)
        return apb.ForgetResponse(forgotten=done, errors=errors)

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

        since = request.since_seq if request.epoch == self.epoch else 0
        initial = [v for v in self.authority.views(session) if not ids or v.group_id in ids] \
            if request.initial else []
        events = self.authority.watch(accept, initial, since)  # subscribed from here on
        await subscribed(context, self.authority.epoch_seq, self.epoch)
        async for event in events:
            yield event_to_pb(event, self.epoch)

    @stream
    async def Logs(self, request: pb.LogsRequest, context: Any) -> AsyncIterator[pb.OutputChunk]:
        chunks = self.authority.logs(query_from_pb(request))
        try:
            async for chunk in chunks:
                yield chunk_to_pb(chunk)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    @stream
    async def Attach(self, requests: AsyncIterator[pb.AttachRequest], context: Any
                     ) -> AsyncIterator[pb.OutputChunk]:
        first = await anext(aiter(requests), None)
        if first is None:
            raise InvalidSpec("Attach: send the group first (an AttachRequest with group_id)",
                              field="group_id")
        attachment = self.authority.attach(attach_open_from_pb(first, attacher(first)))

        async def inputs() -> AsyncIterator[StdinInput]:
            if first.stdin or first.close_stdin:
                yield stdin_from_pb(first)
            async for msg in requests:
                yield stdin_from_pb(msg)

        chunks = attach_stream(attachment, inputs())
        try:
            async for chunk in chunks:
                yield chunk_to_pb(chunk)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    @unary
    async def ListOrphans(self, request: apb.ListOrphansRequest, context: Any
                          ) -> apb.ListOrphansResponse:
        if self._orphans is None:
            return apb.ListOrphansResponse()
        found = await self._orphans(request.sweep)
        return apb.ListOrphansResponse(orphans=[orphan_to_pb(o, self.authority.name)
                                                for o in found])

    @unary
    async def ListPorts(self, request: apb.ListPortsRequest, context: Any
                        ) -> apb.ListPortsResponse:
        found = await self.authority.list_ports(check_port(request.port))
        return apb.ListPortsResponse(ports=[port_owner_to_pb(o) for o in found])

    @unary
    async def Info(self, request: apb.InfoRequest, context: Any) -> apb.InfoResponse:
        from tether.signallers.registry import known_kinds

        local = self.authority.signallers.get("local")
        reply = apb.InfoResponse(name=self.authority.name, version=tether.__version__,
                                 containment=CONTAINMENT_TO_PB[local.containment],
                                 hostname=socket.gethostname(), signallers=known_kinds(),
                                 instance=self.authority.marker, epoch=self.epoch)
        if self._info is not None:
            extra = self._info()
            reply.fd_limit = extra["fd_limit"]
            reply.fds_open = extra["fds_open"]
            reply.groups_left = extra["groups_left"]
        return reply


def attacher(first: pb.AttachRequest) -> str:
    """Who attaches, as others are told: the caller, or, for a coordinator (or an admin)
    passing it on, the caller it attaches for."""
    caller = current_caller()
    if first.on_behalf_of and caller.role.kind in (RoleKind.COORDINATOR, RoleKind.ADMIN):
        return first.on_behalf_of
    return f"{caller.credential} at {caller.peer or 'an unknown peer'}"


def check_port(port: int) -> int:
    if not 0 <= port < 65536:
        raise InvalidSpec(f"port {port} is not a TCP port; give 1-65535 (or 0 for every port)",
                          field="port")
    return port


def add_to_server(server: grpc.aio.Server, servicer: AgentServicer) -> None:
    agrpc.add_AgentServiceServicer_to_server(servicer, server)
