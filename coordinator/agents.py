"""Agents as the coordinator knows them: registration, heartbeats, and following each one.

Each registered agent has a link: its ``AgentInfo``, a client (dialed on first use;
in-process under ``tether serve``) and a task following its ``Watch`` stream, so
natural exits reach sessions as they happen. The stream resumes from the last
event seen (the agent keeps recent events); after an agent restart (a new epoch)
the coordinator reconciles: groups the agent no longer knows are ``lost``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tether.coordinator.agent_client import AgentClient
from tether.core.errors import (
    AgentNotFound,
    Conflict,
    InvalidSpec,
    NotFound,
    PermissionDenied,
    TetherError,
)
from tether.core.model import PortOwner
from tether.core.sessions import AgentInfo, AgentState, Orphan, OrphanReport

if TYPE_CHECKING:
    from tether.coordinator.core import Coordinator

log = logging.getLogger(__name__)

WATCH_RETRY_FIRST = 0.1


@dataclass(eq=False)
class AgentLink:
    info: AgentInfo
    client: AgentClient | None = None
    #: The agent lives in this process (`tether serve`): it is up while we are.
    always_up: bool = False
    watch_task: asyncio.Task[None] | None = None
    last_seq: int = 0
    last_epoch: str = ""

    @property
    def name(self) -> str:
        return self.info.name


class Agents:
    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self.links: dict[str, AgentLink] = {}

    def load(self, agents: Iterable[AgentInfo]) -> None:
        for info in agents:
            self.links[info.name] = AgentLink(info)

    def start(self) -> None:
        for link in self.links.values():
            self._start_watch(link)

    async def close(self) -> None:
        for link in self.links.values():
            if link.watch_task is not None:
                link.watch_task.cancel()
            if link.client is not None:
                await link.client.close()
                link.client = None

    # ------------------------------------------------------------ queries

    def up(self, link: AgentLink) -> bool:
        return link.always_up or time.time() - link.info.last_seen <= self.c.config.agent_ttl

    def states(self) -> list[AgentState]:
        return [AgentState(link.info, self.up(link))
                for link in sorted(self.links.values(), key=lambda x: x.name)]

    def resolve(self, name: str) -> AgentLink:
        """The agent a request names, or the default one (the local agent of `tether
        serve`, or the only agent)."""
        if name:
            link = self.links.get(name)
            if link is None:
                raise AgentNotFound(name, list(self.links))
            return link
        local = self.c.config.local_agent
        if local and local in self.links:
            return self.links[local]
        if len(self.links) == 1:
            return next(iter(self.links.values()))
        if not self.links:
            raise AgentNotFound("", [])
        raise InvalidSpec(f"{len(self.links)} agents are registered "
                          f"({', '.join(sorted(self.links))}); name one with --agent",
                          field="agent")

    def client(self, link: AgentLink) -> AgentClient:
        if link.client is None:
            link.client = self.c.config.connect(link.info)
        return link.client

    # ------------------------------------------------------------ registration

    def register(self, info: AgentInfo, *, client: AgentClient | None = None,
                 always_up: bool = False) -> bool:
        """Register (or re-register) an agent. ``client``/``always_up``: the agent lives in
        this process. Returns True when the agent restarted (a new epoch).

        A name is bound to the credential that registered it (``info.credential``): while
        its agent is up, another credential cannot take it (``PermissionDenied``); the same
        credential can (a restarted agent, a new address). An agent silent past the TTL
        may be taken over by another credential allowed that name (a rotated token)."""
        info = info.seen()
        old = self.links.get(info.name)
        if old is not None and old.info.credential \
                and old.info.credential != info.credential:
            if self.up(old):
                raise PermissionDenied(
                    f"agent name {info.name!r} belongs to another credential "
                    f"({old.info.credential}, at {old.info.address}) and that agent is up; "
                    f"a restarted agent registers with its own credential. If the name moved "
                    f"to a new credential, stop the old agent: its name is free once it has "
                    f"been silent for {self.c.config.agent_ttl:g} s")
            log.warning("agent %r: taken over by credential %s from %s, silent for %.0f s",
                        info.name, info.credential, old.info.credential,
                        time.time() - old.info.last_seen)
        if old is not None and old.info.instance and info.instance and not always_up \
                and old.info.instance != info.instance and (old.always_up or self.up(old)):
            # Two live agents with one name (cloned hosts, two state directories): taking
            # turns would make each registration look like a restart of the other, and the
            # other's live groups would be recorded lost.
            raise Conflict(
                f"agent name {info.name!r} is held by another live agent (instance "
                f"{old.info.instance} at {old.info.address}); give this agent another --name, "
                f"or stop the other: its name is free once it has been silent for "
                f"{self.c.config.agent_ttl:g} s")
        restarted = old is not None and old.info.epoch != info.epoch
        if old is not None and old.info.address == info.address and client is None \
                and not old.always_up:
            old.info = info
            link = old
        else:
            if old is not None:
                self._drop(old)
            link = AgentLink(info, client=client, always_up=always_up)
            self.links[info.name] = link
        self.c.persist.put(("agent", info.name), info)
        log.info("agent %r registered at %s%s", info.name, info.address,
                 " (restarted: reconciling its groups)" if restarted else "")
        if restarted:
            link.last_seq, link.last_epoch = 0, ""
        self._start_watch(link)
        if restarted:
            self.c.tasks.spawn(self._reconcile(link), f"reconcile-{info.name}")
        return restarted

    def forget(self, name: str, force: bool = False) -> list[str]:
        """Give up an agent gone for good: its live groups are recorded lost (stops waiting
        on it finish), its registration is dropped. Returns the groups recorded lost."""
        link = self.links.get(name)
        if link is None:
            raise AgentNotFound(name, list(self.links))
        if link.always_up:
            raise Conflict(f"agent {name!r} runs inside this coordinator (tether serve); it "
                           "cannot be forgotten")
        if self.up(link) and not force:
            raise Conflict(f"agent {name!r} is up (seen {time.time() - link.info.last_seen:.0f} "
                           "s ago); stop it first, or force it")
        del self.links[name]
        self._drop(link)
        self.c.persist.put(("agent", name), None)
        lost = []
        for t in [t for t in self.c.groups.values() if t.agent == name and not t.ended]:
            self.c.mark_lost(t, f"agent {name!r} was forgotten by an operator (gone for good); "
                                "what ran there was not verified")
            lost.append(t.group_id)
        log.warning("agent %r forgotten; %d group(s) recorded lost", name, len(lost))
        return lost

    def _drop(self, link: AgentLink) -> None:
        if link.watch_task is not None:
            link.watch_task.cancel()
        if link.client is not None:
            self.c.tasks.spawn(link.client.close(), f"close-{link.name}")
            link.client = None

    def heartbeat(self, name: str, epoch: str, credential: str) -> bool:
        """An agent says it is alive. Only the credential its name is bound to can say so
        (an epoch is no secret: ``ListAgents`` shows it). False: register again."""
        link = self.links.get(name)
        if link is not None and link.info.credential and link.info.credential != credential:
            raise PermissionDenied(
                f"heartbeat for agent {name!r}: its name belongs to another credential "
                f"({link.info.credential}); only that agent's own credential keeps it up")
        if link is None or link.info.epoch != epoch:
            return False
        link.info = link.info.seen()
        self.c.persist.put(("agent", name), link.info)
        return True

    # ------------------------------------------------------------ following an agent

    def _start_watch(self, link: AgentLink) -> None:
        if link.watch_task is None or link.watch_task.done():
            link.watch_task = self.c.tasks.spawn(self._watch(link), f"watch-{link.name}")

    async def _watch(self, link: AgentLink) -> None:
        """Follow an agent's Watch stream; reconnect with backoff, resuming where it broke."""
        backoff = WATCH_RETRY_FIRST
        while True:
            try:
                async for epoch, event in self.client(link).watch(link.last_seq,
                                                                  link.last_epoch):
                    backoff = WATCH_RETRY_FIRST
                    link.last_seq, link.last_epoch = event.seq, epoch
                    self.c.absorb(link.name, event.group, event.kind)
            except TetherError as exc:
                log.debug("watch of agent %r: %s", link.name, exc)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.c.config.retry_backoff_max)

    async def _reconcile(self, link: AgentLink) -> None:
        """An agent restarted: groups it no longer knows are lost, with what we know."""
        mine = [t for t in self.c.groups.values() if t.agent == link.name and not t.ended]
        for tracked in mine:
            try:
                view = await self.client(link).get(tracked.group_id, timeout=5)
            except NotFound:
                self.c.mark_lost(tracked, f"agent {link.name!r} restarted without this group")
            except TetherError:
                continue
            else:
                self.c.absorb(link.name, view)

    # ------------------------------------------------------------ orphans

    async def list_orphans(self, sweep: bool) -> OrphanReport:
        found: list[Orphan] = []
        unreachable: dict[str, str] = {}

        async def one(link: AgentLink) -> None:
            try:
                found.extend(await self.client(link).list_orphans(sweep, timeout=10))
            except TetherError as exc:
                unreachable[link.name] = str(exc)

        await asyncio.gather(*(one(link) for link in self.links.values()))
        return OrphanReport(tuple(found), unreachable)

    # ------------------------------------------------------------ ports

    async def list_ports(self, port: int, agent: str = "") -> tuple[list[PortOwner],
                                                                     dict[str, str]]:
        """Listening TCP ports (or one) and their owners on every agent, or on one."""
        links = ([self.resolve(agent)] if agent
                 else list(self.links.values()))
        found: list[PortOwner] = []
        unreachable: dict[str, str] = {}

        async def one(link: AgentLink) -> None:
            try:
                found.extend(await self.client(link).list_ports(port, timeout=10))
            except TetherError as exc:
                unreachable[link.name] = str(exc)

        await asyncio.gather(*(one(link) for link in links))
        return sorted(found, key=lambda o: (o.agent, o.port, o.address)), unreachable
