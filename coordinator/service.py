"""CoordinatorService: the gRPC face of the Coordinator. Translation only."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc

from tether.coordinator import leases as lease_reasons
from tether.coordinator.core import Coordinator
from tether.coordinator.leases import OPEN_WITHIN, Holder
from tether.core import trace
from tether.core.audit import MAX_READ, AuditEntry, AuditLog
from tether.core.errors import InvalidSpec, NotFound, TetherError
from tether.core.model import Containment, GroupSpec, check_name, check_seconds
from tether.core.output import StdinInput
from tether.core.sessions import MAX_TTL, AgentInfo, GroupSelector
from tether.rpc.auth import Caller, audit_entry, current_caller
from tether.rpc.convert import (
    CONTAINMENT_FROM_PB,
    agent_to_pb,
    attach_open_from_pb,
    audit_event_to_pb,
    chunk_to_pb,
    group_to_pb,
    lease_state_to_pb,
    orphan_to_pb,
    port_owner_to_pb,
    query_from_pb,
    report_to_pb,
    selector_from_pb,
    session_event_to_pb,
    session_to_pb,
    spec_from_pb,
    stdin_from_pb,
)
from tether.rpc.status import status_for, stream, subscribed, unary
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
        spec = traced(spec_from_pb(request.spec), context)
        with trace.span("tether.spawn", spec.traceparent, session=spec.session_id,
                        label=spec.label, agent=request.agent) as sp:
            key = check_name(request.idempotency_key, "idempotency_key", allow_empty=True)
            agent, view = await self.c.fanout.spawn(request.agent, spec, key)
            if sp is not None:
                sp.set_attributes({"tether.group_id": view.group_id, "tether.agent": agent,
                                   "tether.state": view.state.value})
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
        tp = trace.from_metadata(context.invocation_metadata(), "a StopSession call")
        with trace.span("tether.stop.request", tp, session=request.session_id):
            if not selector.everything:
                return report_to_pb(await self.c.fanout.stop_groups(
                    request.session_id, selector, grace, wait))
            return report_to_pb(await self.c.fanout.stop_session(request.session_id, grace,
                                                                 wait))

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

    @stream
    async def OpenLease(self, requests: AsyncIterator[cpb.LeaseRequest], context: Any
                        ) -> AsyncIterator[cpb.LeaseState]:
        c = self.c  # the coordinator of this term, even if another one serves later
        caller = current_caller()
        within = c.leases.admit(caller.credential)
        try:
            async with contextlib.aclosing(self._lease(c, requests, context, caller,
                                                       within)) as out:
                async for msg in out:
                    yield msg
        finally:
            c.leases.leave(caller.credential)

    async def _lease(self, c: Coordinator, requests: AsyncIterator[cpb.LeaseRequest],
                     context: Any, caller: Caller, within: bool
                     ) -> AsyncGenerator[cpb.LeaseState, None]:
        it = aiter(requests)
        try:
            async with asyncio.timeout(OPEN_WITHIN):
                first = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"OpenLease: no opening message within {OPEN_WITHIN:g} s; send "
                                "the session_id (and resume_token) first")
        grace = first.lease_grace_seconds if first.HasField("lease_grace_seconds") else None
        try:
            if not within and not c.leases.may_exceed(first.session_id, first.resume_token):
                raise c.leases.too_many(caller.credential)
            holder, state = c.leases.open(first.session_id, window=first.window,
                                          labels=dict(first.labels), grace=grace,
                                          token=first.resume_token,
                                          credential=caller.credential)
        except TetherError as exc:
            self._audit_lease(caller, first, exc)
            raise
        self._audit_lease(caller, first, None)
        holder.task = asyncio.current_task()
        try:
            await c.durable()  # the lease (and its token's hash) survives a restart
            holder.writing = True
            yield lease_state_to_pb(state)
            holder.writing = False
            async for _ in _renewals(holder, it):
                c.leases.renew(holder)
                holder.writing = True
                yield lease_state_to_pb(c.leases.state(holder))
                holder.writing = False
            why = holder.why
            if why == lease_reasons.STOPPED:
                yield lease_state_to_pb(c.leases.state(holder))
            elif why == lease_reasons.TAKEN_OVER:  # final: the client must not take it back
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"the lease of session {holder.session_id!r} was taken "
                                    "over by another stream with its resume token")
            elif why == lease_reasons.TIMED_OUT:
                await context.abort(grpc.StatusCode.ABORTED,
                                    f"no renewal within {holder.timeout:g} s: this stream lost "
                                    f"the lease; reconnect with the resume token within "
                                    f"{holder.grace:g} s to take it back")
            # closing: the stream just ends (with several coordinators the gate says where
            # the leader is); the client reconnects with its token.
        finally:
            c.leases.release(holder)

    def _audit_lease(self, caller: Caller, request: cpb.LeaseRequest,
                     exc: TetherError | None) -> None:
        self._audit_open("OpenLease", caller, request, exc,
                         {"resume": "true" if request.resume_token else "false"})

    def _audit_open(self, method: str, caller: Caller, request: Any,
                    exc: BaseException | None, details: dict[str, str] | None = None) -> None:
        """A request stream audited when it opened (``audit_by_servicer``), with how."""
        if self.audit is None:
            return
        result, message = ("OK", "") if exc is None else (
            (status_for(exc).name, str(exc)) if isinstance(exc, TetherError)
            else ("CANCELLED", "the caller went away before it was attached"))
        self.audit.record(audit_entry(f"/tether.v1.CoordinatorService/{method}", caller,
                                      request, None, result, message, details))

    @stream
    async def Logs(self, request: pb.LogsRequest, context: Any) -> AsyncIterator[pb.OutputChunk]:
        query = query_from_pb(request)
        credential = current_caller().credential
        self.c.output.admit(credential)
        try:
            chunks = self.c.output.logs(query, GroupSelector(query.group_ids))
            try:
                async for chunk in chunks:
                    yield chunk_to_pb(chunk)
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
        finally:
            self.c.output.leave(credential)

    @stream
    async def Attach(self, requests: AsyncIterator[pb.AttachRequest], context: Any
                     ) -> AsyncIterator[pb.OutputChunk]:
        first = await anext(aiter(requests), None)
        if first is None:
            raise InvalidSpec("Attach: send the group first (an AttachRequest with group_id "
                              "and session_id)", field="group_id")
        caller = current_caller()
        opened = attach_open_from_pb(first, f"{caller.credential} at "
                                            f"{caller.peer or 'an unknown peer'}")

        async def inputs() -> AsyncIterator[StdinInput]:
            if first.stdin or first.close_stdin:
                yield stdin_from_pb(first)
            async for msg in requests:
                yield stdin_from_pb(msg)

        # Audited once attached (the agent confirmed it: a writer holds the role now), or
        # refused: not only when it ends, which may be days later.
        try:
            chunks = self.c.output.attach(opened, inputs())
        except TetherError as exc:
            self._audit_open("Attach", caller, first, exc)
            raise
        audited = False
        try:
            async for chunk in chunks:
                if not audited:
                    audited = True
                    self._audit_open("Attach", caller, first, None)
                yield chunk_to_pb(chunk)
        except BaseException as exc:
            if not audited:
                audited = True
                self._audit_open("Attach", caller, first, exc)
            raise
        finally:
            if not audited:
                self._audit_open("Attach", caller, first, None)  # ended before any output
            await chunks.aclose()  # type: ignore[attr-defined]

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


async def _renewals(holder: Holder, requests: AsyncIterator[cpb.LeaseRequest]
                    ) -> AsyncIterator[None]:
    """One item per renewal, until the client ends its stream or the holder is told to end
    (``holder.why``): taken over, session stopped, coordinator closing, renewals late."""
    ended = asyncio.ensure_future(holder.ended.wait())
    read: asyncio.Future[cpb.LeaseRequest] | None = None
    try:
        while not holder.why:
            read = asyncio.ensure_future(anext(requests))
            done, _ = await asyncio.wait({read, ended}, return_when=asyncio.FIRST_COMPLETED)
            if read not in done:
                return  # (the read is cancelled and awaited below)
            finished, read = read, None
            try:
                msg = finished.result()
            except StopAsyncIteration:
                return  # the client closed its side: the stream is over
            if msg.session_id and msg.session_id != holder.session_id:
                raise InvalidSpec(f"a renewal names session {msg.session_id!r}, but this "
                                  f"stream holds the lease of {holder.session_id!r}; open one "
                                  "stream per session", field="session_id")
            if not holder.why:
                holder.renewals += 1
                yield None
    finally:
        ended.cancel()
        if read is not None:
            # Pending when the stream ended or this handler was cancelled (the client's
            # call went away): cancelled and awaited, never left to finish on its own
            # (asyncio would log its StopAsyncIteration as never retrieved).
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read


def traced(spec: GroupSpec, context: Any) -> GroupSpec:
    """The spec with the caller's traceparent (gRPC metadata ``traceparent``, checked; a
    malformed one is logged and dropped), which wins over one inside the spec."""
    tp = trace.from_metadata(context.invocation_metadata(), "a Spawn call")
    return dataclasses.replace(spec, traceparent=tp) if tp else spec


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

