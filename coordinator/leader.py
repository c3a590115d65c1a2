"""Leadership among coordinators that share a store: campaign, lead, renew, step down.

The lease is a row in the store (``Store.acquire``/``renew``), compared with the
store's clock only. A standby tries to take it whenever it expires; the leader renews
it every ``ttl / 3`` and counts itself leader only until ``HOLD * ttl`` after the start
of its last successful renewal, by its own monotonic clock: the store's expiry comes
later than that whatever the hosts' clocks say, so a leader that cannot renew (store
down, process paused, network cut) stops leading before anyone else can start.

While it leads, a coordinator's commands carry its epoch (``LeaderAgentClient``):
an agent that has seen a newer epoch refuses them, and the leader then asks the store
whether it still leads. If it does, the agent's epoch comes from the store's past (a
restored or re-created database): the leader moves its epoch above it and goes on.
If it does not, it steps down. Its writes are fenced by the store as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

from tether.coordinator.agent_client import AgentClient
from tether.coordinator.store import Lease, Store, Term
from tether.core.errors import AgentUnreachable, Fenced, NotLeader, StoreUnavailable
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

if TYPE_CHECKING:
    from tether.coordinator.sqlite_store import SQLiteStore

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A leader counts itself leader for this share of the TTL after a renewal began.
HOLD = 0.75
#: An agent's epoch this far above ours is not believed (a broken or hostile agent).
MAX_EPOCH_JUMP = 2**32


def new_holder() -> str:
    """This process's name in the lease: host, pid and a random part (never reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Electorate(Protocol):
    """What a term needs of whoever granted it (``Campaign``, or ``Sole``)."""

    store: Store
    ttl: float

    @property
    def leader_address(self) -> str: ...

    def lose(self, lead: Leadership, why: str, release: bool = False) -> None: ...


class Leadership:
    """One term of this coordinator's leadership, valid until its local deadline."""

    def __init__(self, campaign: Electorate, term: Term, started: float) -> None:
        self.campaign = campaign
        self.term = term
        self.renewed = started
        self.deadline = started + HOLD * campaign.ttl
        self.lost = False
        self._contest = asyncio.Lock()

    def __repr__(self) -> str:
        left = self.deadline - time.monotonic()
        return f"<Leadership epoch={self.term.epoch} {'lost' if self.lost else f'{left:.2f}s'}>"

    @property
    def epoch(self) -> int:
        return self.term.epoch

    def valid(self) -> bool:
        return not self.lost and time.monotonic() < self.deadline

    def check(self) -> None:
        if not self.valid():
            raise NotLeader(f"this coordinator's lease (epoch {self.term.epoch}) has lapsed",
                            self.campaign.leader_address)

    async def contest(self, agent: str, newest: int) -> None:
        """Agent ``agent`` obeys epoch ``newest`` >= ours. Move above it if the store still
        names us; else step down. Raises ``NotLeader`` when we do not lead."""
        async with self._contest:
            if newest < self.term.epoch:
                return  # moved above it meanwhile
            self.check()
            if newest - self.term.epoch > MAX_EPOCH_JUMP:
                raise AgentUnreachable(agent, "", f"it claims to obey coordinator epoch {newest}"
                                       f", implausibly far above this leader's "
                                       f"{self.term.epoch}; check that agent")
            try:
                moved = await self.campaign.store.raise_epoch(self.term, newest)
            except StoreUnavailable as exc:
                raise NotLeader(f"agent {agent!r} obeys a newer coordinator epoch ({newest}) "
                                f"and the store cannot confirm this leader ({exc})") from exc
            if moved is None:
                self.campaign.lose(self, f"agent {agent!r} obeys coordinator epoch {newest} "
                                   "and the store names another leader")
                raise NotLeader("another coordinator leads now", self.campaign.leader_address)
            log.warning("agent %r obeys coordinator epoch %d, above the store's %d (was the "
                        "database restored or re-created?); this leader moves to epoch %d",
                        agent, newest, self.term.epoch, moved)
            self.term.epoch = moved


