"""``AgentClient`` over gRPC: the coordinator dialing an agent on another host.

Deadlines on every call, HTTP/2 keepalives (a dead path is found in seconds), TLS and
the coordinator's credential; protobuf converted here and nowhere deeper.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Sequence

import grpc

from tether.coordinator.agent_client import AgentClient
from tether.core.errors import TetherError
from tether.core.model import GroupEvent, GroupSpec, GroupView, SignalOutcome, StopOverride
from tether.core.sessions import Orphan
from tether.rpc.convert import (
    event_from_pb,
    group_from_pb,
    orphan_from_pb,
    override_to_pb,
    spec_to_pb,
)
from tether.rpc.security import ClientSecurity
from tether.rpc.status import error_from_rpc
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class GrpcAgentClient(AgentClient):
    def __init__(self, name: str, address: str, dial: ClientSecurity) -> None:
        self.name = name
        self.address = address
        # Keepalive pings find a dead path (a partition, a pulled cable) in seconds, so
        # retries reconnect instead of waiting on TCP retransmission timers.
        security = ClientSecurity(dial.ca, dial.cert, dial.key, dial.token_file,
                                  dial.server_name, CHANNEL_OPTIONS, dial.token)
        self._channel = security.channel(address)
        self._stub = agrpc.AgentServiceStub(self._channel)

    def _error(self, exc: grpc.aio.AioRpcError) -> TetherError:
        return error_from_rpc(exc.code(), exc.details() or exc.code().name,
                              agent=(self.name, self.address))

    async def spawn(self, spec: GroupSpec, *, key: str, group_id: str,
                    timeout: float) -> GroupView:
        req = apb.SpawnRequest(spec=spec_to_pb(spec), idempotency_key=key, group_id=group_id)
        try:
            reply = await self._stub.Spawn(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return group_from_pb(reply.group)

    async def adopt(self, pid: int, start_time: float | None, spec: GroupSpec, *,
                    timeout: float) -> GroupView:
        req = apb.AdoptRequest(pid=pid, spec=spec_to_pb(spec))
        if start_time is not None:
            req.start_time = start_time
        try:
            reply = await self._stub.Adopt(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return group_from_pb(reply.group)

    async def signal(self, group_id: str, sig: signal.Signals, *,
                     timeout: float) -> SignalOutcome:
        try:
            reply = await self._stub.Signal(apb.SignalRequest(group_id=group_id,
                                                              signal=sig.name), timeout=timeout)
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
            reply = await self._stub.StopGroups(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return [group_from_pb(g) for g in reply.groups], dict(reply.errors)

    async def get(self, group_id: str, *, timeout: float) -> GroupView:
        try:
            reply = await self._stub.Get(apb.GetRequest(group_id=group_id), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return group_from_pb(reply.group)

    async def restart(self, group_id: str, override: StopOverride | None, *,
                      timeout: float) -> GroupView:
        req = apb.RestartRequest(group_id=group_id)
        if override is not None:
            req.policy.CopyFrom(override_to_pb(override))
        try:
            reply = await self._stub.Restart(req, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return group_from_pb(reply.group)

    async def forget(self, group_ids: Sequence[str], *,
                     timeout: float) -> tuple[list[str], dict[str, str]]:
        try:
            reply = await self._stub.Forget(apb.ForgetRequest(group_ids=list(group_ids)),
                                            timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return list(reply.forgotten), dict(reply.errors)

    async def watch(self, since: int, epoch: str) -> AsyncIterator[tuple[str, GroupEvent]]:
        stream = self._stub.Watch(apb.WatchRequest(initial=True, since_seq=since, epoch=epoch))
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
                                                 timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        found = [orphan_from_pb(o) for o in reply.orphans]
        return [o if o.agent else Orphan(o.pid, o.command, o.former_group, o.age, o.found_by,
                                         o.reaped, agent=self.name) for o in found]

    async def close(self) -> None:
        await self._channel.close()

