"""Spawns that outlive the coordinator that sent them.

Before a spawn goes to an agent, its intent (group id, agent, session, idempotency key)
is made durable. Whoever leads next (a standby after a failover, this coordinator after
a restart) adopts the intents it finds: each becomes a spawn in flight (a session stop
waits for it and stops it too), and the agent is asked about the group: if it has it,
the group is tracked with the intent's key, so the client's retry with that key gets
this group and no second one; if it does not, the spawn never arrived, and with this
leader's epoch now the newest the agent has seen, a late copy from the old leader would
be refused (fencing): the intent is dropped. An agent that does not answer is asked
again, with backoff, until it does or leaves.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tether.coordinator.model import InFlight, TrackedGroup
from tether.coordinator.store import SpawnIntent
from tether.core.errors import NotFound, TetherError
from tether.core.model import EventKind

if TYPE_CHECKING:
    from tether.coordinator.core import Coordinator

log = logging.getLogger(__name__)


def record(c: Coordinator, flight: InFlight, session_id: str, fingerprint: str) -> SpawnIntent:
    """Put the intent of a spawn about to be sent (the caller waits for ``durable()``)."""
    intent = SpawnIntent(flight.group_id, flight.agent, session_id, flight.key, fingerprint,
                         flight.stop_order, time.time())
    c.persist.put(("spawn", intent.group_id), intent)
    return intent


def forget(c: Coordinator, group_id: str) -> None:
    c.persist.put(("spawn", group_id), None)


def adopt_spawns(c: Coordinator, intents: Iterable[SpawnIntent]) -> None:
    """Take over spawns a previous leader sent and never saw answered."""
    for intent in intents:
        flight = InFlight(intent.group_id, intent.agent, intent.stop_order, intent.idempotency_key)
        c.inflight.setdefault(intent.session_id, {})[intent.group_id] = flight
        log.info("spawn of group %s on agent %r (session %r) was in flight when the previous "
                 "leader went away; asking the agent", intent.group_id, intent.agent,
                 intent.session_id)
        c.tasks.spawn(reconcile(c, intent, flight), f"spawn-{intent.group_id}")


def follow_up(c: Coordinator, intent: SpawnIntent) -> None:
    """A spawn whose call failed without an answer (it may have started): find out."""
    flight = InFlight(intent.group_id, intent.agent, intent.stop_order, intent.idempotency_key)
    c.inflight.setdefault(intent.session_id, {})[intent.group_id] = flight
    c.tasks.spawn(reconcile(c, intent, flight), f"spawn-{intent.group_id}")


def pending_by_key(c: Coordinator, key: str) -> InFlight | None:
    """A spawn in flight with idempotency key ``key`` (to whichever agent: keys are global)."""
    for flights in c.inflight.values():
        for f in flights.values():
            if f.key == key:
                return f
    return None


async def reconcile(c: Coordinator, intent: SpawnIntent, flight: InFlight) -> None:
    backoff = 0.1
    try:
        while (intent.agent, intent.group_id) not in c.groups:
            link = c.agents.links.get(intent.agent)
            if link is None:
                log.warning("spawn of group %s: agent %r is not registered; nothing to track",
                            intent.group_id, intent.agent)
                return
            try:
                view = await c.agents.client(link).get(intent.group_id, timeout=5)
            except NotFound:
                log.info("spawn of group %s never reached agent %r; dropped", intent.group_id,
                         intent.agent)
                return
            except TetherError as exc:
                log.debug("spawn of group %s: agent %r: %s", intent.group_id, intent.agent, exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, c.config.retry_backoff_max)
                continue
            if (intent.agent, intent.group_id) not in c.groups:
                tracked = c.track(TrackedGroup(intent.agent, view))
                c.save_group(tracked)
                c.publish(tracked, EventKind.STATE)
        tracked = c.groups[(intent.agent, intent.group_id)]
        c.bind_key(tracked, intent.idempotency_key, intent.fingerprint)
        c.save_group(tracked)
        log.info("spawn of group %s on agent %r: tracked (%s)", intent.group_id, intent.agent,
                 tracked.view.state.value)
    finally:
        forget(c, intent.group_id)
        flights = c.inflight.get(intent.session_id, {})
        if flights.get(intent.group_id) is flight:
            del flights[intent.group_id]
        flight.done.set()
