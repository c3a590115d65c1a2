"""Spawns routed to agents, signals and stops fanned out to every agent of a session.

Each fan-out returns one result per group: an agent that fails or times out is
retried with backoff and its groups are reported with the reason, never dropped.

A session stop first closes the session to new spawns (state ``stopping``,
persisted with the stop intent), then stops what exists phase by phase in
``stop_order``, including spawns still in flight: their group ids are assigned
here and sent along, so the agent stops a group it is starting, and refuses one
whose spawn arrives after the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from tether.coordinator import control, spawns
from tether.coordinator.agents import AgentLink
from tether.coordinator.model import InFlight, TrackedGroup
from tether.core import trace
from tether.core.errors import (
    Conflict,
    IdempotencyConflict,
    InvalidSpec,
    NotInSession,
    ResourceExhausted,
    StateUnwritable,
    TetherError,
)
from tether.core.model import (
    DEFAULT_START_TIMEOUT,
    EventKind,
    GroupSpec,
    GroupState,
    GroupView,
    StopOverride,
    check_grace,
    check_group_id,
    key_fingerprint,
    new_group_id,
    parse_signal,
    spec_fingerprint,
)
from tether.core.sessions import (
    EVERY_GROUP,
    GroupSelector,
    SessionReport,
    SessionState,
    StopIntent,
)

#: Cause of a stop intent that stops some groups of a session (JSON [agent, group id]
#: pairs follow), not the session: ``tether stop S --group G`` survives a failover.
GROUP_STOP = "groups:"


def group_stop_keys(intent: StopIntent) -> list[tuple[str, str]]:
    try:
        return [(str(a), str(g)) for a, g in json.loads(intent.cause[len(GROUP_STOP):])]
    except (ValueError, TypeError):
        log.warning("session %r: an unreadable group stop intent %r is dropped",
                    intent.session_id, intent.cause[:200])
        return []


if TYPE_CHECKING:
    from tether.coordinator.core import Coordinator

log = logging.getLogger(__name__)

#: Errors that mean "the agent refused; nothing was started".
REFUSED = (InvalidSpec, Conflict, IdempotencyConflict, ResourceExhausted)
SIGNAL_DEADLINE = 10.0


class Fanout:
    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self._stops: dict[str, asyncio.Task[SessionReport]] = {}
        #: Groups being stopped by ``stop_groups``, per session (persisted as the
        #: session's stop intent with cause ``GROUP_STOP``, unless the whole session stops).
        self._group_stops: dict[str, dict[tuple[str, str], None]] = {}

    # ------------------------------------------------------------ spawn / adopt

    async def spawn(self, agent: str, spec: GroupSpec, key: str) -> tuple[str, GroupView]:
        """Start a group; returns (agent name, view). Idempotent by ``key``: the same
        request returns the first group; another request with the key is refused."""
        if not spec.session_id:
            raise InvalidSpec("spawn needs a session (--session NAME)", field="session")
        # Resolve the agent and check the key before touching any session: bad input
        # changes nothing.
        link = self.c.agents.resolve(agent)
        # The agent is part of what a key is bound to: the same key sent to another
        # agent is another request, refused, not a second group.
        fingerprint = key_fingerprint(link.name, spec)
        if key:
            seen = self.c.by_key(key)
            while seen is None and (flying := spawns.pending_by_key(self.c, key)):
                await flying.done.wait()  # the same key in flight (a retry): its outcome
                seen = self.c.by_key(key)
            if seen is not None:
                # (Keys recorded by 0.1.0 hold the spec's fingerprint alone.)
                legacy = seen.agent == link.name and seen.fingerprint == spec_fingerprint(spec)
                if seen.fingerprint and seen.fingerprint != fingerprint and not legacy:
                    raise IdempotencyConflict(key, seen.group_id)
                if seen.view.state is GroupState.STARTING:
                    # Tracked before its start was over (a new leader found it on the
                    # agent): answer as the first call would have, with the outcome.
                    # (A failed start is answered as the agent answers it: the failed view.)
                    with contextlib.suppress(TimeoutError):  # then as it is by now
                        await self.c.start_outcome(seen, _spawn_deadline(seen.view.spec))
                return seen.agent, seen.view
        self._refuse_if_stopping(spec.session_id)
        s, previous = self.c.sessions.create(spec.session_id, spec.window)
        gid = new_group_id()
        flight = InFlight(gid, link.name, spec.stop_order, key)
        self.c.inflight.setdefault(s.session_id, {})[gid] = flight
        intent = spawns.record(self.c, flight, s.session_id, fingerprint)
        try:
            await self.c.durable()  # whoever leads next knows of it before the agent does
        except TetherError:
            spawns.forget(self.c, gid)
            self._landed(flight, s.session_id)
            raise
        try:
            view = await self.c.agents.client(link).spawn(
                spec, key=key, group_id=gid, timeout=_spawn_deadline(spec))
        except REFUSED:
            spawns.forget(self.c, gid)
            self._landed(flight, s.session_id)
            self.c.sessions.undo(s, previous)
            raise
        except TetherError:
            spawns.follow_up(self.c, intent)  # no answer: it may have started, find out
            raise
        finally:
            self._landed(flight, s.session_id)
        tracked = self.c.groups.get((link.name, view.group_id))
        if tracked is None:
            tracked = self.c.track(TrackedGroup(link.name, view, key, fingerprint))
        else:  # the agent's Watch told us first: the key is ours to index all the same
            tracked.absorb(view)
            self.c.bind_key(tracked, key, fingerprint)
        self.c.save_group(tracked)
        spawns.forget(self.c, gid)
        self.c.publish(tracked, EventKind.STATE)
        try:
            await self.c.durable()
        except StateUnwritable as exc:
            log.error("group %s started but cannot be recorded (%s); stopping it",
                      tracked.group_id, exc)
            await self._stop_on_agent(link.name, [tracked], None)
            raise
        stop = self._stops.get(s.session_id)
        if stop is not None and not tracked.ended:
            # The session began stopping while this spawn was in flight; its stop ends
            # this group too. Answer with how it ended, not with a moment's "running".
            await asyncio.shield(stop)
        return tracked.agent, tracked.view

    async def adopt(self, agent: str, pid: int, start_time: float | None,
                    spec: GroupSpec) -> tuple[str, GroupView]:
        if not spec.session_id:
            raise InvalidSpec("adopt needs a session (--session NAME)", field="session")
        link = self.c.agents.resolve(agent)
        self._refuse_if_stopping(spec.session_id)
        s, previous = self.c.sessions.create(spec.session_id, spec.window)
        try:
            view = await self.c.agents.client(link).adopt(pid, start_time, spec, timeout=30)
        except REFUSED:
            self.c.sessions.undo(s, previous)
            raise
        tracked = self.c.track(TrackedGroup(link.name, view))
        self.c.save_group(tracked)
        self.c.publish(tracked, EventKind.STATE)
        await self.c.durable()
        return tracked.agent, tracked.view

    def _landed(self, flight: InFlight, session_id: str) -> None:
        flights = self.c.inflight.get(session_id, {})
        if flights.get(flight.group_id) is flight:
            del flights[flight.group_id]
        flight.done.set()
        self.c.check_idle(session_id)

    def _refuse_if_stopping(self, session_id: str) -> None:
        if self.c.sessions.has(session_id) and \
                self.c.session(session_id).state is SessionState.STOPPING:
            raise Conflict(f"session {session_id!r} is stopping; wait for the stop to finish, "
                           "then spawn into it again")

    # ------------------------------------------------------------ selection

    def select(self, session_id: str, selector: GroupSelector) -> list[TrackedGroup]:
        """The groups of a session a command names (every group for an empty selector).
        Checked before anything is done: a group of another session, an unknown id or a
        label no group has is refused (``NotInSession``), naming it."""
        self.c.session(session_id)
        groups = self.c.session_groups(session_id)
        if selector.everything:
            return groups
        chosen: dict[tuple[str, str], TrackedGroup] = {}
        for gid in selector.group_ids:
            check_group_id(gid)
            found = [t for t in groups if t.group_id == gid]
            if not found:
                other = sorted({t.session_id for t in self.c.groups.values()
                                if t.group_id == gid})
                why = (f"belongs to session {other[0]!r}, not {session_id!r}" if other
                       else f"is not in session {session_id!r}")
                raise NotInSession(session_id, f"group {gid}", why)
            chosen.update((t.key, t) for t in found)
        for label in selector.labels:
            found = [t for t in groups if t.view.spec.label == label]
            if not found:
                labels = sorted({t.view.spec.label for t in groups if t.view.spec.label})
                raise NotInSession(session_id, f"label {label!r}",
                                   f"matches no group of session {session_id!r} (labels there: "
                                   f"{', '.join(labels) or 'none'})")
            chosen.update((t.key, t) for t in found)
        return list(chosen.values())

    # ------------------------------------------------------------ signal

    async def signal_session(self, session_id: str, signal_name: str,
                             selector: GroupSelector = EVERY_GROUP) -> SessionReport:
        sig = parse_signal(signal_name)
        t0 = time.monotonic()
        live = [t for t in self.select(session_id, selector) if not t.ended]

        async def one(t: TrackedGroup) -> tuple[TrackedGroup, int, str]:
            link = self.c.agents.links.get(t.agent)
            if link is None:
                return t, 0, f"agent {t.agent!r} is not registered"
            try:
                out = await self.c.agents.client(link).signal(t.group_id, sig,
                                                              timeout=SIGNAL_DEADLINE)
            except TetherError as exc:
                return t, 0, str(exc)
            self.c.absorb(t.agent, out.group)
            return t, out.members_signalled, ""

        results = await asyncio.gather(*(one(t) for t in live))
        self.c.hooks.fanout("signal", time.monotonic() - t0)
        reports = []
        for t, n, error in results:
            rep = self.c.report(t, n)
            reports.append(replace(rep, error=error) if error else rep)
        return SessionReport(session_id, tuple(reports), all(not r.error for r in reports))

    # ------------------------------------------------------------ stop

    def begin_stop(self, session_id: str, grace: float | None, cause: str,
                   resumed: bool = False) -> asyncio.Task[SessionReport]:
        task = self._stops.get(session_id)
        if task is not None and not task.done():
            return task
        s = self.c.session(session_id)
        # Closed to new spawns from here on (synchronously: no spawn can slip in).
        self.c.sessions.set_state(s, SessionState.STOPPING,
                                  s.stop_cause if (resumed and s.stop_cause) else cause)
        if not resumed:
            self.c.persist.put(("intent", session_id), StopIntent(session_id, grace, cause))
        task = self.c.tasks.spawn(self._run_stop(session_id, grace), f"stop-{session_id}")
        self._stops[session_id] = task
        return task

    async def stop_session(self, session_id: str, grace: float | None,
                           wait: float | None = None) -> SessionReport:
        s = self.c.session(session_id)
        if grace is not None:
            check_grace(grace)
        if s.state is SessionState.STOPPED and all(t.ended for t in
                                                   self.c.session_groups(session_id)):
            return self.c.session_report(session_id, complete=True)
        task = self.begin_stop(session_id, grace, "requested")
        await self.c.durable()  # the intent is on disk before we say anything
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(task)
        except TimeoutError:
            return self.c.session_report(session_id, complete=False)

    async def _run_stop(self, session_id: str, grace: float | None) -> SessionReport:
        s = self.c.sessions.find(session_id)
        with trace.span("tether.stop", session=session_id,
                        cause=s.stop_cause if s is not None else "") as sp:
            report = await self._run_stop_traced(session_id, grace)
            if sp is not None:
                sp.set_attributes({"tether.groups": len(report.groups),
                                   "tether.clean": report.clean})
            return report

    async def _run_stop_traced(self, session_id: str, grace: float | None) -> SessionReport:
        t0 = time.monotonic()
        try:
            await self.c.durable()  # the intent is stored before any agent stops anything
        except StateUnwritable as exc:
            log.error("session %r: stopping it without its stop intent on record: %s",
                      session_id, exc)
        override = StopOverride(grace=grace) if grace is not None else None
        while True:
            live = [t for t in self.c.session_groups(session_id) if not t.ended]
            flying = list(self.c.inflight.get(session_id, {}).values())
            if not live and not flying:
                break
            orders = sorted({t.view.spec.stop_order for t in live} |
                            {f.stop_order for f in flying})
            for order in orders:
                await self._phase(session_id, order, override)
            for f in flying:  # the agent stopped or refused it; wait for the spawn to say
                await f.done.wait()
        self.c.persist.put(("intent", session_id), None)
        s = self.c.sessions.find(session_id)
        if s is None:  # dropped meanwhile (retention): nothing is left to report on
            return SessionReport(session_id, (), True)
        self.c.sessions.set_state(s, SessionState.STOPPED)
        report = self.c.session_report(session_id, complete=True)
        self.c.hooks.session_stopped("clean" if report.clean else "unclean", session_id,
                                     time.monotonic() - t0)
        self.c.hooks.fanout("stop", time.monotonic() - t0)
        self.c.publish_stopped(report)
        log.info("session %r stopped (%s) in %.3f s", session_id, s.stop_cause,
                 time.monotonic() - t0)
        return report

    async def _phase(self, session_id: str, order: int, override: StopOverride | None,
                     only: list[TrackedGroup] | None = None) -> None:
        """Stop one ``stop_order`` phase: the session's live groups of that order (and its
        spawns in flight), or only those of ``only`` (a group stop), every agent at once."""
        pool = self.c.session_groups(session_id) if only is None else only
        todo = [t for t in pool if t.view.spec.stop_order == order and not t.ended]
        by_agent: dict[str, list[TrackedGroup | InFlight]] = {}
        for t in todo:
            by_agent.setdefault(t.agent, []).append(t)
        if only is None:
            for f in self.c.inflight.get(session_id, {}).values():
                if f.stop_order == order and (f.agent, f.group_id) not in self.c.groups:
                    by_agent.setdefault(f.agent, []).append(f)
        if not by_agent:
            return
        log.info("session %r: stopping phase stop_order=%d: %d group(s) on %d agent(s)",
                 session_id, order, sum(map(len, by_agent.values())), len(by_agent))
        async with asyncio.TaskGroup() as tg:
            for agent, groups in by_agent.items():
                tg.create_task(self._stop_on_agent(agent, groups, override))

    async def stop_groups(self, session_id: str, selector: GroupSelector,
                          grace: float | None, wait: float | None = None) -> SessionReport:
        """Stop some groups of a session (``tether stop S --group ID``), phase by phase in
        ``stop_order``, through the same per-agent stop and retries as a session stop. The
        session stays active. Returns once each has a record, or at ``wait`` with what is
        known (the stop goes on, owned by the coordinator)."""
        if grace is not None:
            check_grace(grace)
        chosen = self.select(session_id, selector)
        self._intend_group_stop(session_id, [t.key for t in chosen if not t.ended], grace)
        await self.c.durable()  # the intent is stored before we say "it goes on"
        task = self._run_group_stop(session_id, chosen, grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await asyncio.shield(task)
        groups = sorted(chosen, key=lambda t: (t.view.spec.stop_order, t.group_id))
        return SessionReport(session_id, tuple(self.c.report(t) for t in groups),
                             all(t.ended for t in chosen))

    def resume_group_stop(self, intent: StopIntent) -> None:
        """Go on with a group stop a previous leader persisted (``GROUP_STOP`` intent)."""
        keys = group_stop_keys(intent)
        chosen = [t for k in keys if (t := self.c.groups.get(k)) is not None]
        log.info("session %r: resuming the stop of %d group(s) left by a previous leader",
                 intent.session_id, len(chosen))
        self._intend_group_stop(intent.session_id, [t.key for t in chosen if not t.ended],
                                intent.grace)
        self._run_group_stop(intent.session_id, chosen, intent.grace)

    def _intend_group_stop(self, session_id: str, keys: list[tuple[str, str]],
                           grace: float | None) -> None:
        pending = self._group_stops.setdefault(session_id, {})
        pending.update(dict.fromkeys(keys))
        self._save_group_intent(session_id, grace)

    def _save_group_intent(self, session_id: str, grace: float | None) -> None:
        stop = self._stops.get(session_id)
        if stop is not None:  # the whole session stops: its own intent covers the groups
            return
        pending = self._group_stops.get(session_id)
        if pending:
            self.c.persist.put(("intent", session_id), StopIntent(
                session_id, grace, GROUP_STOP + json.dumps(sorted(pending))))
        else:
            self._group_stops.pop(session_id, None)
            self.c.persist.put(("intent", session_id), None)

    def _run_group_stop(self, session_id: str, chosen: list[TrackedGroup],
                        grace: float | None) -> asyncio.Task[None]:
        override = StopOverride(grace=grace) if grace is not None else None

        async def run() -> None:
            t0 = time.monotonic()
            for order in sorted({t.view.spec.stop_order for t in chosen if not t.ended}):
                await self._phase(session_id, order, override, chosen)
            self.c.hooks.fanout("stop_groups", time.monotonic() - t0)
            pending = self._group_stops.get(session_id, {})
            for t in chosen:
                pending.pop(t.key, None)
            self._save_group_intent(session_id, grace)

        return self.c.tasks.spawn(run(), f"stop-groups-{session_id}")

    # ------------------------------------------------------------ restart, forget

    async def restart(self, session_id: str, selector: GroupSelector,
                      grace: float | None) -> SessionReport:
        return await control.restart(self, session_id, selector, grace)

    async def forget(self, session_id: str, selector: GroupSelector) -> list[str]:
        return await control.forget(self, session_id, selector)

    async def _stop_on_agent(self, agent: str, groups: list[TrackedGroup | InFlight],
                             override: StopOverride | None) -> None:
        """Stop every group on one agent with one call; retry with backoff until each has
        a record. Groups of an agent that does not answer are reported with the reason
        (state unreachable, error set), never dropped."""
        backoff = 0.1
        attempts = 0
        pending = list(groups)
        while pending:
            attempts += 1
            link = self.c.agents.links.get(agent)
            if link is None:
                for t in pending:
                    if isinstance(t, TrackedGroup) and not t.ended:
                        self.c.mark_lost(t, f"agent {agent!r} is not registered any more")
                return
            with trace.span("tether.fanout.stop", agent=agent, groups=len(pending),
                            attempt=attempts):
                pending = await self._stop_batch(link, pending, override)
            if not pending:
                return
            tracked = [t for t in pending if isinstance(t, TrackedGroup)]
            for t in tracked:
                t.attempts = attempts
                self.c.save_group(t)
                self.c.publish(t, EventKind.UNREACHABLE)
            log.warning("agent %r: %d group(s) not stopped yet (attempt %d: %s); retrying in "
                        "%.1f s", agent, len(pending), attempts,
                        tracked[0].error if tracked else "spawn in flight", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.c.config.retry_backoff_max)

    async def _stop_batch(self, link: AgentLink, groups: list[TrackedGroup | InFlight],
                          override: StopOverride | None) -> list[TrackedGroup | InFlight]:
        """One StopGroups call; returns the groups that still have no record."""
        grace = max((override.grace if override and override.grace is not None
                     else t.view.stop.grace if isinstance(t, TrackedGroup) else 0.0)
                    for t in groups)
        ids = [t.group_id for t in groups]
        try:
            views, unknown = await self.c.agents.client(link).stop_groups(
                ids, override, timeout=grace + self.c.config.call_margin)
        except TetherError as exc:
            for t in groups:
                if isinstance(t, TrackedGroup):
                    t.error = str(exc)
            return list(groups)
        by_id: dict[str, TrackedGroup | InFlight | None] = {t.group_id: t for t in groups}
        for view in views:
            by_id.pop(view.group_id, None)
            self.c.absorb(link.name, view, EventKind.EXIT)
        for gid, why in unknown.items():
            gone = by_id.pop(gid, None)
            if isinstance(gone, TrackedGroup):
                self.c.mark_lost(gone, f"agent {link.name!r} does not know this group ({why})")
        return [t for t in by_id.values() if t is not None]


def _spawn_deadline(spec: GroupSpec) -> float:
    return min(max(spec.start_timeout or DEFAULT_START_TIMEOUT, 0.0), 86400.0) + 30.0