class Campaign:
    """Runs for leadership forever: ``elected`` when this coordinator takes the lease,
    ``deposed`` when it stops leading (lost, lapsed, or shutting down)."""

    def __init__(self, store: Store, address: str, ttl: float,
                 elected: Callable[[Leadership], Awaitable[None]],
                 deposed: Callable[[Leadership, str], Awaitable[None]],
                 holder: str = "", sick: Callable[[], str] = lambda: "") -> None:
        self.store = store
        #: Why this coordinator should not lead although it holds the lease (it cannot
        #: write its state), or "": checked before each renewal.
        self._sick = sick
        self.address = address
        self.ttl = ttl
        self.holder = holder or new_holder()
        self._elected = elected
        self._deposed = deposed
        self.leader: Leadership | None = None
        #: The leader as last read from the store (address, epoch, seconds left then).
        self.known: Lease | None = None
        self.last_error = ""
        self._wake = asyncio.Event()
        self._lost: list[tuple[Leadership, str, bool]] = []
        self._error_logged = 0.0
        self._not_before = 0.0

    @property
    def leader_address(self) -> str:
        if self.leader is not None and self.leader.valid():
            return self.address
        known = self.known
        return known.address if known is not None and known.holder != self.holder else ""

    def lose(self, lead: Leadership, why: str, release: bool = False) -> None:
        """Stop leading now (called from anywhere; the campaign does the stepping down).
        ``release``: hand the lease over at once (it is still ours, but useless to us)."""
        if lead.lost:
            return
        lead.lost = True
        self._lost.append((lead, why, release))
        self._wake.set()

    async def run(self) -> None:
        while True:
            if self._lost:
                lead, why, release = self._lost.pop(0)
                await self._step_down(lead, why, release=release)
            elif self.leader is None:
                await self._campaign()
            else:
                await self._renew(self.leader)

    async def _nap(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._wake.wait()

    def _store_error(self, what: str, exc: Exception) -> None:
        self.last_error = str(exc)
        now = time.monotonic()
        if now - self._error_logged >= 5.0:
            log.error("%s: %s", what, exc)
            self._error_logged = now

    def hold_off(self, seconds: float) -> None:
        """Do not campaign for ``seconds`` (this coordinator could not take over)."""
        self._not_before = time.monotonic() + seconds

    async def _campaign(self) -> None:
        if time.monotonic() < self._not_before:
            await self._nap(self._not_before - time.monotonic())
            return
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.ttl):
                lease = await self.store.acquire(self.holder, self.address, self.ttl)
        except (StoreUnavailable, TimeoutError) as exc:
            self.known = None
            self._store_error("cannot reach the store to campaign for leadership",
                              exc if isinstance(exc, StoreUnavailable) else
                              StoreUnavailable(self.store.where, "no answer in time"))
            await self._nap(min(1.0, self.ttl / 2))
            return
        self.last_error = ""
        self.known = lease
        if lease.holder != self.holder:
            # Try again just after it would expire; a renewing leader moves that on.
            await self._nap(min(max(lease.remaining, 0.0), self.ttl) + random.uniform(0.01, 0.1))
            return
        lead = Leadership(self, Term(self.holder, lease.epoch), t0)
        self.leader = lead
        log.info("leading with epoch %d (lease %g s, store %s)", lease.epoch, self.ttl,
                 self.store.where)
        try:
            await self._elected(lead)
        except Exception as exc:  # could not load the state: let another one lead
            log.exception("could not take over as leader")
            await self._step_down(lead, f"taking over failed: {exc}", release=True)

    async def _renew(self, lead: Leadership) -> None:
        await self._nap(lead.renewed + self.ttl / 3 - time.monotonic())
        if self._lost or self.leader is not lead:
            return
        sick = self._sick()
        if sick:  # a leader that cannot write serves nobody: let a standby lead
            await self._step_down(lead, sick, release=True)
            self.hold_off(2 * self.ttl)
            return
        t0 = time.monotonic()
        budget = lead.deadline - t0
        if budget <= 0:
            await self._step_down(lead, f"the lease was not renewed within "
                                  f"{HOLD * self.ttl:g} s ({self.last_error or 'paused?'})",
                                  release=True)
            return
        try:
            async with asyncio.timeout(budget):
                ok = await self.store.renew(lead.term, self.ttl)
        except (StoreUnavailable, TimeoutError) as exc:
            self._store_error("cannot renew the leader's lease", exc if isinstance(
                exc, StoreUnavailable) else StoreUnavailable(self.store.where,
                                                             "no answer in time"))
            if time.monotonic() < lead.deadline:
                await self._nap(min(0.1, lead.deadline - time.monotonic()))
            return
        if not ok:
            await self._step_down(lead, "the lease is gone: another coordinator took it",
                                  release=False)
            return
        self.last_error = ""
        lead.renewed = t0
        lead.deadline = t0 + HOLD * self.ttl

    async def _step_down(self, lead: Leadership, why: str, *, release: bool) -> None:
        lead.lost = True
        if self.leader is lead:
            self.leader = None
        log.warning("stepping down as leader (epoch %d): %s", lead.epoch, why)
        try:
            await self._deposed(lead, why)
        except Exception:
            log.exception("stepping down")
        if release:  # let a standby take over at once, if the store still names us
            with contextlib.suppress(StoreUnavailable, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.store.release(lead.term)

    async def resign(self) -> None:
        """Shutting down: step down and hand the lease over at once."""
        lead = self.leader
        if lead is not None:
            await self._step_down(lead, "shutting down", release=True)


class Sole:
    """Leadership where one coordinator owns the store (SQLite; its state directory is
    locked): the lease is taken once per start, for a new epoch, and never lapses."""

    ttl = math.inf

    def __init__(self, store: SQLiteStore, address: str = "") -> None:
        self.store: Store = store
        self._sqlite = store
        self.address = address

    @property
    def leader_address(self) -> str:
        return self.address

    async def take(self) -> Leadership:
        term = await self._sqlite.take(new_holder(), self.address)
        log.info("coordinator epoch %d (this coordinator alone owns %s)", term.epoch,
                 self.store.where)
        return Leadership(self, term, time.monotonic())

    def lose(self, lead: Leadership, why: str, release: bool = False) -> None:
        log.error("the store no longer names this coordinator as its owner (%s); was the "
                  "state file replaced while it ran? Restart it", why)


class LeaderAgentClient(AgentClient):
    """An agent client that acts only while this coordinator leads: each call checks the
    term first (a leader paused past its lease sends nothing), and an agent's refusal
    from a newer epoch is settled with the store (``Leadership.contest``)."""

    def __init__(self, inner: AgentClient, lead: Leadership, agent: str) -> None:
        self._inner = inner
        self._lead = lead
        self._agent = agent

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        self._lead.check()
        try:
            return await call()
        except Fenced as exc:
            await self._lead.contest(self._agent, exc.newest)
        self._lead.check()
        try:
            return await call()
        except Fenced as exc:
            raise NotLeader(f"agent {self._agent!r} still refuses epoch {exc.epoch}",
                            self._lead.campaign.leader_address) from exc

    async def spawn(self, spec: GroupSpec, *, key: str, group_id: str,
                    timeout: float) -> GroupView:
        return await self._call(lambda: self._inner.spawn(spec, key=key, group_id=group_id,
                                                          timeout=timeout))

    async def adopt(self, pid: int, start_time: float | None, spec: GroupSpec, *,
                    timeout: float) -> GroupView:
        return await self._call(lambda: self._inner.adopt(pid, start_time, spec,
                                                          timeout=timeout))

    async def signal(self, group_id: str, sig: signal.Signals, *,
                     timeout: float) -> SignalOutcome:
        return await self._call(lambda: self._inner.signal(group_id, sig, timeout=timeout))

    async def stop_groups(self, group_ids: Sequence[str], override: StopOverride | None, *,
                          timeout: float) -> tuple[list[GroupView], dict[str, str]]:
        return await self._call(lambda: self._inner.stop_groups(group_ids, override,
                                                                timeout=timeout))

    async def get(self, group_id: str, *, timeout: float) -> GroupView:
        return await self._call(lambda: self._inner.get(group_id, timeout=timeout))

    async def watch(self, since: int, epoch: str) -> AsyncIterator[tuple[str, GroupEvent]]:
        self._lead.check()
        try:
            async for item in self._inner.watch(since, epoch):
                yield item
        except Fenced as exc:
            await self._lead.contest(self._agent, exc.newest)
            raise AgentUnreachable(self._agent, "", "its watch was refused for an older "
                                   "epoch; reconnecting with the new one") from exc

    async def list_orphans(self, sweep: bool, *, timeout: float) -> list[Orphan]:
        return await self._call(lambda: self._inner.list_orphans(sweep, timeout=timeout))

    async def logs(self, query: LogQuery) -> AsyncIterator[OutputChunk]:
        async for chunk in self._stream(self._inner.logs(query)):
            yield chunk

    async def attach(self, opened: AttachOpen, inputs: AsyncIterator[StdinInput]
                     ) -> AsyncIterator[OutputChunk]:
        async for chunk in self._stream(self._inner.attach(opened, inputs)):
            yield chunk

    async def _stream(self, chunks: AsyncIterator[OutputChunk]) -> AsyncIterator[OutputChunk]:
        self._lead.check()
        try:
            async for chunk in chunks:
                yield chunk
        except Fenced as exc:
            await self._lead.contest(self._agent, exc.newest)
            raise NotLeader(f"agent {self._agent!r} refused epoch {exc.epoch}",
                            self._lead.campaign.leader_address) from exc
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def restart(self, group_id: str, override: StopOverride | None, *,
                      timeout: float) -> GroupView:
        return await self._call(lambda: self._inner.restart(group_id, override,
                                                            timeout=timeout))

    async def forget(self, group_ids: Sequence[str], *,
                     timeout: float) -> tuple[list[str], dict[str, str]]:
        return await self._call(lambda: self._inner.forget(group_ids, timeout=timeout))

    async def list_ports(self, port: int, *, timeout: float) -> list[PortOwner]:
        return await self._call(lambda: self._inner.list_ports(port, timeout=timeout))

    async def close(self) -> None:
        await self._inner.close()
