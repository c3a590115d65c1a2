"""The docker signaller: process groups inside running containers, through the Engine API.

Targets are ``docker:CONTAINER`` (name or id). Nothing needs the agent to share a host
or a PID namespace with the container: everything is an ``exec`` of the remote toolkit's
``ops.sh`` (``signallers/remote/``) as ``sh -c SCRIPT tether OP ARGS...``, the argv
travelling as positional parameters, plus Engine calls (``dockerapi.py``: its own
bounded thread pool, one error translation, one event stream).

Starting a group
    One exec of ``ops.sh spawn exec ...``: it checks cwd, command and log, prints its
    handshake (``ok PID START BTIME CLK`` or ``fail CODE``) and execs ``env -i -- K=V...
    ARGV`` in place. runc makes every exec'd process the leader of a new session, so the
    exec's own process is the leader (``exec_inspect`` gives its exit status,
    ``exec_die`` events announce it) and its environment is exactly the group's, whatever
    Docker adds to execs. Without PATH in the group's environment the command is looked
    up in the container's PATH and run by its resolved path. The start returns once the
    leader carries the group's marks (``env`` has exec'd the command), or classifies the
    126/127 of an exec no check could foresee (a script whose ``#!`` interpreter is
    missing). Before the first spawn in a container, probes refuse images without ``sh``,
    ``kill`` or ``env`` (``MissingTool``) before anything runs.

Members, signals, waiting, kill
    ``RemoteGroup``: the membership rule over scans of the container's ``/proc``, with
    both marks searched by ``grep -z`` (images without grep are held by process group,
    session and descent only: reported as ``pgid``); signals checked against each
    member's start time inside the container. The leader's exit is event-driven; while
    the leader's exec runs, no scan or poll exec is made. Handles report ``subreaper``:
    the same finding power as the local signaller's, except that orphans re-parent to the
    container's PID 1, not to the agent.

Container gone
    Every process of a container ends with it: ``wait()`` treats a stopped or removed
    container as empty; ``members``, ``send_signal`` and ``kill`` raise ``ContainerGone``
    saying so, so a stop in progress is reported as not verified rather than guessed. The
    container itself is killed only as a last resort in ``kill()``, and only when the spec
    said the group owns it (``LaunchSpec.owns_target``).

Leader status
    containerd reports a process killed by signal N as exit status 128+N; statuses above
    128 are read as signals (a leader that *exits* with 130 is reported as SIGINT).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import Final

from tether.core.errors import (
    AdoptRefused,
    InvalidSpec,
    StartFailed,
    TargetUnreachable,
    TetherError,
)
from tether.core.model import Containment, FailureClass, LeaderStatus, OrphanPolicy
from tether.core.output import capture_gap
from tether.signallers.base import (
    Features,
    GroupHandle,
    LaunchSpec,
    Signaller,
    SignallerContext,
    Stdio,
)
from tether.signallers.dockerapi import (
    TOOL_TIMEOUT,
    ContainerGone,
    ContainerRef,
    Engine,
    ExecGone,
    ExecOutcome,
    MissingTool,
    exit_code,
    log,
)
from tether.signallers.execio import ExecStdio
from tether.signallers.remote.group import POLL_FIRST, POLL_MAX_UNBOUNDED, RemoteGroup
from tether.signallers.remote.wire import (
    OPS,
    RemoteShell,
    ShellResult,
    check_spec,
    exec_failure,
    marks,
    parse_proc,
    parse_spawn,
    spawn_argv,
    start_failure,
    status_from_code,
)

__all__ = ["ContainerGone", "DockerGroup", "DockerSignaller", "MissingTool"]

KILL_SWEEP_DEADLINE: Final = 10.0
HANDSHAKE_TIMEOUT: Final = 30.0
EXEC_CONFIRM_TIMEOUT: Final = 2.0
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")  # the container shares this kernel


class DockerShell(RemoteShell):
    """``docker exec sh -c SCRIPT tether ARGS...`` in one container."""

    def __init__(self, engine: Engine, container: ContainerRef) -> None:
        self.engine = engine
        self.container = container
        self.target = f"docker:{container.name}"

    async def run(self, script: str, argv: Sequence[str], *, what: str,
                  timeout: float | None = None, unverified: str = "") -> ShellResult:
        for pause in (0.05, 0.25, 1.0, None):
            done = await self.engine.exec(self.target, self.container,
                                          ["sh", "-c", script, "tether", *argv],
                                          timeout=TOOL_TIMEOUT if timeout is None else timeout)
            if done.exit_code is not None and done.exit_code < 126:
                return ShellResult(done.exit_code, done.out.decode(errors="replace"),
                                   done.err.decode(errors="replace"))
            # Not the script's status: sh did not run. No sh in the image, or runc lost a
            # race with a dying container before the Engine's state says so: look again.
            text = done.first_line()
            if "stopped container" in text or "not running" in text:
                raise ContainerGone(self.target, self.container.name, "stopped")
            await self.ensure_running()
            if done.exit_code in (126, 127) and "not found" in text.lower():
                raise MissingTool(self.target, self.container.name, "sh", text)
            if pause is not None:
                await asyncio.sleep(pause)
        raise TargetUnreachable(self.target, f"`sh` in container {self.container.name!r} did "
                                             f"not run while {what} (exit {done.exit_code}): "
                                             f"{text}; check the container and the Docker engine")

    async def ensure_running(self) -> None:
        """Raise ``ContainerGone`` if the container stopped or was removed."""
        cid = self.container.id
        info = await self.engine.call(self.target, self.container.name,
                                      lambda api: api.inspect_container(cid), known=True)
        if not (info.get("State") or {}).get("Running"):
            raise ContainerGone(self.target, self.container.name, "stopped")

    @contextlib.asynccontextmanager
    async def listen(self, keys: Sequence[str]) -> AsyncIterator[asyncio.Event]:
        events = await self.engine.watch()
        async with events.listen(keys) as woke:
            yield woke


class DockerGroup(RemoteGroup):
    """A group inside a container: ``<DockerGroup g-1 docker:web pid=12 leader alive subreaper>``."""

    def __init__(self, shell: DockerShell, group_id: str, agent_marker: str, leader_pid: int,
                 start: int, btime: int, clk: int, exec_id: str | None,
                 containment: Containment, owns_target: bool, *, claim_pgid: bool = True,
                 claim_sid: bool = True, boot: str = "", stdio: Stdio | None = None) -> None:
        super().__init__(shell, group_id, agent_marker, leader_pid, start, btime, clk,
                         containment=containment, claim_pgid=claim_pgid, claim_sid=claim_sid,
                         boot=boot)
        self._stdio = stdio
        self.docker = shell
        self.container = shell.container
        self.target = shell.target
        self.exec_id = exec_id
        self.owns_target = owns_target

    @property
    def stdio(self) -> Stdio | None:
        return self._stdio

    async def wait(self, timeout: float | None = None) -> bool:
        empty = await super().wait(timeout)
        if empty and isinstance(self._stdio, ExecStdio):
            # Empty containment: the exec's stream is ending; its last bytes reach the ring
            # before the group's exit does (at most FINISH_WAIT).
            await self._stdio.drained()
        return empty

    async def close(self) -> None:
        if self._stdio is not None:
            self._stdio.finish()  # the agent finished it at the run's end; this is a guard
        await super().close()

    def kill_deadline(self) -> float:
        return KILL_SWEEP_DEADLINE

    def wake_keys(self) -> Sequence[str]:
        return (self.container.id, self.exec_id or "")

    async def _leader_exited(self) -> bool:
        """One Engine call: has the leader's exec ended? Records its status."""
        if self._leader_status is not None:
            return True
        exec_id = self.exec_id
        assert exec_id is not None
        try:
            info = await self.docker.engine.call(self.target, self.container.name,
                                                 lambda api: api.exec_inspect(exec_id),
                                                 known=True)
        except ExecGone:
            self._leader_status = LeaderStatus()
            return True
        if info.get("Running"):
            return False
        code = info.get("ExitCode")
        self._leader_status = status_from_code(int(code) if code is not None else None)
        return True

    async def busy(self, targets: Sequence[str]) -> bool:
        """While the leader's exec runs, the leader is alive: no exec needed to know it."""
        return (self.exec_id is not None and f"{self.leader_pid}:{self._leader_start}" in targets
                and not await self._leader_exited())

    async def wait_leader(self) -> LeaderStatus:
        if self.exec_id is None:  # adopted: no exec to ask, watch the pid itself
            return await super().wait_leader()
        delay = POLL_FIRST
        async with self.docker.listen(self.wake_keys()) as woke:
            while True:
                woke.clear()
                try:
                    if await self._leader_exited():
                        break
                except ContainerGone:
                    self._leader_status = LeaderStatus()
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woke.wait(), delay)
                delay = POLL_FIRST if woke.is_set() else min(delay * 2, POLL_MAX_UNBOUNDED)
        assert self._leader_status is not None
        return self._leader_status

    async def survived(self, pids: list[int], deadline: float) -> None:
        await super().survived(pids, deadline)
        if self.owns_target:
            self.log.warning("the group owns container %r: killing the container",
                             self.container.name)
            cid = self.container.id
            await self.docker.engine.call(self.target, self.container.name,
                                          lambda api: api.kill(cid), known=True)


