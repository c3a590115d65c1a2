"""Stopping and signalling groups: the one cancellation-safe stop routine.

1. Mark stopping (a start in progress hands over: its probes are killed).
2. Send the stop signal, plus SIGCONT so stopped processes can act on it, to
   every member of the containment.
3. Wait, event-driven, until the containment is empty or the grace ends; the
   grace runs from the stop *request*, so a batch escalates together.
4. Escalate: SIGKILL every member, sweeping newcomers, until empty.
5. Verify empty; write the exit record; emit the event.

Idempotent: stopping an ended group returns its record; concurrent stops of one
group share one run (an owned task, so a caller that goes away changes nothing).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable

from tether.agent.groups import Group
from tether.agent.lifecycle import Lifecycle, leader_status
from tether.core.errors import GroupNotFound, TetherError
from tether.core.model import (
    ExitReason,
    ExitRecord,
    GroupState,
    GroupView,
    OrphanPolicy,
    SignalOutcome,
    StopOverride,
    StopPolicy,
    Transition,
)
from tether.signallers.registry import split_target

Signals = signal.Signals


class Stopper:
    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def idle(self) -> None:
        """Return once no stop is in progress (background scans wait for a batch to end)."""
        await self._idle.wait()

    # ------------------------------------------------------------ signal

    async def signal(self, group_id: str, sig: Signals) -> SignalOutcome:
        g = self.lc.table.find(group_id)
        if g.handle is None and g.state is GroupState.STARTING and g.start_task is not None \
                and not g.start_task.done():
            await asyncio.shield(g.start_task)
        if g.state.ended or g.handle is None:
            return SignalOutcome(0, True, g.view())
        g.signals_sent.add(int(sig))
        n = await self.send(g, sig)
        return SignalOutcome(n, n == 0, g.view())

    async def send(self, g: Group, sig: Signals, also_continue: bool = False) -> int:
        """Signal every member; with ``also_continue``, follow with SIGCONT in the same pass
        so stopped members can act on it."""
        assert g.handle is not None
        kind, _ = split_target(g.spec.target)
        sigs = [sig] if not also_continue or sig is Signals.SIGCONT else [sig, Signals.SIGCONT]
        try:
            n = await g.handle.send_signals(sigs)
        except TetherError:
            self.lc.hooks.signal_sent(kind, sig.name, "error")
            raise
        self.lc.hooks.signal_sent(kind, sig.name, "sent" if n else "already_gone")
        return n

    async def escalate(self) -> None:
        """Second SIGINT: SIGKILL every live `kill`-policy group now."""
        for g in self.lc.table:
            if g.handle is not None and not g.state.ended \
                    and g.spec.orphan_policy is OrphanPolicy.KILL:
                try:
                    await g.handle.kill()
                except TetherError as exc:
                    g.log.error("escalation: %s", exc)

    # ------------------------------------------------------------ stop

    def begin(self, g: Group, override: StopOverride | None, requested_at: float,
              detail: str = "", from_start: bool = False) -> asyncio.Task[None]:
        if g.stop_task is None:
            g.stop_requested.set()
            g.stop_task = self.lc.tasks.spawn(
                self._run(g, override, requested_at, detail, from_start), f"stop-{g.group_id}")
        return g.stop_task

    async def stop(self, group_id: str, override: StopOverride | None = None,
                   requested_at: float | None = None) -> GroupView:
        """Stop one group; see the module docstring."""
        g = self.lc.table.find(group_id)
        if not g.state.ended:
            t0 = time.monotonic() if requested_at is None else requested_at
            await asyncio.shield(self.begin(g, override, t0))
        return g.view()

    async def stop_many(self, stops: Iterable[tuple[str, StopOverride | None]],
                        requested_at: float | None = None
                        ) -> tuple[list[GroupView], dict[str, str]]:
        """Stop a batch together, with one grace clock, without a waiting task per group.
        Returns the views, and for ids this agent does not know, why; such an id is
        remembered, so a spawn of it that arrives later (a session stop racing a spawn in
        flight) is refused instead of started."""
        t0 = time.monotonic() if requested_at is None else requested_at
        wanted: list[Group] = []
        unknown: dict[str, str] = {}
        waits: list[asyncio.Task[None]] = []
        for gid, override in stops:
            try:
                g = self.lc.table.find(gid)
            except GroupNotFound as exc:
                unknown[gid] = str(exc)
                self.lc.table.bury(gid, "stopped by a session stop")
                continue
            wanted.append(g)
            if not g.state.ended:
                waits.append(self.begin(g, override, t0))
        if waits:
            # Like stop()'s shield: a caller that goes away leaves the stops running.
            await asyncio.wait(waits)
            for w in waits:
                w.result()
        return [g.view() for g in wanted], unknown

    async def _run(self, g: Group, override: StopOverride | None, t0: float, detail: str,
                   from_start: bool) -> None:
        self._running += 1
        self._idle.clear()
        try:
            if not from_start and g.start_task is not None and not g.start_task.done():
                # The start sees the request and hands over (or ends failed on its own).
                await asyncio.shield(g.start_task)
            if not g.state.ended:
                await self._stop_group(g, (override or StopOverride()).apply(g.policy), t0,
                                       detail)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def _stop_group(self, g: Group, policy: StopPolicy, t0: float, detail: str) -> None:
        h = g.handle
        self.lc.transition(g, Transition.STOP)
        if h is None:  # stopped before anything ran
            between = "stopped while waiting to restart: no run was alive" if g.runs else ""
            g.exit = ExitRecord(ExitReason.REQUESTED, ended_at=time.time(),
                                stop_duration=max(0.0, time.monotonic() - t0),
                                detail=detail or between or "stopped before it started: nothing ran")
            g.empty.set()
            self.lc.transition(g, Transition.EMPTY)
            self.lc.hooks.cleanup("success", g.exit.stop_duration)
            return
        g.log.debug("stopping: %s, grace %g s", policy.signal.name, policy.grace)
        result = "success"
        notes = [detail] if detail else []
        try:
            g.signals_sent.add(int(policy.signal))
            sent = await self.send(g, policy.signal, also_continue=True)
            if sent == 0 and await h.wait(0):
                reason = ExitReason.NATURAL
            elif await h.wait(max(0.0, t0 + policy.grace - time.monotonic())):
                reason = ExitReason.REQUESTED
            else:
                # Kill first, then say so: a batch reaching its grace together kills every
                # group before any log line is written.
                reason = ExitReason.FORCED_KILL
                result = "forced"
                await h.kill()
                g.log.warning("members ignored %s for %g s; sent SIGKILL to every member",
                              policy.signal.name, policy.grace)
                self.lc.hooks.signal_sent(split_target(g.spec.target)[0], "SIGKILL", "sent")
            survivors = len(await h.members())
        except TetherError as exc:
            # The target went away mid-stop (container removed, host unreachable).
            reason, survivors, result = ExitReason.LOST, 0, "failed"
            notes.append(f"not verified: {exc}")
            g.log.error("stop could not be verified: %s", exc)
        if survivors:
            result = "failed"
            g.log.error("%d member(s) survived the stop", survivors)
        # The stop took until the containment was seen empty (local cgroups say when), not
        # until this task got its turn to write the record.
        emptied_at = None if survivors else h.emptied_at
        status = await leader_status(h)
        duration = max(0.0, (emptied_at or time.monotonic()) - t0)
        if h.detail:
            notes.append(h.detail)
        g.exit = ExitRecord(reason, exit_code=status.exit_code, signal=status.signal,
                            survivors=survivors, stop_duration=duration, ended_at=time.time(),
                            detail="; ".join(notes))
        g.empty.set()
        self.lc.transition(g, Transition.EMPTY)
        self.lc.hooks.cleanup(result, duration)
        try:
            await h.close()
        except TetherError as exc:
            g.log.warning("closing its handle: %s", exc)


    # ------------------------------------------------------------ ending one run (restarts)

    async def end_run(self, g: Group, override: StopOverride | None) -> str:
        """Steps 2-4 of the stop routine for the current run of a group that lives on (a
        restart request, an unhealthy group): the stop signal plus SIGCONT to every member,
        wait up to the grace, SIGKILL every member. No state changes here: the watcher sees
        the containment empty and the supervisor starts the next run. A stop requested
        meanwhile takes over and wins (it signals and kills the same members). Returns why
        the run could not be ended ("" when it was signalled)."""
        h = g.handle
        if h is None or g.state is not GroupState.RUNNING or g.stop_requested.is_set():
            return ""
        policy = (override or StopOverride()).apply(g.policy)
        t0 = time.monotonic()
        try:
            g.signals_sent.add(int(policy.signal))
            await self.send(g, policy.signal, also_continue=True)
            if not await h.wait(max(0.0, t0 + policy.grace - time.monotonic())) \
                    and g.handle is h and not g.stop_requested.is_set():
                g.signals_sent.add(int(Signals.SIGKILL))
                await h.kill()
                g.log.warning("members ignored %s for %g s; sent SIGKILL to every member to "
                              "restart it", policy.signal.name, policy.grace)
                self.lc.hooks.signal_sent(split_target(g.spec.target)[0], "SIGKILL", "sent")
        except TetherError as exc:
            g.log.error("could not end its run for a restart: %s", exc)
            return str(exc)
        return ""
