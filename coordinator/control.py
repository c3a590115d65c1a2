"""Per-group control on top of the fan-out: restart groups in place, forget ended ones
(``tether restart``, ``tether forget``)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from tether.coordinator.model import TrackedGroup
from tether.core.errors import Conflict, InvalidSpec, TetherError
from tether.core.model import GroupState, StopOverride, check_grace
from tether.core.sessions import GroupReport, GroupSelector, SessionReport, SessionState

if TYPE_CHECKING:
    from tether.coordinator.fanout import Fanout

log = logging.getLogger(__name__)

#: A restart call may take the grace, the start timeout and this much more.
RESTART_MARGIN = 30.0
#: How long a best-effort forget waits for an agent.
FORGET_DEADLINE = 10.0


async def restart(f: Fanout, session_id: str, selector: GroupSelector,
                  grace: float | None) -> SessionReport:
    """Restart groups of an active session in place, each on its agent (end the run,
    start it again with the same spec, through its readiness probe). An ended group
    named explicitly is refused (ended groups are final), before anything is done."""
    s = f.c.session(session_id)
    if grace is not None:
        check_grace(grace)
    if s.state is not SessionState.ACTIVE:
        raise Conflict(f"session {session_id!r} is {s.state.value}; its groups are not "
                       "restarted (start it again with `tether spawn` or `tether up`)")
    chosen = f.select(session_id, selector)
    ended = [t for t in chosen if t.ended]
    if ended and not selector.everything:
        t = ended[0]
        raise Conflict(f"group {t.group_id} has ended ({t.view.state.value}): ended groups "
                       "are final; start it again with `tether spawn`; nothing was "
                       "restarted")
    live = [t for t in chosen if not t.ended]
    if not live:
        raise Conflict(f"session {session_id!r} has no live group to restart")
    for t in live:  # what its agent would refuse, refused for all before any is asked
        if why := t.view.not_restartable():
            raise Conflict(f"group {t.group_id} {why}; nothing was restarted")
    override = StopOverride(grace=grace) if grace is not None else None
    t0 = time.monotonic()

    async def one(t: TrackedGroup) -> GroupReport:
        link = f.c.agents.links.get(t.agent)
        if link is None:
            return replace(f.c.report(t), error=f"agent {t.agent!r} is not registered")
        limit = (t.view.stop.grace if grace is None else grace) + t.view.spec.start_timeout
        try:
            view = await f.c.agents.client(link).restart(
                t.group_id, override, timeout=limit + RESTART_MARGIN)
        except TetherError as exc:
            return replace(f.c.report(t), error=str(exc))
        f.c.absorb(t.agent, view)  # the answer is this restart's outcome (the watch
        # stream may still be delivering its earlier events: restarting, starting)
        return f.c.report(t if t.ended else replace(t, view=replace(
            view, spec=t.view.spec)))

    reports = list(await asyncio.gather(*(one(t) for t in live)))
    f.c.hooks.fanout("restart", time.monotonic() - t0)
    return SessionReport(session_id, tuple(reports), all(
        not r.error and r.state is GroupState.RUNNING for r in reports))

async def forget(f: Fanout, session_id: str, selector: GroupSelector) -> list[str]:
    """Drop ended groups from a session's listing (``tether forget``). Refused, with
    nothing dropped, when no group is named or one of them is live."""
    if selector.everything:
        raise InvalidSpec("name the ended groups to forget with --group ID or --label L",
                          field="selector")
    chosen = f.select(session_id, selector)
    live = [t for t in chosen if not t.ended]
    if live:
        t = live[0]
        raise Conflict(f"group {t.group_id} is {t.view.state.value}: only ended groups are "
                       f"forgotten; stop it first (`tether stop {session_id} --group "
                       f"{t.group_id}`); nothing was forgotten")
    by_agent: dict[str, list[str]] = {}
    for t in chosen:
        f.c.forget_group(t)
        by_agent.setdefault(t.agent, []).append(t.group_id)
    await f.c.durable()

    async def tell(agent: str, ids: list[str]) -> None:
        link = f.c.agents.links.get(agent)
        if link is None:
            return
        try:  # best effort: the agent drops ended records on its own after retention
            await f.c.agents.client(link).forget(ids, timeout=FORGET_DEADLINE)
        except TetherError as exc:
            log.info("agent %r did not forget %d group(s) now (%s); it drops them after "
                     "its retention", agent, len(ids), exc)

    await asyncio.gather(*(tell(a, ids) for a, ids in by_agent.items()))
    return [t.group_id for t in chosen]
