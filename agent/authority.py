"""The authority: the agent's registry of groups and the one routine that stops them.

Every group is started, watched, signalled and stopped here, through a
signaller's ``GroupHandle``; this module never branches on the kind of
target. States change only through ``model.next_state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from tether.agent.errors import GroupNotFound, InvalidSpec, StartFailed, TetherError
from tether.agent.model import (
    AGENT_ENV,
    MARKER_ENV,
    Containment,
    ExitReason,
    ExitRecord,
    FailureClass,
    GroupSpec,
    GroupState,
    LeaderStatus,
    OrphanPolicy,
    ProbeKind,
    StopPolicy,
    Transition,
    next_state,
)
from tether.agent.readiness import Prober, port_in_use
from tether.agent.tasks import TaskSet
from tether.signallers.base import GroupHandle, LaunchSpec
from tether.signallers.registry import Signallers, split_target

log = logging.getLogger("tether.agent")
Signals = signal.Signals

LEADER_STATUS_WAIT = 1.0


@dataclass(frozen=True)
class GroupView:
    """A snapshot of one group, as clients see it."""

    group_id: str
    spec: GroupSpec
    state: GroupState
    containment: Containment
    leader_pid: int = 0
    pgid: int = 0
    detached: bool = False
    exit: ExitRecord | None = None
    started_at: float = 0.0
    member_count: int = 0
    leader_start_time: float = 0.0
    cgroup: str = ""
    #: Encodings of the (immutable) spec, shared by every view of one group: the transport
    #: and the state file encode a spec once, not on every state change.
    encoded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class GroupEvent:
    seq: int
    kind: str  # "state", "detached", "exit"
    group: GroupView
    at: float


@dataclass(frozen=True)
class SignalOutcome:
    members_signalled: int
    already_gone: bool
    group: GroupView


class Group:
    """Mutable record of one group, owned by the Authority."""

    def __init__(self, group_id: str, spec: GroupSpec, containment: Containment) -> None:
        self.group_id = group_id
        self.spec = spec
        self.state = GroupState.STARTING
        self.containment = containment
        self.handle: GroupHandle | None = None
        self.exit: ExitRecord | None = None
        self.started_at = time.time()
        self.detached = False
        self.stop_task: asyncio.Task[None] | None = None
        self.signals_sent: set[int] = set()
        self.handle_ready = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.empty = asyncio.Event()
        self.ended = asyncio.Event()
        self.log = logging.LoggerAdapter(log, {"group": group_id, "session": spec.session_id})
        self.encoded: dict[str, Any] = {}

    def __repr__(self) -> str:
        pid = self.handle.leader_pid if self.handle else "-"
        return f"<Group {self.group_id} {self.state.value} pid={pid} {self.containment.value}>"

    def view(self, member_count: int = 0) -> GroupView:
        h = self.handle
        cgroup = getattr(h, "cgroup", None)
        return GroupView(
            group_id=self.group_id,
            spec=self.spec,
            state=self.state,
            containment=self.containment,
            leader_pid=h.leader_pid if h else 0,
            pgid=h.pgid if h else 0,
            detached=self.detached,
            exit=self.exit,
            started_at=self.started_at,
            member_count=member_count,
            leader_start_time=h.leader_start_time if h else 0.0,
            cgroup=str(cgroup) if cgroup else "",
            encoded=self.encoded,
        )


class Hooks:
    """What the authority reports as it works (metrics, persistence). All no-ops here."""

    def cleanup(self, result: str, seconds: float) -> None: ...
    def signal_sent(self, signaller: str, sig: str, result: str) -> None: ...
    def start_failure(self, failure: str) -> None: ...
    def group_changed(self, view: GroupView) -> None: ...


@dataclass
class _Subscriber:
    accept: Callable[[GroupEvent], bool]
    # None ends the stream (shutdown); OVERFLOW ends it with an error.
    queue: asyncio.Queue[GroupEvent | str | None] = field(
        default_factory=lambda: asyncio.Queue(10000))


OVERFLOW = "overflow"


class Authority:
    """Spawns, adopts, watches, signals and stops the groups of one agent."""

    def __init__(self, name: str, signallers: Signallers, hooks: Hooks | None = None,
                 default_grace: float | None = None) -> None:
        self.name = name
        self.signallers = signallers
        self.hooks = hooks or Hooks()
        self.default_grace = default_grace
        self._groups: dict[str, Group] = {}
        self._idempotency: dict[str, str] = {}
        self._subscribers: list[_Subscriber] = []
        self._seq = 0
        self._tasks = TaskSet(log)
        self.log = logging.LoggerAdapter(log, {"agent": name})
        self._stops_running = 0
        self._no_stops = asyncio.Event()
        self._no_stops.set()

    async def no_stops_running(self) -> None:
        """Return once no stop is in progress (background work waits for a batch to end)."""
        await self._no_stops.wait()

    # ------------------------------------------------------------ plumbing

    def _emit(self, g: Group, kind: str) -> None:
        self._seq += 1
        view = g.view()
        event = GroupEvent(self._seq, kind, view, time.time())
        self.hooks.group_changed(view)
        for sub in list(self._subscribers):
            if sub.accept(event):
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    self._subscribers.remove(sub)
                    sub.queue.get_nowait()
                    sub.queue.put_nowait(OVERFLOW)

    def _transition(self, g: Group, event: Transition) -> None:
        old = g.state
        g.state = next_state(old, event)
        if g.state.ended and g.exit is not None and (
                g.exit.survivors or g.exit.reason is not ExitReason.REQUESTED):
            # A clean requested stop is the session's business (the coordinator logs the
            # session line); a 1000-group stop should not print 1000 lines.
            g.log.info("%s -> %s (%s%s)", old.value, g.state.value, g.exit.reason.value,
                       f", {g.exit.survivors} survivor(s)" if g.exit.survivors else "")
        else:
            g.log.debug("%s -> %s", old.value, g.state.value)
        if g.state.ended:
            g.ended.set()
        self._emit(g, "exit" if g.state.ended else "state")

    def _find(self, group_id: str) -> Group:
        try:
            return self._groups[group_id]
        except KeyError:
            raise GroupNotFound(group_id) from None

    def _signaller_for(self, target: str) -> tuple[Any, str]:
        kind, where = split_target(target)
        return self.signallers.get(kind), where

    def _policy(self, spec: GroupSpec) -> StopPolicy:
        if self.default_grace is not None and spec.stop == StopPolicy():
            return replace(spec.stop, grace=self.default_grace)
        return spec.stop

    # ------------------------------------------------------------ queries

    def get(self, group_id: str) -> GroupView:
        return self._find(group_id).view()

    def views(self, session_id: str = "", include_ended: bool = True) -> list[GroupView]:
        return [
            g.view() for g in self._groups.values()
            if (not session_id or g.spec.session_id == session_id)
            and (include_ended or not g.state.ended)
        ]

    def groups(self) -> Iterable[Group]:
        return self._groups.values()

    async def member_count(self, group_id: str) -> int:
        g = self._find(group_id)
        if g.handle is None or g.state.ended:
            return 0
        try:
            return len(await g.handle.members())
        except TetherError:
            return 0

    async def watch(self, accept: Callable[[GroupEvent], bool],
                    initial: Iterable[GroupView] = ()) -> AsyncIterator[GroupEvent]:
        sub = _Subscriber(accept)
        self._subscribers.append(sub)
        try:
            for view in initial:
                yield GroupEvent(self._seq, "initial", view, time.time())
            while True:
                event = await sub.queue.get()
                if event is None:
                    return
                if isinstance(event, str):
                    raise TetherError("watch stream fell more than 10000 events behind; reconnect")
                yield event
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(sub)

    # ------------------------------------------------------------ spawn

    def _launch_spec(self, group_id: str, spec: GroupSpec, where: str) -> LaunchSpec:
        env = dict(os.environ) if spec.inherit_env else {}
        env.update(spec.env)
        env[MARKER_ENV] = group_id
        env[AGENT_ENV] = self.name
        return LaunchSpec(group_id=group_id, argv=spec.argv, env=env, cwd=spec.cwd,
                          log_path=spec.log_path, where=where, owns_target=spec.owns_target)

    async def spawn(self, spec: GroupSpec, idempotency_key: str = "") -> GroupView:
        if idempotency_key and idempotency_key in self._idempotency:
            g = self._groups[self._idempotency[idempotency_key]]
            if g.spec.argv != spec.argv:
                raise InvalidSpec(
                    f"idempotency key {idempotency_key!r} was used for group {g.group_id} with "
                    "another command; use a new key for a new group", field="idempotency_key")
            await g.handle_ready.wait()
            return g.view()
        signaller, where = self._signaller_for(spec.target)
        if signaller.kind != "local":
            if spec.inherit_env:
                raise InvalidSpec(
                    f"--inherit-env copies this agent's environment; it is refused for target "
                    f"{spec.target!r}: pass what the remote command needs with --env",
                    field="inherit_env")
            if spec.ready is not None and spec.ready.kind is ProbeKind.LOG:
                raise InvalidSpec(
                    f"log: probes read the log on the agent's host, not inside {spec.target!r}; "
                    "use an exec: probe (it runs on the target)", field="ready")
        group_id = "g-" + secrets.token_hex(4)
        g = Group(group_id, spec, signaller.containment)
        self._groups[group_id] = g
        if idempotency_key:
            self._idempotency[idempotency_key] = group_id
        self._emit(g, "state")
        try:
            await self._start(g, signaller, where)
        finally:
            g.handle_ready.set()
        if g.stop_task is not None:
            await asyncio.shield(g.stop_task)
        return g.view()

    async def _start(self, g: Group, signaller: Any, where: str) -> None:
        spec = g.spec
        if spec.ready is not None and await port_in_use(spec.ready):
            self._fail(g, FailureClass.PORT_IN_USE,
                       f"port {spec.ready.port} on {spec.ready.host} is already in use before "
                       f"{spec.argv[0]!r} started; stop whatever listens there "
                       f"(`ss -ltnp 'sport = :{spec.ready.port}'`) or pick another port")
            return
        log_start = 0
        if spec.log_path:
            with contextlib.suppress(OSError):
                log_start = os.stat(spec.log_path).st_size
        try:
            g.handle = await signaller.spawn(self._launch_spec(g.group_id, spec, where))
        except StartFailed as exc:
            self._fail(g, exc.failure, exc.message)
            return
        except TetherError as exc:
            self._fail(g, FailureClass.TARGET_UNREACHABLE, str(exc))
            return
        g.log = logging.LoggerAdapter(log, {"group": g.group_id, "session": spec.session_id,
                                            "pid": g.handle.leader_pid})
        g.handle_ready.set()
        self._tasks.spawn(self._watch(g), f"watch-{g.group_id}")
        if spec.ready is None:
            self._transition(g, Transition.READY)
            return
        prober = Prober(spec.ready, spec.log_path, self._exec_probe_runner(g, signaller, where),
                        log_start)
        probe_task = asyncio.ensure_future(prober.run())
        empty_task = asyncio.ensure_future(g.empty.wait())
        stop_task = asyncio.ensure_future(g.stop_requested.wait())
        try:
            done, _ = await asyncio.wait({probe_task, empty_task, stop_task},
                                         timeout=spec.start_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (probe_task, empty_task, stop_task):
                t.cancel()
            await asyncio.gather(probe_task, empty_task, stop_task, return_exceptions=True)
        if g.state is not GroupState.STARTING:
            return  # a stop took over
        if probe_task in done and not probe_task.cancelled() and probe_task.exception() is None:
            self._transition(g, Transition.READY)
            return
        if empty_task in done:
            status = await self._leader_status(g.handle)
            self._fail(g, FailureClass.IMMEDIATE_CRASH,
                       f"{spec.argv[0]!r} exited before it was ready ({describe(status)}); "
                       f"see its log{' ' + spec.log_path if spec.log_path else ' (pass --log FILE)'}",
                       status)
            return
        failure = (FailureClass.READINESS_FAILED if prober.last.answered
                   else FailureClass.READINESS_TIMEOUT)
        await self._kill_for_failure(g)
        self._fail(g, failure,
                   f"{spec.argv[0]!r} was not ready within {spec.start_timeout:g} s "
                   f"(probe {spec.ready}: {prober.last.detail}); raise --start-timeout or fix "
                   "the probe")

    def _exec_probe_runner(self, g: Group, signaller: Any, where: str) -> Any:
        counter = 0

        async def run(argv: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
            nonlocal counter
            counter += 1
            launch = self._launch_spec(f"{g.group_id}.probe{counter}", replace(g.spec, argv=argv),
                                       where)
            try:
                handle: GroupHandle = await signaller.spawn(launch)
            except StartFailed as exc:
                return 127, f"exec probe could not start: {exc.message}"
            except TetherError as exc:
                return None, f"exec probe could not start: {exc}"
            try:
                async with asyncio.timeout(timeout):
                    status = await handle.wait_leader()
            except TimeoutError:
                return None, f"exec probe {argv[0]!r} timed out after {timeout:g} s; its tree was killed"
            finally:
                # The probe's whole tree dies with it, whatever happened (cancellation included).
                await asyncio.shield(self._dispose(handle))
            return (status.exit_code if status.exit_code is not None else 128 + (status.signal or 0),
                    f"exec probe exited with {describe(status)}")

        return run

    @staticmethod
    async def _dispose(handle: GroupHandle) -> None:
        await handle.kill()
        await handle.close()

    async def _kill_for_failure(self, g: Group) -> None:
        if g.handle is not None:
            await g.handle.kill()
            await g.handle.wait(1.0)

    def _fail(self, g: Group, failure: FailureClass, message: str,
              status: LeaderStatus | None = None) -> None:
        g.log.warning("start failed (%s): %s", failure.value, message)
        g.exit = ExitRecord(ExitReason.START_FAILED, exit_code=status.exit_code if status else None,
                            signal=status.signal if status else None, failure=failure,
                            message=message, ended_at=time.time())
        self.hooks.start_failure(failure.value)
        self._transition(g, Transition.START_FAILED)
        if g.handle is not None:
            self._tasks.spawn(self._finish_handle(g), f"close-{g.group_id}")

    async def _finish_handle(self, g: Group) -> None:
        assert g.handle is not None
        await g.handle.kill()
        survivors = len(await g.handle.members())
        if survivors and g.exit:
            g.exit = replace(g.exit, survivors=survivors)
        await g.handle.close()

    async def _leader_status(self, handle: GroupHandle) -> LeaderStatus:
        known = handle.leader_status
        if known is not None:
            return known
        try:
            async with asyncio.timeout(LEADER_STATUS_WAIT):
                return await handle.wait_leader()
        except TimeoutError:
            return LeaderStatus()

    # ------------------------------------------------------------ adopt

    async def adopt(self, pid: int, start_time: float | None, spec: GroupSpec) -> GroupView:
        signaller, where = self._signaller_for(spec.target)
        group_id = "g-" + secrets.token_hex(4)
        handle = await signaller.adopt(group_id, pid, start_time, where)
        g = Group(group_id, spec, handle.containment)
        g.handle = handle
        g.handle_ready.set()
        self._groups[group_id] = g
        self._emit(g, "state")
        self._transition(g, Transition.READY)
        self._tasks.spawn(self._watch(g), f"watch-{group_id}")
        return g.view()

    # ------------------------------------------------------------ restart recovery

    def restore_lost(self, group_id: str, spec: GroupSpec, containment: Containment,
                     detail: str) -> GroupView:
        """A group from the state file that vanished while no agent watched it."""
        g = Group(group_id, spec, containment)
        g.state = GroupState.RUNNING  # as it was recorded: loading, not a transition
        g.handle_ready.set()
        self._groups[group_id] = g
        g.exit = ExitRecord(ExitReason.LOST, ended_at=time.time(), detail=detail)
        self._transition(g, Transition.EXITED)
        return g.view()

    def restore_running(self, group_id: str, spec: GroupSpec, handle: GroupHandle) -> GroupView:
        """Re-adopt a `keep` group that survived the agent (PID and start time checked)."""
        g = Group(group_id, spec, handle.containment)
        g.state = GroupState.RUNNING  # as it was recorded: loading, not a transition
        g.handle = handle
        g.handle_ready.set()
        self._groups[group_id] = g
        g.log.info("re-adopted after agent restart (leader pid %d)", handle.leader_pid)
        self._emit(g, "state")
        self._tasks.spawn(self._watch(g), f"watch-{group_id}")
        return g.view()

    async def escalate(self) -> None:
        """Second SIGINT: SIGKILL every group that is being stopped or is `kill`-policy."""
        for g in list(self._groups.values()):
            if g.handle is not None and not g.state.ended \
                    and g.spec.orphan_policy is OrphanPolicy.KILL:
                with contextlib.suppress(TetherError):
                    await g.handle.kill()

    # ------------------------------------------------------------ watching

    async def _watch(self, g: Group) -> None:
        h = g.handle
        assert h is not None
        leader = asyncio.ensure_future(h.wait_leader())
        empty = asyncio.ensure_future(h.wait())
        try:
            done, _ = await asyncio.wait({leader, empty}, return_when=asyncio.FIRST_COMPLETED)
            if leader in done and empty not in done and g.state is GroupState.RUNNING:
                remaining = await h.members()
                if remaining:
                    g.detached = True
                    g.log.info("leader pid %d exited (%s) but %d member(s) remain: the group keeps "
                               "running, detached", h.leader_pid, describe(leader.result()),
                               len(remaining))
                    self._emit(g, "detached")
            await empty
        finally:
            leader.cancel()
            empty.cancel()
        g.empty.set()
        if g.state is GroupState.RUNNING:
            status = await self._leader_status(h)
            reason = ExitReason.NATURAL
            if status.signal is not None:
                reason = (ExitReason.REQUESTED if status.signal in g.signals_sent
                          else ExitReason.EXTERNAL_SIGNAL)
            g.exit = ExitRecord(reason, exit_code=status.exit_code, signal=status.signal,
                                ended_at=time.time())
            self._transition(g, Transition.EXITED)
            await h.close()

    # ------------------------------------------------------------ signal

    async def signal(self, group_id: str, sig: Signals) -> SignalOutcome:
        g = self._find(group_id)
        await g.handle_ready.wait()
        if g.state.ended or g.handle is None:
            return SignalOutcome(0, True, g.view())
        g.signals_sent.add(int(sig))
        n = await self._send(g, sig)
        return SignalOutcome(n, n == 0, g.view())

    async def _send(self, g: Group, sig: Signals, also_continue: bool = False) -> int:
        """Signal every member; with ``also_continue``, follow with SIGCONT so stopped
        members can act on it (in one pass where the handle offers ``send_signals``)."""
        assert g.handle is not None
        kind, _ = split_target(g.spec.target)
        sigs = [sig] if not also_continue or sig is signal.SIGCONT else [sig, signal.SIGCONT]
        try:
            both = getattr(g.handle, "send_signals", None)
            if both is not None:
                n = int(await both(sigs))
            else:
                n = await g.handle.send_signal(sig)
                for extra in sigs[1:]:
                    await g.handle.send_signal(extra)
        except TetherError:
            self.hooks.signal_sent(kind, sig.name, "error")
            raise
        self.hooks.signal_sent(kind, sig.name, "sent" if n else "already_gone")
        return n

    # ------------------------------------------------------------ stop

    async def stop(self, group_id: str, policy: StopPolicy | None = None,
                   requested_at: float | None = None) -> GroupView:
        """Stop a group; idempotent, and concurrent stops share one run.

        The grace runs from ``requested_at`` (``time.monotonic()``; default: now), so a
        batch of stops escalates together at the grace, not staggered by the time the
        batch took to signal.
        """
        requested_at = time.monotonic() if requested_at is None else requested_at
        g = self._find(group_id)
        await g.handle_ready.wait()
        if g.state.ended:
            return g.view()
        if g.stop_task is None:
            g.stop_task = self._tasks.spawn(
                self._run_stop(g, policy or self._policy(g.spec), requested_at),
                f"stop-{group_id}")
        await asyncio.shield(g.stop_task)
        return g.view()

    async def _run_stop(self, g: Group, policy: StopPolicy, t0: float) -> None:
        self._stops_running += 1
        self._no_stops.clear()
        try:
            await self._stop_group(g, policy, t0)
        finally:
            self._stops_running -= 1
            if not self._stops_running:
                self._no_stops.set()

    async def _stop_group(self, g: Group, policy: StopPolicy, t0: float) -> None:
        h = g.handle
        assert h is not None
        self._transition(g, Transition.STOP)
        g.stop_requested.set()
        g.log.debug("stopping: %s, grace %g s", policy.signal.name, policy.grace)
        result = "success"
        detail = ""
        try:
            g.signals_sent.add(int(policy.signal))
            sent = await self._send(g, policy.signal, also_continue=True)
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
                self.hooks.signal_sent(split_target(g.spec.target)[0], "SIGKILL", "sent")
            survivors = len(await h.members())
        except TetherError as exc:
            # The target went away mid-stop (container removed, host unreachable).
            reason, survivors, result = ExitReason.LOST, 0, "failed"
            detail = f"not verified: {exc}"
            g.log.error("stop could not be verified: %s", exc)
        if survivors:
            result = "failed"
            g.log.error("%d member(s) survived the stop", survivors)
        # The stop took until the containment was seen empty (local cgroups say when), not
        # until this task got its turn to write the record.
        emptied_at = None if survivors else getattr(h, "emptied_at", None)
        status = await self._leader_status(h)
        duration = max(0.0, (emptied_at or time.monotonic()) - t0)
        # Remote signallers say what they could and could not verify (reconnects, ...).
        detail = "; ".join(x for x in (detail, str(getattr(h, "detail", "") or "")) if x)
        g.exit = ExitRecord(reason, exit_code=status.exit_code, signal=status.signal,
                            survivors=survivors, stop_duration=duration, ended_at=time.time(),
                            detail=detail)
        g.empty.set()
        self._transition(g, Transition.EMPTY)
        self.hooks.cleanup(result, duration)
        with contextlib.suppress(TetherError):
            await h.close()

    async def stop_many(self, stops: Iterable[tuple[str, StopPolicy | None]],
                        requested_at: float | None = None) -> list[GroupView]:
        """Stop a batch of groups together, with one grace clock (``requested_at``). The
        same as ``stop`` on each, concurrently, without a waiting task per group: a
        1000-group session stop spends its time on the groups, not on bookkeeping."""
        requested_at = time.monotonic() if requested_at is None else requested_at
        wanted = [(self._find(gid), policy) for gid, policy in stops]
        waits: list[asyncio.Future[Any]] = []
        for g, policy in wanted:
            if not g.handle_ready.is_set():  # still starting: stop() waits for it
                waits.append(self._tasks.spawn(self.stop(g.group_id, policy, requested_at),
                                               f"stop-{g.group_id}"))
            elif not g.state.ended:
                if g.stop_task is None:
                    g.stop_task = self._tasks.spawn(
                        self._run_stop(g, policy or self._policy(g.spec), requested_at),
                        f"stop-{g.group_id}")
                waits.append(g.stop_task)
        if waits:
            # Like stop()'s shield: a caller that goes away leaves the stops running.
            await asyncio.wait(waits)
            for w in waits:
                w.result()  # a stop that failed fails the batch, as in stop()
        return [g.view() for g, _ in wanted]

    async def stop_all(self, which: Callable[[Group], bool] = lambda g: True) -> list[GroupView]:
        """Stop many groups at once (used by shutdown and session stops)."""
        targets = [g for g in self._groups.values() if not g.state.ended and which(g)]
        return await self.stop_many((g.group_id, None) for g in targets)

    async def shutdown(self) -> None:
        """Stop every group whose orphan policy is ``kill``; leave ``keep`` ones running."""
        await self.stop_all(lambda g: g.spec.orphan_policy is OrphanPolicy.KILL)
        await self._tasks.cancel_all()
        for sub in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)


def describe(status: LeaderStatus | None) -> str:
    if status is None:
        return "status unknown"
    if status.signal is not None:
        try:
            name = signal.Signals(status.signal).name
        except ValueError:
            name = str(status.signal)
        return f"killed by {name}"
    if status.exit_code is not None:
        return f"exit code {status.exit_code}"
    return "status unknown"

