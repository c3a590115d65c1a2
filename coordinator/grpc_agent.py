"""``AgentClient`` over gRPC: the coordinator dialing an agent on another host.

Deadlines on every call, HTTP/2 keepalives (a dead path is found in seconds), TLS and
the coordinator's credential; protobuf converted here and nowhere deeper.

The coordinator's token is a key to every agent, and an agent's address is whatever
its registration said. So the token goes only where the other end is verified as that
agent: under TLS, the agent's certificate must carry the agent's name (the coordinator
dials expecting it, unless ``--tls-server-name`` says all agents share one name); in
plaintext, only to a loopback address (logged). Elsewhere the coordinator dials without
its token, and an agent that requires one refuses with a message saying why.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

import grpc

from tether.coordinator.agent_client import AgentClient
from tether.core.errors import Fenced, TetherError
from tether.core.model import (
    GroupEvent,
    GroupSpec,
    GroupView,
    PortOwner,
    SignalOutcome,
    StopOverride,
)
from tether.core.output import AttachOpen, LogQuery, OutputChunk, StdinInput
from tether.core.sessions import Orphan
from tether.rpc.convert import (
    attach_open_to_pb,
    chunk_from_pb,
    event_from_pb,
    group_from_pb,
    orphan_from_pb,
    override_to_pb,
    port_owner_from_pb,
    query_to_pb,
    spec_to_pb,
    stdin_to_pb,
)
from tether.rpc.daemon import is_loopback
from tether.rpc.leader import EPOCH_HEADER, FENCE_TRAILER, HOLDER_HEADER, trailer
from tether.rpc.security import ClientSecurity
from tether.rpc.status import error_from_rpc
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def toward_agent(dial: ClientSecurity, name: str, address: str) -> tuple[ClientSecurity, str]:
    """How to dial agent ``name`` at ``address`` (a registration's word): with the
    coordinator's token only where the far end is verified as that agent. Returns the
    settings and, when the token is held back, why (for the log and for errors)."""
    # Keepalive pings find a dead path (a partition, a pulled cable) in seconds, so
    # retries reconnect instead of waiting on TCP retransmission timers.
    dial = replace(dial, options=[*dial.options, *CHANNEL_OPTIONS])
    if dial.tls:
        # The handshake fails unless the certificate names the agent: the token (sent
        # after it) never reaches anyone else.
        return replace(dial, server_name=dial.server_name or name), ""
    if not dial.has_token:
        return dial, ""
    if is_loopback(address):
        log.info("agent %r at %s: sending this coordinator's token over plaintext loopback; "
                 "the address is not verified as that agent (with --tls-ca it would be)",
                 name, address)
        return dial, ""
    why = (f"this coordinator sends its token to agent {name!r} only over TLS, verifying the "
           f"agent's certificate, or to a loopback address; {address} is neither, so it "
           "dialed without the token: give the coordinator --tls-ca and the agent a "
           "certificate naming it")
    log.warning("agent %r at %s: not sending this coordinator's token (%s)", name, address,
                "plaintext to a non-loopback address cannot be verified as that agent")
    return dial.without_token(), why


class GrpcAgentClient(AgentClient):
    """``epoch``: the leader's epoch, sent with every call (``tether-epoch``) when
    coordinators share a store, with ``holder`` (its lease holder id); an agent refuses
    calls from an epoch older than the newest it has obeyed, or from another holder of
    the same epoch (``Fenced``)."""

    def __init__(self, name: str, address: str, dial: ClientSecurity,
                 epoch: Callable[[], int] | None = None, holder: str = "") -> None:
        self.name = name
        self._holder = holder
        self.address = address
        self._epoch = epoch
        security, self._held_back = toward_agent(dial, name, address)
        self._tls = security.tls
        self._channel = security.channel(address)
        self._stub = agrpc.AgentServiceStub(self._channel)

    def _md(self) -> tuple[tuple[str, str], ...] | None:
        if self._epoch is None:
            return None
        md = ((EPOCH_HEADER, str(self._epoch())),)
        return (*md, (HOLDER_HEADER, self._holder)) if self._holder else md

    def _error(self, exc: grpc.aio.AioRpcError) -> TetherError:
        details = exc.details() or exc.code().name
        newest = trailer(exc.trailing_metadata(), FENCE_TRAILER) \
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION else None
        if newest is not None and newest.isdigit() and self._epoch is not None:
            return Fenced(self.name, self._epoch(), int(newest))
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) \
                and self._held_back:
            details = f"{details}; {self._held_back}"
        elif self._tls and exc.code() == grpc.StatusCode.UNAVAILABLE and any(
                hint in details.lower() for hint in ("peer name", "handshake",
                                                      "hostname verification")):
            details = (f"{details}; the coordinator verifies that agent {self.name!r}'s "
                       f"certificate names {self.name!r} (a DNS subject alternative name): "
                       "issue it so, or give --tls-server-name if all agents share one name")
        return error_from_rpc(exc.code(), details, agent=(self.name, self.address))

    async def spawn(self, spec: GroupSpec, *, key: str, group_id: str,
                    timeout: float) -> GroupView:
        req = apb.SpawnRequest(spec=spec_to_pb(spec), idempotency_key=key, group_id=group_id)
        try:
            reply = await self._stub.Spawn(req, timeout=timeout, metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return group_from_pb(reply.group)

    async def adopt(self, pid: int, start_time: float | None, spec: GroupSpec, *,
                    timeout: float) -> GroupView:
        req = apb.AdoptRequest(pid=pid, spec=spec_to_pb(spec))
        if start_time is not None:
            req.start_time = start_time
        try:
            reply = await self._stub.Adopt(req, timeout=timeout, metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return group_from_pb(reply.group)

    async def signal(self, group_id: str, sig: signal.Signals, *,
                     timeout: float) -> SignalOutcome:
        try:
            reply = await self._stub.Signal(apb.SignalRequest(group_id=group_id,
                                                              signal=sig.name), timeout=timeout,
                                            metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return SignalOutcome(reply.members_signalled, reply.already_gone,
                             group_from_pb(reply.group))

    async def stop_groups(self, group_ids: Sequence[str], override: StopOverride | None, *,
                          timeout: float) -> tuple[list[GroupView], dict[str, str]]:
        req = apb.StopGroupsRequest(group_ids=list(group_ids))
        if override is not None:
            req.policy.CopyFrom(override_to_pb(override))
        try:
            reply = await self._stub.StopGroups(req, timeout=timeout, metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return [group_from_pb(g) for g in reply.groups], dict(reply.errors)

    async def get(self, group_id: str, *, timeout: float) -> GroupView:
        try:
            reply = await self._stub.Get(apb.GetRequest(group_id=group_id), timeout=timeout,
                                         metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return group_from_pb(reply.group)

    async def restart(self, group_id: str, override: StopOverride | None, *,
                      timeout: float) -> GroupView:
        req = apb.RestartRequest(group_id=group_id)
        if override is not None:
            req.policy.CopyFrom(override_to_pb(override))
        try:
            reply = await self._stub.Restart(req, timeout=timeout, metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return group_from_pb(reply.group)

    async def forget(self, group_ids: Sequence[str], *,
                     timeout: float) -> tuple[list[str], dict[str, str]]:
        try:
            reply = await self._stub.Forget(apb.ForgetRequest(group_ids=list(group_ids)),
                                            timeout=timeout, metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return list(reply.forgotten), dict(reply.errors)

    async def watch(self, since: int, epoch: str) -> AsyncIterator[tuple[str, GroupEvent]]:
        stream = self._stub.Watch(apb.WatchRequest(initial=True, since_seq=since, epoch=epoch),
                                  metadata=self._md())
        try:
            async for msg in stream:
                yield msg.epoch, event_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        finally:
            stream.cancel()

    async def list_orphans(self, sweep: bool, *, timeout: float) -> list[Orphan]:
        try:
            reply = await self._stub.ListOrphans(apb.ListOrphansRequest(sweep=sweep),
                                                 timeout=timeout, metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        found = [orphan_from_pb(o) for o in reply.orphans]
        return [o if o.agent else Orphan(o.pid, o.command, o.former_group, o.age, o.found_by,
                                         o.reaped, agent=self.name) for o in found]

    async def list_ports(self, port: int, *, timeout: float) -> list[PortOwner]:
        try:
            reply = await self._stub.ListPorts(apb.ListPortsRequest(port=port), timeout=timeout,
                                               metadata=self._md())
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return [replace(port_owner_from_pb(o), agent=self.name) for o in reply.ports]

    async def logs(self, query: LogQuery) -> AsyncIterator[OutputChunk]:
        stream = self._stub.Logs(query_to_pb(query), metadata=self._md())
        try:
            async for msg in stream:
                yield chunk_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        finally:
            stream.cancel()

    async def attach(self, opened: AttachOpen, inputs: AsyncIterator[StdinInput]
                     ) -> AsyncIterator[OutputChunk]:
        async def requests() -> AsyncIterator[Any]:
            yield attach_open_to_pb(opened)
            async for item in inputs:
                yield stdin_to_pb(item)

        stream = self._stub.Attach(requests(), metadata=self._md())
        try:
            async for msg in stream:
                yield chunk_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        finally:
            stream.cancel()

    async def close(self) -> None:
        await self._channel.close()

