"""Starting a group: checks, a durable record first, the launch, readiness.

A start runs as a task the authority owns, never in the caller's coroutine: a
client that gives up (or disconnects) mid-call leaves the start to finish, and
the group reaches ``running`` or ``failed`` with a record either way. Whatever
goes wrong on the way (a refused field, a signaller exception, ``EMFILE``), the
group ends ``failed`` with a ``start_failed`` record; no group is ever left
``starting`` without a way to end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from tether.agent import users
from tether.agent.capacity import Capacity
from tether.agent.execprobe import exec_runner
from tether.agent.groups import Group
from tether.agent.lifecycle import Lifecycle, build_launch, dispose, leader_status
from tether.agent.plugins import Plugins
from tether.agent.ports import PortBook
from tether.agent.probes import FILE_READS, ExecRunner, Prober, port_in_use
from tether.core.errors import (
    Conflict,
    IdempotencyConflict,
    InvalidSpec,
    StartFailed,
    StateUnwritable,
    TetherError,
)
from tether.core.model import (
    AssignedPort,
    EventKind,
    FailureClass,
    GroupSpec,
    GroupState,
    GroupView,
    ProbeKind,
    RunContext,
    StdinMode,
    StopPolicy,
    Transition,
    check_group_id,
    format_bytes,
    new_group_id,
    spec_fingerprint,
)
from tether.signallers.base import GroupHandle, LaunchSpec, RunAs, Signaller, refuse
from tether.signallers.registry import split_target

#: How long a start waits for its record to be stored before it gives up.
STATE_DEADLINE = 10.0

T = TypeVar("T")

StopNow = Callable[[Group, str], Awaitable[None]]


class Starter:
    def __init__(self, lc: Lifecycle, default_policy: StopPolicy, capacity: Capacity | None,
                 watch: Callable[[Group], None], stop_now: StopNow,
                 plugins: Plugins | None = None, ports: PortBook | None = None) -> None:
        self.lc = lc
        self.default_policy = default_policy
        self.capacity = capacity
        self._watch = watch
        self._stop_now = stop_now
        self.plugins = plugins if plugins is not None else Plugins()
        self.ports = ports if ports is not None else PortBook(lc.marker, agent=lc.name)

    def signaller_for(self, target: str) -> tuple[Signaller, str]:
        kind, where = split_target(target)
        return self.lc.signallers.get(kind), where

    def launch_spec(self, group_id: str, spec: GroupSpec, where: str,
                    user: RunAs | None = None, context: RunContext | None = None
                    ) -> LaunchSpec:
        return build_launch(self.lc.marker, group_id, spec, where, user, context)

    def base_launch(self, g: Group, where: str) -> LaunchSpec:
        """What a group's next run and its exec checks launch with: as its first run did
        (user, ports, toolchain environment). Fails closed: a group that asked for a user
        never runs as the agent's own because that user could not be resolved."""
        if g.launch is not None:
            return g.launch
        if g.spec.user and g.user is None:
            raise StartFailed(FailureClass.PERMISSION_DENIED,
                              f"user {g.spec.user!r} could not be resolved on this host; "
                              "nothing runs as the agent's own user in its place")
        return self.launch_spec(g.group_id, g.spec, where, g.user, g.context)

    async def restore_launch(self, g: Group, signaller: Signaller, where: str) -> None:
        """After a re-adoption: rebuild what the first run launched with, so that a restart
        (or an exec check) runs as the same user, with the same ports and toolchain
        environment. Plugins are applied again (their files are read anew)."""
        spec = g.spec
        if spec.plugins and self.plugins and signaller.features.host_files:
            try:
                spec, _ = await self.plugins.apply(spec, g.log)
            except StartFailed as exc:
                g.log.warning("toolchain plugins failed on re-adoption (%s); a restart "
                              "launches the spec as given", exc.message)
        if spec.user and g.user is None:
            return  # base_launch refuses: never the agent's user in its place
        g.launch = self.launch_spec(g.group_id, spec, where, g.user, g.context)
        if spec.ready is not None and spec.ready.template:
            g.ready = spec.ready.resolve(g.context.port_env())

    def _check(self, spec: GroupSpec, signaller: Signaller) -> None:
        features = signaller.features
        if spec.inherit_env and not features.inherit_env:
            raise refuse("inherit_env", spec.target,
                         "--inherit-env copies this agent's environment; pass what the command "
                         "needs with --env")
        if spec.ready is not None and spec.ready.kind is ProbeKind.LOG and not features.log_probe:
            raise refuse("ready", spec.target,
                         "log: probes read the log on the agent's host; use an exec: probe "
                         "(it runs on the target)")
        if spec.user and not features.run_as_user:
            raise refuse("--user", spec.target,
                         "the agent switches users only for groups on its own host; run the "
                         "target's program as that user there (a container's USER, the SSH "
                         "login in ssh:USER@HOST), or drop --user")
        if spec.ports and not features.ports:
            raise refuse("--port", spec.target,
                         "the agent picks ports on its own 127.0.0.1, which is not the "
                         "target's network; give the program a fixed port with --env PORT=N")
        if spec.stdin is StdinMode.PIPE and not features.stdin_pipe:
            raise refuse("--stdin pipe", spec.target,
                         "the agent holds a piped stdin only for groups it can reach with one "
                         "(this host); run it locally, or without --stdin pipe")
        if spec.limits and not features.limits:
            flags = "/".join(f"--{c}" for c in ("memory", "cpus", "pids")
                             if getattr(spec.limits, c) is not None)
            raise refuse(flags, spec.target,
                         "limits are cgroups on the agent's host; set them on the container "
                         "(docker run --memory/--cpus/--pids-limit) or on the remote host, or "
                         "drop them")

    # ------------------------------------------------------------ spawn

    async def spawn(self, spec: GroupSpec, key: str = "", group_id: str = "") -> GroupView:
        """Start a group; returns once it is running or has failed. Idempotent by ``key``
        (and by ``group_id`` when the caller assigns it): the same request returns the
        same group, a different one is refused."""
        table = self.lc.table
        fingerprint = spec_fingerprint(spec)
        if group_id:
            check_group_id(group_id)
        seen = self._existing(fingerprint, key, group_id)
        if seen is not None:
            return await self.outcome(seen)
        signaller, where = self.signaller_for(spec.target)
        self._check(spec, signaller)
        if self.capacity is not None:
            self.capacity.check()
        gid = group_id or new_group_id()
        signaller.check(self.launch_spec(gid, spec, where))
        user = None
        if spec.user:
            # The password database may be remote (LDAP): looked up on a thread. The table
            # may change meanwhile, so the idempotency checks run again after it.
            user = await users.lookup(spec.user)
            seen = self._existing(fingerprint, key, group_id)
            if seen is not None:
                return await self.outcome(seen)
        g = Group(gid, spec, signaller.containment, spec.stop.apply(self.default_policy),
                  fingerprint)
        g.user = user
        table.add(g, key)
        self.lc.emit(g, EventKind.STATE)
        g.start_task = self.lc.tasks.spawn(self._flow(g, signaller, where), f"start-{gid}")
        return await self.outcome(g)

    def _existing(self, fingerprint: str, key: str, group_id: str) -> Group | None:
        """The group an earlier, identical request started (by caller-assigned id or by
        idempotency key); raises if the id or key was used for another request."""
        table = self.lc.table
        if group_id:
            why = table.buried(group_id)
            if why is not None:
                raise Conflict(f"group {group_id} was stopped before its spawn arrived ({why}); "
                               "nothing was started")
            if group_id in table:
                existing = table.find(group_id)
                if existing.fingerprint != fingerprint:
                    raise IdempotencyConflict(f"group id {group_id}", group_id)
                return existing
        return table.by_key(key, fingerprint)

    async def outcome(self, g: Group) -> GroupView:
        """Wait (without owning it) for a start to finish, and say how it went."""
        if g.start_task is not None:
            await asyncio.shield(g.start_task)
        if g.stop_task is not None:  # a stop took the start over: answer with its record
            await asyncio.shield(g.stop_task)
        if g.start_error is not None:
            raise g.start_error
        return g.view()

    async def _flow(self, g: Group, signaller: Signaller, where: str) -> None:
        try:
            try:
                await self.lc.hooks.durable(STATE_DEADLINE)
            except StateUnwritable as exc:
                self.lc.fail(g, FailureClass.RESOURCE_EXHAUSTED,
                             f"{exc}; the group could not be recorded, so nothing was started")
                return
            if g.stop_requested.is_set():
                return  # stopped before anything ran: the stop routine records it
            if not await self._prepare(g, signaller, where) or g.stop_requested.is_set():
                return  # failed (recorded), or a stop came meanwhile (it records it)
            await self._start(g, signaller, where)
            if g.state is GroupState.RUNNING:
                try:
                    await self.lc.hooks.durable(STATE_DEADLINE)
                except StateUnwritable as exc:
                    g.start_error = exc
                    g.log.error("started but could not be recorded (%s); stopping it", exc)
                    await self._stop_now(g, f"stopped at start: {exc}")
        except asyncio.CancelledError:
            await self._abandon(g, "the agent shut down during the start")
            raise
        except Exception as exc:  # whatever it was, the group must end with a record
            g.log.exception("start failed unexpectedly")
            failure = (FailureClass.INVALID_SPEC if isinstance(exc, InvalidSpec)
                       else FailureClass.TARGET_UNREACHABLE if isinstance(exc, TetherError)
                       else FailureClass.IMMEDIATE_CRASH)
            await self._abandon(g, f"cannot start {g.spec.argv[0]!r}: {exc}", failure)

    async def _abandon(self, g: Group, message: str,
                       failure: FailureClass = FailureClass.IMMEDIATE_CRASH) -> None:
        if g.state is not GroupState.STARTING or g.stop_requested.is_set():
            return
        survivors = 0
        if g.handle is not None:
            try:
                await asyncio.shield(g.handle.kill())
                survivors = len(await g.handle.members())
            except Exception as exc:  # cannot verify: say so; the orphan sweep follows up
                survivors = 1
                message += f" (its processes could not be verified gone: {exc})"
        self.lc.fail(g, failure, message, survivors=survivors)

    async def _bounded(self, g: Group, work: Awaitable[T], what: str) -> T | None:
        """``work``, unless a stop comes first (None: the stop takes over) or it outlasts
        the start timeout (the group fails, naming what blocked). Whatever ``work`` starts
        after it was given up is ended by its owner (the signaller kills a launch that
        completes after its caller left)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(g.stop_requested.wait())
        try:
            done, _ = await asyncio.wait({task, stop}, timeout=g.spec.start_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # The caller was cancelled (a shutdown ending its start): the launch goes with
            # it, so that what it starts is ended by the signaller, not left running as
            # nobody's group.
            task.cancel()
            raise
        finally:
            stop.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if stop not in done:
            self.lc.fail(g, FailureClass.READINESS_TIMEOUT,
                         f"{g.spec.argv[0]!r} did not start within {g.spec.start_timeout:g} s: "
                         f"{what} blocked (a working directory, log or program on a stuck "
                         "filesystem?); fix the path, or raise --start-timeout")
        return None

    async def _prepare(self, g: Group, signaller: Signaller, where: str) -> bool:
        """The steps between the durable record and the launch: toolchain plugins, ports,
        the final environment. False when the start failed (recorded)."""
        spec = g.spec
        changes: tuple[str, ...] = ()
        if spec.plugins and self.plugins and signaller.features.host_files:
            try:
                spec, changes = await self.plugins.apply(spec, g.log)
            except StartFailed as exc:
                self.lc.fail(g, exc.failure, exc.message)
                return False
        ports: tuple[AssignedPort, ...] = ()
        if spec.ports:
            gid = g.group_id
            try:
                ports = await self.ports.assign(gid, spec.ports)
            except StartFailed as exc:
                self.lc.fail(g, exc.failure, exc.message)
                return False
            g.on_end.append(lambda: self.ports.release(gid))
        limits = spec.limits.describe() if spec.limits else ""
        g.context = RunContext(changes, g.user.describe() if g.user is not None else "", ports,
                               limits)
        g.launch = self.launch_spec(g.group_id, spec, where, g.user, g.context)
        if spec.ready is not None and spec.ready.template:
            g.ready = spec.ready.resolve(g.context.port_env())
        return True

    async def _start(self, g: Group, signaller: Signaller, where: str) -> None:
        spec = g.spec
        ready = g.ready
        if ready is not None and await port_in_use(ready):
            self.lc.fail(g, FailureClass.PORT_IN_USE,
                         f"port {ready.port} on {ready.host} is already in use before "
                         f"{spec.argv[0]!r} started; stop whatever listens there (`tether ports "
                         f"{ready.port}` shows who) or pick another port")
            return
        try:
            launch = self.base_launch(g, where)
        except StartFailed as exc:
            self.lc.fail(g, exc.failure, exc.message)
            return
        try:
            # Both may block on a stuck filesystem (a log, cwd or program on a dead NFS
            # server): bounded by the start timeout, and given up at once for a stop.
            log_start = (await self._bounded(g, log_size(spec.log_path), "reading its log's "
                                             "size") if spec.log_path else 0)
            if log_start is None:
                return
            handle = await self._bounded(g, signaller.spawn(launch), "launching it")
            if handle is None:
                return
        except StartFailed as exc:
            self.lc.fail(g, exc.failure, exc.message)
            return
        except InvalidSpec as exc:
            self.lc.fail(g, FailureClass.INVALID_SPEC, str(exc))
            return
        except TetherError as exc:
            self.lc.fail(g, FailureClass.TARGET_UNREACHABLE, str(exc))
            return
        g.attach(handle)
        if handle.limits:
            g.context = replace(g.context, limits=handle.limits)
        self._watch(g)
        if g.stop_requested.is_set():
            return  # a stop came meanwhile: it takes over
        if ready is None:
            self.lc.transition(g, Transition.READY)
            return
        prober = Prober(ready, spec.log_path, self._exec_runner(g, signaller, where),
                        log_start)
        probe = asyncio.ensure_future(prober.run())
        empty = asyncio.ensure_future(g.empty.wait())
        stop = asyncio.ensure_future(g.stop_requested.wait())
        try:
            done, _ = await asyncio.wait({probe, empty, stop}, timeout=spec.start_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (probe, empty, stop):
                t.cancel()
            await asyncio.gather(probe, empty, stop, return_exceptions=True)
        if g.stop_requested.is_set():
            return  # a stop took over
        if probe in done and not probe.cancelled() and probe.exception() is None:
            self.lc.transition(g, Transition.READY)
            return
        if empty in done:
            status = await leader_status(handle)
            oom = await _oom_kills(handle)
            why = status.describe()
            if oom and spec.limits.memory is not None:
                why += (f"; the kernel's OOM killer ended {oom} process(es) at its memory limit "
                        f"{format_bytes(spec.limits.memory)}")
            self.lc.fail(g, FailureClass.IMMEDIATE_CRASH,
                         f"{spec.argv[0]!r} exited before it was ready ({why}); "
                         "see its log"
                         f"{' ' + spec.log_path if spec.log_path else ' (pass --log FILE)'}",
                         status, oom_kills=oom)
            return
        failure = (FailureClass.READINESS_FAILED if prober.last.answered
                   else FailureClass.READINESS_TIMEOUT)
        survivors = 0
        with contextlib.suppress(TetherError):
            await handle.kill()
            await handle.wait(1.0)
            survivors = len(await handle.members())
        self.lc.fail(g, failure,
                     f"{spec.argv[0]!r} was not ready within {spec.start_timeout:g} s "
                     f"(probe {ready.shown}: {prober.last.detail}); raise --start-timeout or fix "
                     "the probe", await leader_status(handle), survivors)

    def _exec_runner(self, g: Group, signaller: Signaller, where: str,
                     prefix: str = "probe") -> ExecRunner:
        return exec_runner(g, signaller, lambda: self.base_launch(g, where), prefix)

    # ------------------------------------------------------------ restarts (supervise.py)

    async def relaunch(self, g: Group) -> None:
        """Start the next run of a ``restarting`` group: same id, spec and markers, through
        the same launch and readiness probe as its first start (on a cgroup host a new
        cgroup at the same path: the last run's was removed once it was empty). Ready: the
        group is ``running`` again. A failed start is the supervisor's to judge
        (``Lifecycle.fail``); a stop requested meanwhile takes over, as in a first start."""
        signaller, where = self.signaller_for(g.spec.target)
        g.empty.clear()
        g.detached = False
        g.signals_sent.clear()
        g.run_started_at = time.time()
        try:
            await self._start(g, signaller, where)
        except asyncio.CancelledError:  # the agent shuts down mid-restart: nothing lives on
            if g.handle is not None and g.state is GroupState.RESTARTING:
                await asyncio.shield(dispose(g.handle))
            raise
        except Exception as exc:  # whatever it was, the attempt is a run with a record
            g.log.exception("restart failed unexpectedly")
            if g.state is GroupState.RESTARTING and not g.stop_requested.is_set():
                if g.handle is not None:
                    await asyncio.shield(dispose(g.handle))
                failure = (FailureClass.INVALID_SPEC if isinstance(exc, InvalidSpec)
                           else FailureClass.TARGET_UNREACHABLE if isinstance(exc, TetherError)
                           else FailureClass.IMMEDIATE_CRASH)
                self.lc.fail(g, failure, f"cannot restart {g.spec.argv[0]!r}: {exc}")

    def live_runner(self, g: Group) -> ExecRunner:
        """Runs ``exec:`` liveness checks as readiness ones run: in the group's place, with its
        environment, each check its own contained tree (``g-….liveN``), killed at its
        timeout."""
        signaller, where = self.signaller_for(g.spec.target)
        return self._exec_runner(g, signaller, where, prefix="live")

    # ------------------------------------------------------------ adopt

    async def adopt(self, pid: int, start_time: float | None, spec: GroupSpec) -> GroupView:
        for given, flag in ((spec.user, "--user"), (spec.ports, "--port"),
                            (spec.limits, "limits"),
                            (spec.stdin is StdinMode.PIPE, "--stdin pipe")):
            if given:
                raise InvalidSpec(f"adopt takes over a tree that already runs: {flag} applies "
                                  "to spawns only; spawn it through tether instead",
                                  field=flag.lstrip("-"))
        signaller, where = self.signaller_for(spec.target)
        gid = new_group_id()
        handle = await signaller.adopt(gid, pid, start_time, where, spec.orphan_policy)
        g = Group(gid, spec, handle.containment, spec.stop.apply(self.default_policy),
                  spec_fingerprint(spec))
        g.adopted = True
        g.attach(handle)
        self.lc.table.add(g)
        self.lc.emit(g, EventKind.STATE)
        self.lc.transition(g, Transition.READY)
        self._watch(g)
        await self.lc.hooks.durable(STATE_DEADLINE)
        return g.view()


async def _oom_kills(handle: GroupHandle) -> int:
    try:
        return await handle.oom_kills()
    except TetherError:
        return 0


async def log_size(path: str) -> int:
    def size() -> int:
        try:
            return os.stat(path).st_size
        except OSError:
            return 0

    return await asyncio.get_running_loop().run_in_executor(FILE_READS, size)
