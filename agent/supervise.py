"""Supervision of running groups: restarts (policy, requests, backoff, a limit) and liveness.

Restarts. A restart is a state of the lifecycle table, ``restarting``, never "exited,
then running again" behind the table's back:

* A run ends on its own (the watcher saw its containment empty). Without a reason to
  restart (``--restart no``, or ``on-failure`` and it exited 0), or with a stop
  requested, the group ends ``exited`` exactly as before.
* Otherwise the run is kept in ``runs`` (reason, exit code or signal, duration), the
  group goes ``running -> restarting``, and a task the authority owns waits out the
  backoff and starts the next run through ``Starter.relaunch``: the same id, spec and
  markers, the same launch and readiness probe (a new cgroup at the same path: the
  last run's was empty and removed). Ready: ``restarting -> running``.
* A stop wins at every step: the backoff races the stop request (the group ends
  ``stopped`` at once, "stopped while waiting to restart"); a stop during the next
  run's start takes it over as it takes over any start; a run never starts once a
  stop was requested.
* Automatic restarts (the policy, an unhealthy group) count against ``--restart-max``
  within ``--restart-window``: the run that would need one more ends the group
  ``failed`` with a ``restart_limit`` record. A restart's start that fails (readiness,
  a crash before ready) is a run too: kept, counted, and retried until the limit;
  under ``--restart no`` (a requested restart) it surfaces as a failed start.
  Requested restarts (``tether restart``) skip the backoff and are not limited.
* Backoff: ``RESTART_BACKOFF_FIRST`` doubled per run in a row shorter than
  ``RESTART_STABLE_AFTER``, capped at ``RESTART_BACKOFF_MAX``, with jitter; a stable
  run starts it over.

Liveness. One task per group with ``--live`` (nothing at all for the others), cheap
because 1000 of them must be: checks fall due on a grid shared by every group (so the
loop wakes once per tick, not once per check), the first at a random point of the
first interval (so groups started together are spread over the ticks). Each check is
one probe attempt awaited directly, on the event loop (tcp, http: bounded by their
own timeout) or as a contained tree through the signaller (exec: killed at its
timeout, and guarded besides); checks of one group never overlap, and the task is
cancelled when its group leaves ``running`` for good, a check in flight with it.
Checks count only while the group is ``running`` (a restart's readiness probe decides
for a new run). ``failures`` failed checks in a row mark the group unhealthy (flag,
event, counter), and ``--on-unhealthy`` acts: ``none`` keeps it running (a passing
check clears the flag), ``restart`` ends the run and starts another (an automatic
restart), ``stop`` stops it.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import replace
from typing import Any

from tether.agent.groups import Group
from tether.agent.lifecycle import Lifecycle
from tether.agent.probes import ProbeAttempt, Prober
from tether.agent.start import Starter
from tether.agent.stop import Stopper
from tether.core.errors import Conflict, TetherError
from tether.core.model import (
    RESTART_STABLE_AFTER,
    EventKind,
    ExitReason,
    ExitRecord,
    FailureClass,
    GroupState,
    GroupView,
    Liveness,
    ProbeKind,
    RestartMode,
    RunRecord,
    StopOverride,
    Transition,
    UnhealthyAction,
    restart_delay,
)
from tether.signallers.base import GroupHandle

#: A check that has not answered this long after its probe's own timeout counts as failed.
CHECK_SLACK = 2.0
#: Liveness checks are due on a grid of this many seconds (or a tenth of the interval).
LIVE_TICK = 1.0
REQUESTED = "requested"
UNHEALTHY = "unhealthy"


class Supervisor:
    def __init__(self, lc: Lifecycle, starter: Starter, stopper: Stopper) -> None:
        self.lc = lc
        self.starter = starter
        self.stopper = stopper
        lc.restart_failed = self._attempt_failed

    # ------------------------------------------------------------ following a group

    def follow(self, g: Group) -> None:
        """A run's handle was attached (a start, a restart, a re-adoption): liveness checks
        for groups that asked for them, one task per group for its whole life."""
        if g.spec.liveness is not None and (g.live_task is None or g.live_task.done()):
            g.live_task = self.lc.tasks.spawn(self._live(g, g.spec.liveness),
                                              f"live-{g.group_id}")

    # ------------------------------------------------------------ a run ended

    def run_ended(self, g: Group, record: ExitRecord) -> bool:
        """The watcher saw the current run end on its own. True: another run starts (the
        group is ``restarting`` or, at the limit, ``failed``); False: it ends ``exited``."""
        if g.stop_requested.is_set():
            return False
        reason = g.restart_reason or self._policy_reason(g, record)
        if not reason:
            return False
        g.restart_reason = ""
        self._keep_run(g, record, reason)
        if reason != REQUESTED and self._limit_reached(g):
            self._give_up(g, record)
        else:
            self._schedule(g, reason, immediate=reason == REQUESTED)
        return True

    def _policy_reason(self, g: Group, record: ExitRecord) -> str:
        if g.adopted or not g.spec.restart.wants(record):
            return ""
        return "exited" if record.exit_code == 0 and record.signal is None else "failed"

    def _attempt_failed(self, g: Group, record: ExitRecord) -> None:
        """A restart's start failed (``Lifecycle.fail`` while ``restarting``): the attempt is
        a run of its own; try again after a backoff, or give up at the limit."""
        self._keep_run(g, record, "start_failed")
        if g.restart_cycle is not None and not g.restart_cycle.done():
            g.restart_cycle.set_result(None)  # a requester learns this attempt failed
        if g.stop_requested.is_set():
            # The stop takes over: nothing runs, its record says so. The failed attempt's
            # handle goes (unless members survived: the stop must end them), so the stop
            # records a requested end between runs, not the attempt's leftovers as a
            # "natural" exit.
            if not record.survivors and g.handle is not None:
                h, g.handle = g.handle, None
                self.lc.tasks.spawn(_close(g, h), f"close-{g.group_id}")
            return
        live = g.spec.liveness
        retries = g.spec.restart.mode is not RestartMode.NO or (
            live is not None and live.on_unhealthy is UnhealthyAction.RESTART)
        if record.survivors:
            self._give_up(g, record, f"its last start left {record.survivors} member(s) that "
                          "SIGKILL did not end; no new run is started beside them",
                          ExitReason.START_FAILED)
        elif not retries:  # --restart no: a failed start surfaces, as a first start's does
            self._give_up(g, record, f"its restart did not start: {record.message}",
                          ExitReason.START_FAILED)
        elif self._limit_reached(g):
            self._give_up(g, record)
        else:
            self._schedule(g, "start_failed", immediate=False)

    def _keep_run(self, g: Group, record: ExitRecord, reason: str) -> None:
        if reason in (REQUESTED, UNHEALTHY):
            why = "a restart was requested" if reason == REQUESTED else \
                f"it was unhealthy ({g.health})"
            record = replace(record, detail="; ".join(
                x for x in (record.detail, f"ended to restart it: {why}") if x))
        g.runs.append(RunRecord(g.run_started_at, record))
        self.lc.outputs.end_run(g, record)
        if reason != REQUESTED:
            stable = record.ended_at - g.run_started_at >= RESTART_STABLE_AFTER
            g.unstable_runs = 0 if stable else g.unstable_runs + 1

    def _limit_reached(self, g: Group) -> bool:
        policy = g.spec.restart
        horizon = time.monotonic() - policy.window
        while g.auto_restarts and g.auto_restarts[0] < horizon:
            g.auto_restarts.popleft()
        return len(g.auto_restarts) >= policy.limit

    def _schedule(self, g: Group, reason: str, immediate: bool) -> None:
        """Leave the ended run behind and start the next one from an owned task."""
        old, g.handle = g.handle, None
        g.unhealthy, g.health = False, ""
        g.restart_now.clear()  # a request made during the last attempt was that attempt
        delay = 0.0 if immediate else restart_delay(g.unstable_runs - 1, random.random())
        g.next_restart_at = time.time() + delay if delay else 0.0
        self._cycle(g)
        if g.state is GroupState.RUNNING:
            self.lc.transition(g, Transition.RUN_ENDED)
        else:
            self.lc.emit(g, EventKind.STATE)  # another attempt: still restarting, runs grew
        last = g.runs[-1].exit if g.runs else None
        g.log.info("run ended (%s%s); restarting%s", reason,
                   f", {_how(last)}" if last is not None else "",
                   f" in {delay:.2f} s" if delay else " now")
        g.start_task = self.lc.tasks.spawn(self._restart(g, old, reason, delay),
                                           f"restart-{g.group_id}")

    async def _restart(self, g: Group, old: GroupHandle | None, reason: str,
                       delay: float) -> None:
        try:
            if old is not None:
                try:
                    await old.close()  # the ended run's cgroup goes; the next gets a new one
                except TetherError as exc:
                    g.log.warning("closing the ended run's handle: %s", exc)
            if delay and await self._pause(g, delay):
                return  # a stop came: it ends the group, nothing more starts
            g.restart_now.clear()
            g.next_restart_at = 0.0
            if g.stop_requested.is_set() or g.state is not GroupState.RESTARTING:
                return
            g.restarts += 1
            g.restart_error = ""  # a new run: an earlier failed attempt's reason is history
            if reason != REQUESTED:
                g.auto_restarts.append(time.monotonic())
            self.lc.hooks.restarted(reason)
            await self.starter.relaunch(g)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever it was, the group must end with a record
            g.log.exception("restart failed unexpectedly")
            if g.state is GroupState.RESTARTING and g.handle is None \
                    and not g.stop_requested.is_set():
                self._give_up(g, None, f"the restart failed unexpectedly: {exc}",
                              ExitReason.START_FAILED)
        finally:
            if g.state is not GroupState.RESTARTING and g.restart_cycle is not None \
                    and not g.restart_cycle.done():
                g.restart_cycle.set_result(None)

    async def _pause(self, g: Group, delay: float) -> bool:
        """Wait out a backoff; True if a stop was requested meanwhile (it wins at once). A
        restart request cuts the wait short."""
        stop = asyncio.ensure_future(g.stop_requested.wait())
        now = asyncio.ensure_future(g.restart_now.wait())
        try:
            await asyncio.wait({stop, now}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stop, now):
                t.cancel()
            await asyncio.gather(stop, now, return_exceptions=True)
        return g.stop_requested.is_set()

    def _give_up(self, g: Group, last: ExitRecord | None, why: str = "",
                 reason: ExitReason = ExitReason.RESTART_LIMIT) -> None:
        """End the group ``failed``: the restart limit was reached (or no new run can
        start beside survivors, or the restart broke)."""
        policy = g.spec.restart
        if not why:
            why = (f"{g.spec.argv[0]!r} was restarted {len(g.auto_restarts)} time(s) within "
                   f"{policy.window:g} s and ended again ({_how(last)}); the limit is "
                   f"--restart-max {policy.limit} --restart-window {policy.window:g}. Not "
                   "restarting it: see its runs and log, fix it, then spawn it again")
        g.log.warning("giving up: %s", why)
        h = g.handle
        g.next_restart_at = 0.0
        g.exit = ExitRecord(reason, exit_code=last.exit_code if last else None,
                            signal=last.signal if last else None,
                            survivors=last.survivors if last else 0,
                            failure=(last.failure if last else None) or (
                                None if reason is ExitReason.RESTART_LIMIT
                                else FailureClass.IMMEDIATE_CRASH), message=why,
                            ended_at=time.time(), detail=last.detail if last else "")
        g.empty.set()
        self.lc.transition(g, Transition.GIVE_UP)
        if g.restart_cycle is not None and not g.restart_cycle.done():
            g.restart_cycle.set_result(None)
        if h is not None:
            self.lc.tasks.spawn(_close(g, h), f"close-{g.group_id}")

    # ------------------------------------------------------------ restart requests

    async def restart(self, g: Group, override: StopOverride | None) -> GroupView:
        """End the current run (its stop policy, or ``override``) and start another at once.
        A restart already under way is joined (two requests, one restart); one waiting out
        a backoff starts now. Returns once the group runs again, or has ended (a stop
        requested meanwhile wins)."""
        if g.adopted or g.spec.adopted:
            raise Conflict(f"group {g.group_id} was adopted: tether did not start it and "
                           "cannot start it again; stop it, then spawn the command yourself")
        if g.state.ended or g.stop_requested.is_set():
            what = g.state.value if g.state.ended else "being stopped"
            raise Conflict(f"group {g.group_id} is {what}: ended groups are final; start it "
                           "again with `tether spawn` (nothing was restarted)")
        if g.state is GroupState.STARTING:
            raise Conflict(f"group {g.group_id} is still starting; restart it once it runs "
                           "(nothing was restarted)")
        before = g.restarts
        cycle = self._cycle(g)
        if g.state is GroupState.RESTARTING:
            g.restart_now.set()
        elif not g.restart_reason:
            g.log.info("restart requested: ending its run")
            self._end_run(g, REQUESTED, override)
        ended = asyncio.ensure_future(g.ended.wait())
        waits: set[asyncio.Future[Any]] = {cycle, ended}
        try:
            # Not cancelled with the caller: the restart goes on (owned tasks) if it leaves.
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if g.state is GroupState.RUNNING and g.restart_error and g.restarts == before:
            # (Not the count alone: a request that joined a restart already counted, one
            # relaunching, finds the count it saw once that run is up.)
            raise Conflict(f"group {g.group_id} could not be restarted: its run could not be "
                           f"ended ({g.restart_error or 'see the agent log'}); it still runs")
        return g.view()

    @staticmethod
    def _cycle(g: Group) -> asyncio.Future[None]:
        if g.restart_cycle is None or g.restart_cycle.done():
            g.restart_cycle = asyncio.get_running_loop().create_future()
        return g.restart_cycle

    def _end_run(self, g: Group, reason: str, override: StopOverride | None) -> None:
        """End the current run for a restart (from an owned task); the watcher then sees it
        end and ``run_ended`` starts the next one."""
        g.restart_reason = reason
        g.restart_error = ""
        cycle = self._cycle(g)

        async def end() -> None:
            error = await self.stopper.end_run(g, override)
            if error and g.state is GroupState.RUNNING and g.restart_reason == reason:
                g.restart_reason, g.restart_error = "", error
                if not cycle.done():
                    cycle.set_result(None)

        self.lc.tasks.spawn(end(), f"end-run-{g.group_id}")

    # ------------------------------------------------------------ liveness

    async def _live(self, g: Group, live: Liveness) -> None:
        """The checks of one group, for its whole life. Cheap on purpose (1000 groups
        checked every 10 s must cost little): one sleep per check and the attempt itself,
        no helper tasks; the task is cancelled when the group leaves ``running`` for good
        (``Lifecycle.transition``), which also ends a check in flight."""
        if live.probe.template:  # tcp:$PORT: the port the agent assigned at spawn
            live = replace(live, probe=live.probe.resolve(g.context.port_env(), "live"))
        prober = Prober(live.probe, "", self.starter.live_runner(g))
        limit = live.probe.timeout + CHECK_SLACK
        loop = asyncio.get_running_loop()
        tick = min(LIVE_TICK, live.interval / 10)
        failures = 0
        due = loop.time() + live.interval * (0.5 + random.random())
        while not g.state.ended and not g.stop_requested.is_set():
            # Checks fall due on a shared grid (tick: at most a tenth of the interval): the
            # loop wakes once for every group due then, not once per group. On a VM a wake-up
            # costs several times a loopback connect.
            due = math.ceil(max(due, loop.time()) / tick) * tick
            await asyncio.sleep(due - loop.time())
            due += live.interval  # a slow check delays the next one, never overlaps it
            if g.state is not GroupState.RUNNING or g.restart_reason \
                    or g.stop_requested.is_set():
                failures = 0  # between runs or being restarted: the next run's readiness decides
                continue
            run = g.restarts
            attempt = await self._check(g, prober, live, limit)
            if g.state is not GroupState.RUNNING or g.restarts != run or g.restart_reason \
                    or g.stop_requested.is_set():
                failures = 0
                continue
            if attempt.ok:
                failures = 0
                g.health = ""
                if g.unhealthy:
                    g.unhealthy = False
                    g.log.info("healthy again: a liveness check passed")
                    self.lc.emit(g, EventKind.HEALTHY)
                continue
            failures += 1
            g.health = attempt.detail
            if failures >= live.failures and not g.unhealthy:
                self._unhealthy(g, live, failures)

    @staticmethod
    async def _check(g: Group, prober: Prober, live: Liveness, limit: float) -> ProbeAttempt:
        """One probe attempt, bounded in time: a hung probe is cancelled (an exec probe's
        tree is killed by its runner either way). tcp: and http: attempts bound themselves
        (their own timeout); an exec launch through a signaller gets this guard too.
        Whatever one check raises is that check failing, logged: the group's liveness task
        must outlive any answer the checked service can give."""
        try:
            if live.probe.kind is not ProbeKind.EXEC:
                return await prober.attempt()
            async with asyncio.timeout(limit):
                return await prober.attempt()
        except TimeoutError:
            return ProbeAttempt(False, detail=f"{live.probe.shown} did not answer within {limit:g} s")
        except TetherError as exc:
            return ProbeAttempt(False, detail=f"{live.probe.shown}: the check failed: {exc}")
        except Exception as exc:
            g.log.exception("liveness check %s failed unexpectedly; counted as a failed check",
                            live.probe.shown)
            return ProbeAttempt(False, detail=f"{live.probe.shown}: the check failed "
                                f"unexpectedly: {type(exc).__name__}: {exc}"[:500])

    def _unhealthy(self, g: Group, live: Liveness, failures: int) -> None:
        g.unhealthy = True
        action = live.on_unhealthy
        g.log.warning("unhealthy: %d liveness checks in a row failed (%s); on-unhealthy %s",
                      failures, g.health, action.value)
        self.lc.hooks.became_unhealthy()
        self.lc.emit(g, EventKind.UNHEALTHY)
        if action is UnhealthyAction.RESTART:
            self._end_run(g, UNHEALTHY, None)
        elif action is UnhealthyAction.STOP:
            self.stopper.begin(g, None, time.monotonic(),
                               f"stopped because it was unhealthy: {failures} liveness checks "
                               f"in a row failed ({g.health})")


def _how(rec: ExitRecord | None) -> str:
    if rec is None:
        return "status unknown"
    if rec.failure is not None:
        return f"start failed: {rec.failure.value}"
    if rec.signal is not None:
        return f"killed by signal {rec.signal}"
    if rec.exit_code is not None:
        return f"exit code {rec.exit_code}"
    return rec.reason.value


async def _close(g: Group, h: GroupHandle) -> None:
    try:
        await h.close()
    except TetherError as exc:
        g.log.warning("closing its handle: %s", exc)