class DockerSignaller(Signaller):
    """Signaller for ``docker:CONTAINER`` targets. One Engine connection per agent."""

    kind = "docker"
    features = Features()

    def __init__(self, context: SignallerContext | None = None) -> None:
        self.context = context or SignallerContext()
        explicit = self.context.options.get("docker_host", "")
        self.engine = Engine(explicit or os.environ.get("DOCKER_HOST",
                                                        "unix:///var/run/docker.sock"),
                             bool(explicit))
        self._tools: set[str] = set()  # container ids whose sh, kill and env were found

    @property
    def containment(self) -> Containment:
        return Containment.SUBREAPER

    def __repr__(self) -> str:
        return f"<DockerSignaller {self.engine.host}>"

    def check(self, spec: LaunchSpec) -> None:
        check_spec(spec, self.context.marker, f"docker:{spec.where}")

    async def _shell(self, where: str) -> DockerShell:
        """The running container, its event stream subscribed and its tools checked."""
        target = f"docker:{where}"
        if not where:
            raise TargetUnreachable(target, "no container given; use a target like docker:NAME")
        container = await self.engine.inspect(target, where)
        await self.engine.watch()  # subscribed before anything can exit
        if container.id not in self._tools:
            # A plain exec each (no shell), so a missing sh is named, not guessed.
            probes = await asyncio.gather(*(
                self.engine.exec(target, container, argv)
                for argv in (["sh", "-c", ":"], ["kill", "-l"], ["env"])))
            for tool, probe in zip(("sh", "kill", "env"), probes, strict=True):
                if probe.exit_code in (126, 127):
                    raise MissingTool(target, container.name, tool, probe.first_line())
            self._tools.add(container.id)
        return DockerShell(self.engine, container)

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        try:
            self.check(spec)
        except InvalidSpec as exc:
            raise StartFailed(FailureClass.INVALID_SPEC, str(exc)) from exc
        shell = await self._shell(spec.where)
        # Captured (a group, not a probe or hook) without --log: the program's stdout and
        # stderr stay the exec's, read from its attached stream (``execio.py``). Not for a
        # keep group: the Engine ends an exec at its next write once its attached reader
        # is gone, and a keep group must outlive its agent.
        capture = spec.capture and not capture_gap(f"docker:{spec.where}", spec.log_path,
                                                   spec.orphan_policy is OrphanPolicy.KEEP)
        argv = ["sh", "-c", OPS, "tether",
                *spawn_argv(spec, mode="attach" if capture else "exec", default_search="-")]
        try:
            done = await self.engine.exec(shell.target, shell.container, argv, until=b"ok ",
                                          timeout=HANDSHAKE_TIMEOUT, keep=capture)
        except (TargetUnreachable, asyncio.CancelledError):
            # The start may have happened anyway: nothing of an abandoned start may live on.
            with contextlib.suppress(TetherError):
                await asyncio.shield(self._sweep(shell, spec.group_id))
            raise
        try:
            return await self._spawned(shell, spec, done)
        except BaseException:
            if done.live is not None:
                done.live.attached.close()
            raise

    async def _spawned(self, shell: DockerShell, spec: LaunchSpec, done: ExecOutcome
                       ) -> DockerGroup:
        name = shell.container.name
        reply = parse_spawn(ShellResult(done.exit_code, done.out.decode(errors="replace")))
        where = f"in container {name!r}"
        if reply.failed is not None:
            raise start_failure(*reply.failed, spec, where,
                                spec.env.get("PATH", "the container's PATH"))
        if reply.ok is None:
            if done.exit_code in (126, 127) and not reply.ran:
                raise MissingTool(shell.target, name, "sh", done.first_line())
            raise StartFailed(FailureClass.IMMEDIATE_CRASH,
                              f"the start wrapper {where} ended without a handshake (exit "
                              f"{done.exit_code}): {done.first_line()!r}")
        pid, start, btime, clk = reply.ok
        try:
            marked = await self._confirm_exec(shell, pid, start, done.exec_id, spec)
        except (TargetUnreachable, asyncio.CancelledError):
            with contextlib.suppress(TetherError):  # started, but nobody will hold it
                await asyncio.shield(self._sweep(shell, spec.group_id))
            raise
        return DockerGroup(shell, spec.group_id, self.context.marker, pid, start, btime, clk,
                           done.exec_id, Containment.PGID if marked == "unknown"
                           else Containment.SUBREAPER, spec.owns_target, boot=reply.boot,
                           stdio=None if done.live is None
                           else ExecStdio(spec.group_id, done.live))

    async def _confirm_exec(self, shell: DockerShell, pid: int, start: int, exec_id: str,
                            spec: LaunchSpec) -> str:
        """Return once the leader carries the group's marks (``env`` has exec'd the command:
        the handshake comes microseconds before, so the first look nearly always settles
        it; else bounded backoff from 5 ms, at most ``EXEC_CONFIRM_TIMEOUT``), or raise the
        class of an exec that failed. Returns how the marks looked ("unknown": no grep)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXEC_CONFIRM_TIMEOUT
        delay = 0.005
        while True:
            info = parse_proc(await shell.run(OPS, ["proc", str(pid),
                                                    *marks(spec.group_id, self.context.marker)],
                                              what=f"confirming the start of {spec.group_id}"),
                              shell.target)
            p = info.proc
            if p is None or p.start != start or not p.alive:
                break  # the leader already ended: its exit code tells how
            if info.marked != "no" or loop.time() > deadline:
                return info.marked
            await asyncio.sleep(delay)
            delay *= 2
        code = await self.engine.call(shell.target, shell.container.name,
                                      lambda api: exit_code(api, exec_id), known=True)
        failed = None if code is None else exec_failure(code, spec,
                                                         f"in container {shell.container.name!r}")
        if failed is not None:
            raise failed
        return "yes"

    async def _sweep(self, shell: DockerShell, group_id: str) -> None:
        found = RemoteGroup(shell, group_id, self.context.marker, 0, -1, 0, CLK_TCK,
                            containment=Containment.SUBREAPER, claim_pgid=False,
                            claim_sid=False)
        if await found.kill():
            log.warning("killed what an abandoned start of %s left in container %r", group_id,
                        shell.container.name)

    async def adopt(self, group_id: str, pid: int, start_time: float | None, where: str,
                    policy: OrphanPolicy = OrphanPolicy.KILL) -> GroupHandle:
        if pid <= 1:
            raise AdoptRefused(pid, f"pid {pid} is the init of container {where!r}; stop the "
                                    "container instead")
        shell = await self._shell(where)
        info = parse_proc(await shell.run(OPS, ["proc", str(pid),
                                                *marks(group_id, self.context.marker)],
                                          what=f"inspecting pid {pid} for adoption"),
                          shell.target)
        p = info.proc
        if p is None:
            raise AdoptRefused(pid, f"no such process in container {shell.container.name!r} (it "
                                    "has exited or the pid is wrong; pids are the container's own)")
        if not p.alive:
            raise AdoptRefused(pid, "it has already exited (zombie)")
        if start_time is not None and round((start_time - info.btime) * info.clk) != p.start:
            raise AdoptRefused(pid, f"its start time is {info.epoch(p.start):.2f}, not "
                                    f"{start_time:.2f}: the pid was reused")
        return DockerGroup(shell, group_id, self.context.marker, pid, p.start, info.btime,
                           info.clk, None, Containment.SUBREAPER if info.marked == "yes"
                           else Containment.PGID, False, claim_pgid=p.pgid == pid,
                           claim_sid=p.sid == pid, boot=info.boot)

    async def aclose(self) -> None:
        await self.engine.aclose()
