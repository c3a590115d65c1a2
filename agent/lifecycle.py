"""What the authority's parts (start, watch, stop) share: the table, the hooks, the events,
and the one place a group's state changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from tether.agent.groups import Group, GroupTable
from tether.agent.hooks import Hooks
from tether.core.errors import TetherError
from tether.core.events import Broadcaster
from tether.core.model import (
    EventKind,
    ExitReason,
    ExitRecord,
    FailureClass,
    GroupEvent,
    GroupState,
    LeaderStatus,
    Transition,
    next_state,
)
from tether.core.tasks import TaskSet
from tether.signallers.base import GroupHandle
from tether.signallers.registry import Signallers

log = logging.getLogger("tether.agent")

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
            g.ended.set()
        else:
            g.log.debug("%s -> %s", old.value, g.state.value)
        self.emit(g, EventKind.EXIT if g.state.ended else EventKind.STATE)

    def fail(self, g: Group, failure: FailureClass, message: str,
             status: LeaderStatus | None = None, survivors: int = 0) -> None:
        """A start failed: record it and end the group (its containment is already empty).
        A restart's start that failed is the supervisor's to judge (the group lives on)."""
        restarting = g.state is GroupState.RESTARTING and self.restart_failed is not None
        g.log.warning("%s failed (%s): %s", "restart" if restarting else "start",
                      failure.value, message)
        record = ExitRecord(ExitReason.START_FAILED,
                            exit_code=status.exit_code if status else None,
                            signal=status.signal if status else None, failure=failure,
                            message=message, ended_at=time.time(), survivors=survivors)
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

