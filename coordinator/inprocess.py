"""The agent of `tether serve`, reached without a network round trip.

`tether serve` runs the coordinator and its agent in one process and one event
loop. Dialing that agent over loopback gRPC cost, per call, two protobuf
encodings and decodings, two trips through gRPC's C core and the thread hand-offs
between them: most of the CPU of a spawn and of a 100-group stop. This client
calls the authority directly and keeps the contract the coordinator relies on: a
deadline is ``AgentUnreachable`` (as over the network), errors are the domain's,
and what it hands over is immutable (frozen views), so neither side can change the
other's copy.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from tether.agent.authority import Authority
from tether.coordinator.agent_client import AgentClient
from tether.core.errors import AgentUnreachable, TetherError
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

log = logging.getLogger(__name__)

T = TypeVar("T")


class InProcessAgent(AgentClient):
    def __init__(self, authority: Authority, address: str, epoch: str,
                 orphans: Callable[[bool], Awaitable[list[Orphan]]] | None = None) -> None:
        self._authority = authority
        self._address = address
        self._epoch = epoch
        self._orphans = orphans

    async def _call(self, what: str, work: Awaitable[T], timeout: float) -> T:
        try:
            async with asyncio.timeout(timeout):
                return await work
        except TimeoutError:
            raise AgentUnreachable(self._authority.name, self._address,
                                   f"{what}: deadline of {timeout:g} s exceeded") from None
        except TetherError:
            raise
        except Exception as exc:  # what a gRPC server would answer with UNKNOWN
            log.exception("in-process %s failed", what)
            raise TetherError(f"agent {self._authority.name!r}: {what}: {exc}") from exc

    async def spawn(self, spec: GroupSpec, *, key: str, group_id: str,
                    timeout: float) -> GroupView:
        return await self._call("Spawn", self._authority.spawn(spec, key, group_id), timeout)

    async def adopt(self, pid: int, start_time: float | None, spec: GroupSpec, *,
                    timeout: float) -> GroupView:
        return await self._call("Adopt", self._authority.adopt(pid, start_time, spec), timeout)

    async def signal(self, group_id: str, sig: signal.Signals, *,
                     timeout: float) -> SignalOutcome:
        return await self._call("Signal", self._authority.signal(group_id, sig), timeout)

    async def stop_groups(self, group_ids: Sequence[str], override: StopOverride | None, *,
                          timeout: float) -> tuple[list[GroupView], dict[str, str]]:
        stops = [(gid, override) for gid in group_ids]
        return await self._call("StopGroups", self._authority.stop_groups(stops), timeout)

    async def get(self, group_id: str, *, timeout: float) -> GroupView:
        return self._authority.get(group_id)

    async def restart(self, group_id: str, override: StopOverride | None, *,
                      timeout: float) -> GroupView:
        return await self._call("Restart", self._authority.restart(group_id, override),
                                timeout)

    async def forget(self, group_ids: Sequence[str], *,
                     timeout: float) -> tuple[list[str], dict[str, str]]:
        return self._authority.forget(group_ids)

    async def watch(self, since: int, epoch: str) -> AsyncIterator[tuple[str, GroupEvent]]:
        initial = self._authority.views()
        async for event in self._authority.watch(
                lambda e: True, initial, since if epoch == self._epoch else 0):
            yield self._epoch, event

    async def list_orphans(self, sweep: bool, *, timeout: float) -> list[Orphan]:
        if self._orphans is None:
            return []
        found = await self._call("ListOrphans", self._orphans(sweep), timeout)
        return [o if o.agent else _with_agent(o, self._authority.name) for o in found]

    async def list_ports(self, port: int, *, timeout: float) -> list[PortOwner]:
        from dataclasses import replace

        found = await self._call("ListPorts", self._authority.list_ports(port), timeout)
        return [replace(o, agent=self._authority.name) for o in found]

    async def logs(self, query: LogQuery) -> AsyncIterator[OutputChunk]:
        chunks = self._authority.logs(query)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def attach(self, opened: AttachOpen, inputs: AsyncIterator[StdinInput]
                     ) -> AsyncIterator[OutputChunk]:
        from tether.agent.capture import attach_stream

        chunks = attach_stream(self._authority.attach(opened), inputs)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        return None


def _with_agent(o: Orphan, agent: str) -> Orphan:
    from dataclasses import replace

    return replace(o, agent=agent)
