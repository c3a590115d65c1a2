"""What the authority's parts (start, watch, stop) share: the table, the hooks, the events,
and the one place a group's state changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace

from tether.agent.capture import Outputs
from tether.agent.groups import Group, GroupTable
from tether.agent.hooks import Hooks
from tether.core import trace
from tether.core.errors import TetherError
from tether.core.events import Broadcaster
from tether.core.model import (
    AGENT_ENV,
    MARKER_ENV,
    EventKind,
    ExitReason,
    ExitRecord,
    FailureClass,
    GroupEvent,
    GroupSpec,
    GroupState,
    LeaderStatus,
    RunContext,
    Transition,
    next_state,
)
from tether.core.tasks import TaskSet
from tether.signallers.base import GroupHandle, LaunchSpec, RunAs
from tether.signallers.registry import Signallers

#: How long an ended group's exit waits for its output to reach its --log file.
LOG_FLUSH_WAIT = 5.0

log = logging.getLogger(__name__)

LEADER_STATUS_WAIT = 1.0


class Lifecycle:
    def __init__(self, name: str, signallers: Signallers, hooks: Hooks, marker: str) -> None:
        self.name = name
        #: This agent instance's marker (TETHER_AGENT in every child's environment).
        self.marker = marker
        self.signallers = signallers
        self.hooks = hooks
        self.table = GroupTable()
        self.events: Broadcaster[GroupEvent] = Broadcaster()
        self.tasks = TaskSet(log)
        self.log = logging.LoggerAdapter(log, {"agent": name})
        #: Set by the supervisor (``supervise.py``): a restart's start failed while the group
        #: is ``restarting``; it keeps the attempt as a run and tries again or gives up.
        self.restart_failed: Callable[[Group, ExitRecord], None] | None = None
        #: Captured output: a ring per group, a sink per run, the stdin writers.
        self.outputs = Outputs(changed=lambda g: self.emit(g, EventKind.STATE))

    def emit(self, g: Group, kind: EventKind) -> None:
        view = g.view()
        self.hooks.group_changed(view)
        self.events.publish(GroupEvent(self.events.next_seq(), kind, view, time.time()))

    def transition(self, g: Group, event: Transition) -> None:
        """The only place a group's state changes (through the model's table)."""
        old = g.state
        g.state = next_state(old, event)
        if g.live_task is not None and (g.state is GroupState.STOPPING or g.state.ended):
            g.live_task.cancel()  # liveness checks end with the group (a check in flight too)
        if g.state.ended:
            flushed = self._ended(g)
            rec = g.exit
            if rec is not None and (not rec.clean or rec.reason not in (
                    ExitReason.REQUESTED, ExitReason.NATURAL)):
                g.log.info("%s -> %s (%s%s)", old.value, g.state.value, rec.reason.value,
                           f", {rec.survivors} survivor(s)" if rec.survivors else "")
            else:
                # A clean stop is the session's business (the coordinator logs the session
                # line); a 1000-group stop should not print 1000 lines.
                g.log.debug("%s -> %s", old.value, g.state.value)
            self.table.ended(g)
            if flushed is not None and not flushed.done():
                # Its output is still being appended to its --log (on a thread): whoever
                # waits for the end reads a complete file (a stuck file system: not longer
                # than LOG_FLUSH_WAIT).
                self.tasks.spawn(self._announce(g, flushed), f"announce-{g.group_id}")
                return
            g.ended.set()
        else:
            g.log.debug("%s -> %s", old.value, g.state.value)
        self.emit(g, EventKind.EXIT if g.state.ended else EventKind.STATE)

    async def _announce(self, g: Group, flushed: asyncio.Future[None]) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOG_FLUSH_WAIT):
                    await asyncio.shield(flushed)
        finally:  # cancelled too (the agent shuts down): the end is announced all the same
            g.ended.set()
            self.emit(g, EventKind.EXIT)

    def _ended(self, g: Group) -> asyncio.Future[None] | None:
        """What every ending shares: the record carries what the group ran with, OOM kills
        are counted, and what the start reserved (ports) is released."""
        if g.exit is not None:
            if g.context and not g.exit.context:
                g.exit = replace(g.exit, context=g.context)
            if g.exit.oom_kills:
                self.hooks.oom_kills(g.exit.oom_kills)
        # The last output first: it is in the ring before the exit event goes out.
        flushed = self.outputs.end(g)
        releases, g.on_end = g.on_end, []
        for release in releases:
            try:
                release()
            except Exception:
                g.log.exception("releasing what the group held failed")
        return flushed

    def fail(self, g: Group, failure: FailureClass, message: str,
             status: LeaderStatus | None = None, survivors: int = 0,
             oom_kills: int = 0) -> None:
        """A start failed: record it and end the group (its containment is already empty).
        A restart's start that failed is the supervisor's to judge (the group lives on)."""
        restarting = g.state is GroupState.RESTARTING and self.restart_failed is not None
        g.log.warning("%s failed (%s): %s", "restart" if restarting else "start",
                      failure.value, message)
        record = ExitRecord(ExitReason.START_FAILED,
                            exit_code=status.exit_code if status else None,
                            signal=status.signal if status else None, failure=failure,
                            message=message, ended_at=time.time(), survivors=survivors,
                            oom_kills=oom_kills)
        self.hooks.start_failure(failure.value)
        if restarting and self.restart_failed is not None:
            self.restart_failed(g, record)
            return
        g.exit = record
        self.transition(g, Transition.START_FAILED)

    def amend(self, g: Group, **changes: object) -> None:
        """Change fields of an ended group's record (e.g. survivors found late)."""
        if g.exit is not None:
            g.exit = replace(g.exit, **changes)  # type: ignore[arg-type]
            self.emit(g, EventKind.EXIT)


def build_launch(marker: str, group_id: str, spec: GroupSpec, where: str,
                 user: RunAs | None = None, context: RunContext | None = None) -> LaunchSpec:
    """What a signaller gets to start ``spec``: the final environment (the agent's when
    ``inherit_env``, then the user's HOME, USER and LOGNAME unless the spec gives them,
    the spec's, the assigned ports, the markers), the user to switch to, the limits."""
    env = dict(os.environ) if spec.inherit_env else {}
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    env.update(spec.env)
    env.update(trace.child_env(spec.env, spec.traceparent))
    if context is not None:
        env.update(context.port_env())
    env[MARKER_ENV] = group_id
    env[AGENT_ENV] = marker
    # A non-root agent runs groups only as itself (users.resolve refused the rest):
    # there is nothing to switch.
    switch = user if user is not None and os.geteuid() == 0 else None
    return LaunchSpec(group_id=group_id, argv=spec.argv, env=env, cwd=spec.cwd,
                      log_path=spec.log_path, where=where, owns_target=spec.owns_target,
                      orphan_policy=spec.orphan_policy, user=switch, limits=spec.limits,
                      capture=True, stdin=spec.stdin)


async def dispose(handle: GroupHandle) -> None:
    with contextlib.suppress(TetherError):
        await handle.kill()
    with contextlib.suppress(TetherError):
        await handle.close()


async def leader_status(handle: GroupHandle) -> LeaderStatus:
    known = handle.leader_status
    if known is not None:
        return known
    try:
        async with asyncio.timeout(LEADER_STATUS_WAIT):
            return await handle.wait_leader()
    except (TimeoutError, TetherError):
        return LeaderStatus()

