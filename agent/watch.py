"""Watching a running group: its leader's exit, the containment emptying, its target's
reachability.

One task per group, event-driven through the handle (pidfds, cgroup.events, the
Docker event stream, a remote wait). When the target cannot be asked (an SSH host
drops, a Docker engine restarts) the watcher marks the group ``unreachable``,
keeps trying with capped, jittered backoff for as long as the group lives, and
clears the mark when the target answers again; the record it writes then is the
one the handle sees, not a guess made while blind.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable

from tether.agent.groups import Group
from tether.agent.lifecycle import Lifecycle, leader_status
from tether.core.errors import TargetUnreachable, TetherError
from tether.core.model import (
    EventKind,
    ExitReason,
    ExitRecord,
    GroupState,
    Transition,
)

RETRY_FIRST = 0.2
RETRY_MAX = 15.0


class Watcher:
    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc
        #: Set by the supervisor: a run ended on its own; True when it takes the group over
        #: (another run starts), False to let the group end ``exited`` here.
        self.run_ended: Callable[[Group, ExitRecord], bool] | None = None

    def start(self, g: Group) -> None:
        self.lc.tasks.spawn(self._watch(g), f"watch-{g.group_id}")

    def _unreachable(self, g: Group, exc: TetherError) -> None:
        if not g.unreachable:
            g.unreachable = True
            g.log.warning("its target cannot be reached (%s); the group is marked "
                          "unreachable and watched again with backoff", exc)
            self.lc.emit(g, EventKind.UNREACHABLE)

    def _reachable(self, g: Group) -> None:
        if g.unreachable:
            g.unreachable = False
            g.log.info("its target answers again")
            if not g.state.ended:
                self.lc.emit(g, EventKind.REACHABLE)

    async def _watch(self, g: Group) -> None:
        h = g.handle
        assert h is not None
        backoff = RETRY_FIRST
        leader_done = False
        outage = 0.0
        while not g.state.ended:
            leader = empty = None
            try:
                if not leader_done:
                    leader = asyncio.ensure_future(h.wait_leader())
                    empty = asyncio.ensure_future(h.wait())
                    done, _ = await asyncio.wait({leader, empty},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if empty in done:
                        empty.result()
                        break
                    status = leader.result()
                    leader_done = True
                    self._reachable(g)
                    if g.state is GroupState.RUNNING:
                        remaining = await h.members()
                        if remaining:
                            g.detached = True
                            g.log.info("leader pid %d exited (%s) but %d member(s) remain: the "
                                       "group keeps running, detached", h.leader_pid,
                                       status.describe(), len(remaining))
                            self.lc.emit(g, EventKind.DETACHED)
                await h.wait()
                break
            except TargetUnreachable as exc:
                if g.state.ended:
                    return
                self._unreachable(g, exc)
                pause = backoff * (0.5 + random.random())
                outage += pause
                await asyncio.sleep(pause)
                backoff = min(backoff * 2, RETRY_MAX)
            finally:
                for t in (leader, empty):
                    if t is None:
                        continue
                    if not t.done():
                        t.cancel()
                    elif not t.cancelled():
                        t.exception()  # read: a second failure of one outage is not news
        self._reachable(g)
        if g.handle is h:  # not a later run's: a restart may have started one meanwhile
            g.empty.set()
        if g.state is GroupState.RUNNING:
            status = await leader_status(h)
            try:
                oom = await h.oom_kills()
            except TetherError:
                oom = 0
            if g.state is not GroupState.RUNNING or g.handle is not h:
                return  # a stop took over meanwhile: its record is the one
            reason = ExitReason.NATURAL
            if status.signal is not None:
                reason = (ExitReason.REQUESTED if status.signal in g.signals_sent
                          else ExitReason.EXTERNAL_SIGNAL)
            if oom and status.signal == signal.SIGKILL and reason is not ExitReason.REQUESTED:
                reason = ExitReason.OOM_KILLED
            notes = []
            if status.exit_code is None and status.signal is None:
                # A re-adopted leader is not this agent's child: how it ended is unknown, and
                # a crash must not be recorded as a clean, natural end.
                reason = ExitReason.UNKNOWN
                notes.append("its leader's exit status could not be read (a leader adopted or "
                             "re-adopted after an agent restart is not this agent's child)")
            if outage:
                notes.append(f"its target was unreachable for about {outage:.0f} s; the exit "
                             "was seen after it answered again")
                if h.detail:
                    notes.append(h.detail)  # what the handle saw on the way (reconnects, ...)
            if oom:
                notes.append(f"the kernel's OOM killer ended {oom} process(es) at the group's "
                             f"memory limit ({g.context.limits or 'see --memory'})")
            record = ExitRecord(reason, exit_code=status.exit_code, signal=status.signal,
                                ended_at=time.time(), detail="; ".join(notes), oom_kills=oom)
            if self.run_ended is not None and self.run_ended(g, record):
                return  # another run starts; the supervisor closes this one's handle
            g.exit = record
            self.lc.transition(g, Transition.EXITED)
            try:
                await h.close()
            except TetherError as exc:
                g.log.warning("closing its handle: %s", exc)
