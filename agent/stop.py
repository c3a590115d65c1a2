"""Stopping and signalling groups: the one cancellation-safe stop routine.

1. Mark stopping (a start in progress hands over: its probes are killed).
   A group with a pre-stop hook runs it now, inside the grace (its own timeout,
   the grace's end at the latest; its whole tree is killed then), and its outcome
   goes into the record. A ``--stdin pipe`` group then has its stdin closed and
   gets up to ``--stop-stdin-grace`` to end by itself (the MCP stdio shutdown
   convention); that time is added to the grace that follows.
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
from dataclasses import replace

from tether.agent.groups import Group
from tether.agent.lifecycle import Lifecycle, build_launch, dispose, leader_status
from tether.core.errors import GroupNotFound, StartFailed, TetherError
from tether.core.model import (
    MARKER_ENV,
    ExitReason,
    ExitRecord,
    GroupState,
    GroupView,
    Limits,
    OrphanPolicy,
    PreStopOutcome,
    PreStopResult,
    SignalOutcome,
    StdinMode,
    StopOverride,
    StopPolicy,
    Transition,
)
from tether.signallers.base import GroupHandle
from tether.signallers.registry import split_target

Signals = signal.Signals


class StopFailed(TetherError):
    """A stop could not run to its end (the agent ran out of something); retry it."""

    def __init__(self, group_id: str, cause: BaseException) -> None:
        super().__init__(f"stopping group {group_id} failed before it finished ({cause}); "
                         "it is still stopping: ask again (the coordinator retries by itself)")
        self.group_id = group_id


class Stopper:
    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: Pre-stop hooks running now (a second SIGINT kills them with the groups).
        self._hooks: set[GroupHandle] = set()

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
        """Second SIGINT: SIGKILL every live `kill`-policy group (and pre-stop hook) now."""
        for hook in list(self._hooks):
            try:
                await hook.kill()
            except TetherError as exc:
                self.lc.log.error("escalation: pre-stop hook: %s", exc)
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
        except Exception as exc:
            # Not a stop that could not be verified (that ends with a record): the stop
            # itself could not run (EMFILE...). The group stays `stopping`, the caller is
            # told, and the next stop request tries again from the start.
            g.log.error("the stop failed before it finished (%s); it is retried on the next "
                        "stop request", exc)
            raise StopFailed(g.group_id, exc) from exc
        finally:
            if g.stop_task is asyncio.current_task() and not g.state.ended:
                g.stop_task = None  # a failed stop is not cached: the next one runs anew
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def _stop_group(self, g: Group, policy: StopPolicy, t0: float, detail: str) -> None:
        h = g.handle
        if g.state is not GroupState.STOPPING:  # a retried stop is already there
            self.lc.transition(g, Transition.STOP)
        if h is None:  # stopped before anything ran
            between = "stopped while waiting to restart: no run was alive" if g.runs else ""
            skipped = None
            if g.spec.pre_stop is not None:
                skipped = PreStopOutcome(PreStopResult.SKIPPED,
                                         detail="no run was alive: nothing to prepare")
            g.exit = ExitRecord(ExitReason.REQUESTED, ended_at=time.time(),
                                stop_duration=max(0.0, time.monotonic() - t0),
                                detail=detail or between
                                or "stopped before it started: nothing ran",
                                pre_stop=skipped)
            g.empty.set()
            self.lc.transition(g, Transition.EMPTY)
            self.lc.hooks.cleanup("success", g.exit.stop_duration)
            return
        g.log.debug("stopping: %s, grace %g s", policy.signal.name, policy.grace)
        result = "success"
        notes = [detail] if detail else []
        pre_stop = None
        oom = 0
        try:
            if g.spec.pre_stop is not None:
                pre_stop = await self._pre_stop(g, h, t0, policy)
                self.lc.hooks.pre_stop(pre_stop.result.value)
            step = await self._close_stdin_first(g, h)
            if step is not None:
                ended, took = step
                notes.append(f"its stdin was closed first; it ended within {took:.2f} s"
                             if ended else f"its stdin was closed first; it still ran "
                             f"after {took:.3g} s (--stop-stdin-grace)")
                t0 += took  # the stop signal gets its whole grace
            if step is not None and step[0]:
                reason = ExitReason.REQUESTED
            elif await self._signal_stop(g, policy) == 0 and await h.wait(0):
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
            oom = await h.oom_kills()
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
                            detail="; ".join(notes), pre_stop=pre_stop, oom_kills=oom)
        g.empty.set()
        self.lc.transition(g, Transition.EMPTY)
        self.lc.hooks.cleanup(result, duration)
        try:
            await h.close()
        except TetherError as exc:
            g.log.warning("closing its handle: %s", exc)

    async def _signal_stop(self, g: Group, policy: StopPolicy) -> int:
        g.signals_sent.add(int(policy.signal))
        return await self.send(g, policy.signal, also_continue=True)

    async def _close_stdin_first(self, g: Group, h: GroupHandle) -> tuple[bool, float] | None:
        """The first step for a ``--stdin pipe`` group (the MCP stdio convention): close its
        stdin and wait up to ``--stop-stdin-grace`` for it to end by itself. Returns
        (ended, seconds taken), or None when there was no open stdin to close."""
        stdio = g.stdio
        if g.spec.stdin is not StdinMode.PIPE or stdio is None or not stdio.stdin_open:
            return None
        begun = time.monotonic()
        stdio.close_stdin()
        grace = g.spec.stdin_grace
        ended = await h.wait(grace) if grace > 0 else await h.wait(0)
        return ended, time.monotonic() - begun

    async def _pre_stop(self, g: Group, h: GroupHandle, t0: float,
                        policy: StopPolicy) -> PreStopOutcome:
        """Run the group's pre-stop hook on its target, as its own contained tree, with the
        group's environment and user; killed whole at its timeout or the grace's end,
        whichever comes first, and whatever it left behind (a daemon it forked) with it."""
        hook = g.spec.pre_stop
        assert hook is not None
        begun = time.monotonic()
        if not await h.members():
            return PreStopOutcome(PreStopResult.SKIPPED,
                                  detail="the group had already ended: nothing to prepare")
        left = t0 + policy.grace - begun
        timeout = left if hook.timeout is None else min(hook.timeout, left)
        bound = ("its timeout" if hook.timeout is not None and hook.timeout <= left
                 else "the end of the grace")
        if timeout <= 0:
            return PreStopOutcome(PreStopResult.TIMEOUT,
                                  detail="no time was left in the grace; it did not run")
        kind, where = split_target(g.spec.target)
        if g.launch is None and g.spec.user and g.user is None:
            return PreStopOutcome(PreStopResult.ERROR,
                                  detail=f"not run: user {g.spec.user!r} could not be resolved "
                                         "after the agent restarted")
        base = g.launch or build_launch(self.lc.marker, g.group_id, g.spec, where, g.user,
                                        g.context)
        hook_id = f"{g.group_id}.prestop"
        # Always a kill-policy tree: a hook must not outlive an agent that dies meanwhile.
        launch = replace(base, group_id=hook_id, argv=hook.argv, limits=Limits(),
                         env={**base.env, MARKER_ENV: hook_id},
                         orphan_policy=OrphanPolicy.KILL, capture=False, stdin=StdinMode.NULL)
        try:
            handle = await self.lc.signallers.get(kind).spawn(launch)
        except StartFailed as exc:
            return PreStopOutcome(PreStopResult.ERROR, duration=time.monotonic() - begun,
                                  detail=f"could not start: {exc.message}")
        except TetherError as exc:
            return PreStopOutcome(PreStopResult.ERROR, duration=time.monotonic() - begun,
                                  detail=f"could not start: {exc}")
        status = None
        leftovers = 0
        self._hooks.add(handle)
        try:
            async with asyncio.timeout(timeout):
                status = await handle.wait_leader()
            leftovers = len(await handle.members())
        except TimeoutError:
            pass
        except TetherError as exc:
            g.log.warning("pre-stop hook: %s", exc)
        finally:
            # Its whole tree goes, whatever happened (cancellation included).
            self._hooks.discard(handle)
            await asyncio.shield(dispose(handle))
        took = time.monotonic() - begun
        behind = (f"; it left {leftovers} process(es) behind, killed with its tree"
                  if leftovers else "")
        if status is None:
            g.log.warning("pre-stop hook %s still ran at %s (%g s); its tree was killed",
                          hook, bound, timeout)
            return PreStopOutcome(PreStopResult.TIMEOUT, duration=took,
                                  detail=f"still running at {bound} ({timeout:.3g} s); its "
                                         "whole tree was killed")
        if status.exit_code is None and status.signal is None:
            return PreStopOutcome(PreStopResult.EXITED, None, None, took,
                                  "it ran to its end; this target does not report exit codes"
                                  + behind, leftovers)
        ok = status.exit_code == 0
        if not ok:
            g.log.warning("pre-stop hook %s: %s", hook, status.describe())
        return PreStopOutcome(PreStopResult.OK if ok else PreStopResult.FAILED,
                              status.exit_code, status.signal, took,
                              status.describe() + behind, leftovers)


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
            step = await self._close_stdin_first(g, h)
            if step is not None and step[0]:
                return ""  # it ended: the watcher sees it and the next run starts
            t0 += step[1] if step is not None else 0.0
            if g.handle is not h or g.stop_requested.is_set():
                return ""
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
