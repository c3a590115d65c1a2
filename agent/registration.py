"""An agent registers with its coordinator and heartbeats; with several coordinators
(``--coordinator a:7400,b:7400``), with whichever leads.

A standby answers ``UNAVAILABLE`` with the leader's address (``tether-leader``): the
agent goes there at once. A coordinator that does not answer: the agent tries the next
address, and after a full round waits (backoff up to ``BACKOFF_MAX``). A new leader
knows the agents already (they are in the store) and dials them itself; the heartbeats
only keep them shown as up.
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from tether.rpc.leader import addresses, redirect_of
from tether.rpc.security import ClientSecurity
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
#: With several coordinators a failover is expected: look again sooner.
BACKOFF_MAX_SEVERAL = 1.0


class Registration:
    def __init__(self, coordinators: str, dial: ClientSecurity,
                 request: cpb.RegisterAgentRequest) -> None:
        self.addresses = addresses(coordinators)
        self.dial = dial.loaded()  # read the token once, checked as a daemon's
        self.request = request
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.current = self.addresses[0] if self.addresses else ""
        self._round: set[str] = set()

    def _stub(self, address: str) -> cgrpc.CoordinatorServiceStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.dial.channel(address)
        return cgrpc.CoordinatorServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def _next(self, exc: grpc.aio.AioRpcError) -> bool:
        """Where to try after a failed call; True when every address was tried since the
        last wait (wait before going on)."""
        self._round.add(self.current)
        answered, leader, _ = redirect_of(exc)
        if answered and leader and leader not in self._round:
            log.info("coordinator %s does not lead; the leader is at %s", self.current, leader)
            self.current = leader
            return False
        known = self.addresses if self.current in self.addresses else \
            [*self.addresses, self.current]
        self.current = known[(known.index(self.current) + 1) % len(known)]
        if self.current in self._round:
            self._round.clear()
            return True
        return False

    async def run(self) -> None:
        backoff = BACKOFF_FIRST
        cap = BACKOFF_MAX_SEVERAL if len(self.addresses) > 1 else BACKOFF_MAX
        name = self.request.name
        while True:
            address = self.current
            stub = self._stub(address)
            try:
                reply = await stub.RegisterAgent(self.request, timeout=5)
                log.info("registered with coordinator %s as %r (%s)", address, name,
                         self.request.address)
                backoff = BACKOFF_FIRST
                self._round.clear()
                while True:
                    await asyncio.sleep(reply.heartbeat_interval_seconds)
                    beat = await stub.Heartbeat(
                        cpb.HeartbeatRequest(name=name, epoch=self.request.epoch), timeout=5)
                    if not beat.known:
                        break
            except grpc.aio.AioRpcError as exc:
                if self._next(exc):
                    log.warning("coordinator %s: %s; retrying in %.1f s", address,
                                exc.details() or exc.code().name, backoff)
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, cap)
                else:
                    log.info("coordinator %s: %s; trying %s", address,
                             exc.details() or exc.code().name, self.current)
