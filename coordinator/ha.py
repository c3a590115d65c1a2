"""A coordinator among several on one PostgreSQL store: lead, or stand by.

The campaign (``leader.py``) takes the lease whenever it is free. On election the
coordinator loads the whole state from the store (after taking the lease, so it sees
every batch the previous leader committed), resumes what that leader started (stop
intents, spawns in flight, lease timers: leases get a fresh TTL, a failover never
expires one) and serves. On losing the lease it stops at once: its write-behind gives
up (waiters get ``NotLeader``), its tasks are cancelled, its streams end with the new
leader's address. A standby answers reads from the store and redirects the rest
(``gate.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry, Gauge

from tether.coordinator.core import STATE_DEADLINE, Coordinator
from tether.coordinator.gate import Read
from tether.coordinator.leader import Campaign, Leadership
from tether.coordinator.standby import StandbyReads
from tether.coordinator.store import Store
from tether.core.errors import NotLeader
from tether.v1 import coordinator_pb2 as cpb

log = logging.getLogger(__name__)

SERVICE = "tether.v1.CoordinatorService"
#: How long a call waits for a just-elected leader to load the state.
TAKEOVER_WAIT = 10.0


class Controller:
    """Leads or stands by; what the gate asks about (``gate.Control``)."""

    def __init__(self, store: Store, address: str, ttl: float, agent_ttl: float,
                 build: Callable[[Leadership], Coordinator],
                 on_coordinator: Callable[[Coordinator | None], None],
                 registry: CollectorRegistry) -> None:
        self.store = store
        self.address = address
        self._build = build
        self._on_coordinator = on_coordinator
        self.campaign = Campaign(store, address, ttl, self._elected, self._deposed,
                                 sick=self._cannot_write)
        #: A leader whose writes have failed this long steps down (a standby may write).
        self.write_patience = max(STATE_DEADLINE, 3 * ttl)
        standby = StandbyReads(store, agent_ttl)
        self.reads: Mapping[str, Read] = {"GetSession": standby.GetSession,
                                          "ListSessions": standby.ListSessions,
                                          "ListAgents": standby.ListAgents}
        self.coordinator: Coordinator | None = None
        self.lead: Leadership | None = None
        self.health: health.aio.HealthServicer | None = None
        self._takeover: asyncio.Task[None] | None = None
        Gauge("tether_coordinator_leading", "1 while this coordinator leads (serves), 0 while "
              "it stands by.", registry=registry).set_function(
            lambda: 1 if self.lead is not None and self.lead.valid() else 0)
        Gauge("tether_coordinator_epoch", "The leader's epoch as this coordinator knows it.",
              registry=registry).set_function(self._epoch)

    def _epoch(self) -> int:
        if self.lead is not None:
            return self.lead.epoch
        known = self.campaign.known
        return known.epoch if known is not None else 0

    def _cannot_write(self) -> str:
        coordinator = self.coordinator
        since = coordinator.persist.failing_since if coordinator is not None else None
        if since is None:
            return ""
        if coordinator is not None and getattr(coordinator.persist.last_exception,
                                                "permanent", False):
            return f"cannot write the store: {coordinator.persist.last_error}"
        if time.monotonic() - since < self.write_patience:
            return ""
        return (f"cannot write the store for {time.monotonic() - since:.0f} s "
                f"({coordinator.persist.last_error if coordinator else ''})")

    # ------------------------------------------------------------ gate.Control

    async def serving(self) -> Leadership | None:
        lead = self.campaign.leader
        if lead is None or not lead.valid():
            return None
        if self.lead is not lead and self._takeover is not None:
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(TAKEOVER_WAIT):
                    await asyncio.shield(self._takeover)
        return lead if self.still(lead) else None

    def still(self, lead: Leadership) -> bool:
        return self.lead is lead and lead.valid()

    def leader_address(self) -> str:
        return self.campaign.leader_address

    def describe(self) -> str:
        return f"coordinator {self.address} (a standby)"

    def leader_info(self) -> cpb.LeaderInfo:
        known = self.campaign.known
        leading = self.lead is not None and self.still(self.lead)
        return cpb.LeaderInfo(
            leader=self.leader_address(), epoch=self._epoch(), address=self.address,
            leading=leading, lease_remaining_seconds=known.remaining if known else 0.0,
            store=self.store.where,
            problem="" if self.leader_address() else
            (self.campaign.last_error or "no coordinator leads right now"))

    # ------------------------------------------------------------ the campaign's calls

    async def _elected(self, lead: Leadership) -> None:
        # Load in the background: the campaign goes on renewing meanwhile.
        self._takeover = asyncio.get_running_loop().create_task(self._take_over(lead),
                                                                name="take-over")

    async def _take_over(self, lead: Leadership) -> None:
        coordinator = self._build(lead)
        try:
            await coordinator.load()
        except Exception as exc:
            log.error("taking over as leader (epoch %d): cannot load the state: %s",
                      lead.epoch, exc)
            self.campaign.lose(lead, f"cannot load the state: {exc}", release=True)
            self.campaign.hold_off(2 * self.campaign.ttl)  # let another one try
            return
        if not lead.valid():
            return
        coordinator.start()
        self.coordinator, self.lead = coordinator, lead
        self._on_coordinator(coordinator)
        await self._set_health(True)
        log.info("serving as leader (epoch %d)", lead.epoch)

    async def _deposed(self, lead: Leadership, why: str) -> None:
        task = self._takeover
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.lead is not lead:
            return
        coordinator = self.coordinator
        self.lead = self.coordinator = None
        self._on_coordinator(None)
        await self._set_health(False)
        if coordinator is not None:
            coordinator.persist.abandon(NotLeader(f"this coordinator stopped leading: {why}",
                                                  self.leader_address()))
            await coordinator.close()

    async def _set_health(self, leading: bool) -> None:
        if self.health is not None:
            await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING if leading
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def run(self, health_servicer: Any) -> None:
        self.health = health_servicer
        await self._set_health(False)
        await self.campaign.run()

    async def resign(self) -> None:
        await self.campaign.resign()
