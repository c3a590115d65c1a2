"""The ssh signaller: process groups on hosts without an agent, reached through asyncssh.

Target: ``ssh:[USER@]HOST[:PORT]`` (IPv6 as ``[::1]:2222``). Nothing is installed on the
remote host; it needs a POSIX ``sh``, ``setsid`` and ``env`` (util-linux and coreutils,
or BusyBox), ``/proc``, and for the marker search ``grep`` (``-z``, else with ``tr``).
Everything there is the remote toolkit's ``ops.sh`` (``signallers/remote/``) run over
the connection pool of ``sshconn.py`` (host keys, retries, channel limits).

Start
    ``ops.sh spawn detach``: it checks the working directory, resolves the command the way
    ``execvp`` will (PATH from the group's env, else ``/bin:/usr/bin``, then run by its
    resolved path) and opens the log, so a start failure is classified from the wrapper's
    exit status, never from output text. Then ``setsid env -i -- K=V... ARGV`` runs in
    the background with stdin from /dev/null and output appended to the log: it outlives
    the channel, leads its own session, and its environment is exactly the group's. The
    start returns once the exec is confirmed (the marker shows in ``/proc/PID/environ``);
    a leader that dies first is the wrapper's child, so an exec failure (a missing ``#!``
    interpreter) is classified by its status too. A start whose answer is lost is swept
    by marker and run once more; the orphaned wrapper writes to its dead channel before it
    forks, so it dies of SIGPIPE instead of starting a second leader.

Output
    A captured group (``LaunchSpec.capture``, orphan policy kill, no log) starts as
    ``ops.sh spawn spool``: its stdout and stderr go to two files of a private directory
    on the host, which ``sshspool.py`` reads from byte offsets over the connection,
    resuming where it stopped after a reconnect (the group's ``stdio``).

Containment
    ``cgroup`` where the remote user has a delegated cgroup v2 directory (``ssh_cgroup_root``,
    else the parent of, or else, the SSH session's cgroup): the wrapper joins
    ``ROOT/tether-GROUP`` before it forks the leader, members are its ``cgroup.procs``
    plus marker carriers, and the kill adds ``cgroup.kill``. Otherwise ``pgid``: the
    membership rule over the host's ``/proc`` (``RemoteGroup``). Reported as ``pgid``, not
    ``subreaper``: nothing re-parents orphans to us, so a process that both leaves the
    session and scrubs its environment (or changes uid) is lost.
    ``ssh_containment=auto|cgroup|pgid`` forces or prefers a level.

Waiting
    ``wait()`` and ``wait_leader()`` hold a channel running ``ops.sh watch`` (checks with
    backoff from 10 ms to 200 ms, a heartbeat each round); beyond the long-channel limit
    they poll with short commands. While the host cannot be reached they raise
    ``TargetUnreachable`` after the retries (the agent's watcher keeps trying, with
    backoff, and the record after reconnection is what the host then shows).

Options (``SignallerContext.options``)
    ``known_hosts``, ``ssh_insecure_no_host_key_check``, ``ssh_key``, ``ssh_config``,
    ``ssh_containment`` (auto|cgroup|pgid), ``ssh_cgroup_root``, ``ssh_connect_timeout``
    (15 s), ``ssh_command_timeout`` (30 s), ``ssh_kill_deadline`` (10 s), ``ssh_keepalive``
    (15 s), ``ssh_retries`` (3), ``ssh_max_channels`` (8).

Limits
    The leader's exit status is not known once the start has returned (it is nobody's
    child of ours): ``leader_status`` is ``LeaderStatus()`` once it has exited, unless it
    died during the start. The marker search sees only the ssh user's processes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
from collections.abc import Sequence

from tether.core.errors import AdoptRefused, InvalidSpec, StartFailed, TargetUnreachable
from tether.core.model import MARKER_ENV, Containment, FailureClass, LeaderStatus, OrphanPolicy
from tether.core.output import capture_gap
from tether.signallers.base import (
    Features,
    GroupHandle,
    LaunchSpec,
    Signaller,
    SignallerContext,
    Stdio,
)
from tether.signallers.remote.group import RemoteGroup
from tether.signallers.remote.wire import (
    OPS,
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
from tether.signallers.sshconn import (
    MAX_COMMAND,
    Pool,
    SSHOptions,
    SSHShell,
    SSHTarget,
    _ChannelDropped,
)
from tether.signallers.sshspool import SpoolStdio

__all__ = ["SSHGroup", "SSHSignaller", "SSHTarget"]

log = logging.getLogger("tether.signallers.ssh")

_CGMODE = {"auto": "auto", "cgroup": "cgroup", "pgid": "none"}


def _cgroup_name(group_id: str) -> str:
    """A directory name for ``group_id``: itself if tame, else a readable part plus a hash."""
    if re.fullmatch(r"[A-Za-z0-9._-]{1,100}", group_id) and group_id not in (".", ".."):
        return group_id
    tame = re.sub(r"[^A-Za-z0-9._-]", "_", group_id)[:40]
    return f"{tame}-{hashlib.sha256(group_id.encode()).hexdigest()[:12]}"


class SSHGroup(RemoteGroup):
    """A group on an SSH host: ``<SSHGroup g-1 ssh:u@h:22 pid=4123 leader alive cgroup>``."""

    def __init__(self, signaller: SSHSignaller, target: SSHTarget, group_id: str,
                 leader_pid: int, start_ticks: int, btime: int = 0, clk: int = 100,
                 cgroup: str = "", *, leader_status: LeaderStatus | None = None,
                 notes: Sequence[str] = (), claim_pgid: bool = True,
                 claim_sid: bool = True, boot: str = "", spool: str = "") -> None:
        kept = list(notes)
        super().__init__(SSHShell(signaller.pool, target, kept), group_id,
                         signaller.context.marker, leader_pid, start_ticks, btime, clk,
                         containment=Containment.CGROUP if cgroup else Containment.PGID,
                         cgroup=cgroup, claim_pgid=claim_pgid, claim_sid=claim_sid,
                         leader_status=leader_status, notes=kept, boot=boot)
        self.target = target
        self._opts = signaller.opts
        self._stdio = None if not spool else SpoolStdio(group_id, signaller.pool, target, spool)

    @property
    def stdio(self) -> Stdio | None:
        return self._stdio

    async def wait(self, timeout: float | None = None) -> bool:
        empty = await super().wait(timeout)
        if empty and self._stdio is not None:
            # Empty: nothing writes the spool any more; its rest reaches the ring before
            # the group's exit does (a lost connection raises, and the retry goes on).
            await self._stdio.drained()
        return empty

    def kill_deadline(self) -> float:
        return self._opts.kill_deadline

    @property
    def detail(self) -> str:
        """What holds this group and what happened on the way: for the exit record."""
        how = (f"cgroup {self.cgroup} + {MARKER_ENV} marker scan" if self.cgroup
               else f"process group/session {self.leader_pid} + {MARKER_ENV} marker scan")
        return "; ".join([f"ssh {self.target}, containment {self.containment.value} ({how})",
                          *self.notes])

    async def close(self) -> None:
        if self._stdio is not None:
            self._stdio.finish()  # the agent finished it at the run's end; this is a guard
            await self._stdio.discard()
        await super().close()
        if not self.cgroup:
            return
        try:
            done = await self.shell.run(OPS, ["rmcg", self.cgroup],
                                        what=f"removing the cgroup of group {self.group_id}")
        except TargetUnreachable as exc:
            log.warning("ssh %s: cgroup %s of group %s left in place: %s", self.target,
                        self.cgroup, self.group_id, exc.why)
            return
        if done.status != 0:
            log.warning("ssh %s: cgroup %s of group %s still busy at close; left in place",
                        self.target, self.cgroup, self.group_id)


class SSHSignaller(Signaller):
    """Signaller for ``ssh:[USER@]HOST[:PORT]`` targets. One per agent; owns the connections."""

    kind = "ssh"
    features = Features()

    def __init__(self, context: SignallerContext | None = None) -> None:
        self.context = context or SignallerContext()
        self.opts = SSHOptions.from_context(self.context)
        self.pool = Pool(self.opts)

    @property
    def containment(self) -> Containment:
        """What it promises for any host without looking; each handle reports what it got."""
        return Containment.CGROUP if self.opts.containment == "cgroup" else Containment.PGID

    def connections_opened(self, where: str) -> int:
        """How many connections to ``where`` were opened so far (1 = never re-established)."""
        return self.pool.connects.get(SSHTarget.parse(where), 0)

    def _spawn_args(self, spec: LaunchSpec) -> list[str]:
        # Captured (a group, not a probe or hook) unless it has a --log or must outlive
        # its agent: the output goes to a spool on the host (``sshspool.py``).
        capture = spec.capture and not capture_gap(f"ssh:{spec.where}", spec.log_path,
                                                   spec.orphan_policy is OrphanPolicy.KEEP)
        return spawn_argv(spec, mode="spool" if capture else "detach", default_search="/bin:/usr/bin",
                          cgmode=_CGMODE[self.opts.containment], cgroot=self.opts.cgroup_root,
                          cgname=_cgroup_name(spec.group_id))

    def check(self, spec: LaunchSpec) -> None:
        target = f"ssh:{spec.where}"
        SSHTarget.parse(spec.where)
        check_spec(spec, self.context.marker, target)
        size = len(shlex.join(["sh", "-s", "--", *self._spawn_args(spec)]).encode())
        if size > MAX_COMMAND:
            raise InvalidSpec(f"argv and environment make a {size}-byte command line; an SSH "
                              f"command is one argument there, at most {MAX_COMMAND} bytes: "
                              "pass large values through a file", field="argv")

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        try:
            self.check(spec)
        except InvalidSpec as exc:
            raise StartFailed(FailureClass.INVALID_SPEC, str(exc)) from exc
        target = SSHTarget.parse(spec.where)
        args = self._spawn_args(spec)
        notes: list[str] = []
        what = f"starting group {spec.group_id}"
        run = self.pool.run
        try:
            done = await run(target, OPS, args, what=what, timeout=self.opts.command_timeout,
                             retry_after_send=False, notes=notes,
                             unverified="the start was not confirmed")
        except TargetUnreachable as exc:
            if not isinstance(exc.__cause__, _ChannelDropped | TimeoutError):
                raise
            # The command went out and the answer did not come back: end whatever
            # started, then start once more.
            swept = SSHGroup(self, target, spec.group_id, 0, -1, notes=notes,
                             claim_pgid=False, claim_sid=False)
            n = await swept.kill()
            notes.append(f"start of {spec.group_id} unconfirmed after a dropped connection; "
                         f"killed {n} process(es) carrying its marks and started again")
            done = await run(target, OPS, args, what=what + " again", notes=notes,
                             timeout=self.opts.command_timeout, retry_after_send=False,
                             unverified="the start was not confirmed")
        return self._started(target, spec, done, notes)

    def _started(self, target: SSHTarget, spec: LaunchSpec, done: ShellResult,
                 notes: list[str]) -> SSHGroup:
        reply = parse_spawn(done)
        if not reply.ran:
            raise TargetUnreachable(
                f"ssh:{target}", f"the start wrapper did not run there (exit {done.status}: "
                f"{done.err.strip()[:300] or 'no message'}); tether needs a POSIX sh on the "
                "host and a login shell that runs `sh -s`")
        for text in reply.notes:
            log.info("ssh %s: group %s: %s", target, spec.group_id, text)
            notes.append(text)
        where = f"on {target}"
        if reply.failed is not None or done.status != 0:
            code, why = reply.failed or (done.status or -1, done.err.strip()[:300])
            raise start_failure(code, why, spec, where,
                                spec.env.get("PATH", "/bin:/usr/bin (none given)"), notes)
        if reply.ok is None:
            raise TargetUnreachable(f"ssh:{target}",
                                    f"the start wrapper gave no pid ({done.out[:300]!r})")
        pid, ticks, btime, clk = reply.ok
        status = None
        if reply.exited is not None:
            failed = exec_failure(reply.exited, spec, where)
            if failed is not None:
                raise failed
            status = status_from_code(reply.exited)
        group = SSHGroup(self, target, spec.group_id, pid, ticks, btime, clk, reply.cgroup,
                         leader_status=status, notes=notes, boot=reply.boot,
                         spool=reply.spool)
        log.info("ssh %s: started group %s: %r", target, spec.group_id, group)
        return group

    async def adopt(self, group_id: str, pid: int, start_time: float | None, where: str,
                    policy: OrphanPolicy = OrphanPolicy.KILL) -> GroupHandle:
        try:
            target = SSHTarget.parse(where)
        except InvalidSpec as exc:
            raise AdoptRefused(pid, str(exc)) from exc
        shell = SSHShell(self.pool, target)
        try:
            info = parse_proc(await shell.run(OPS, ["proc", str(pid),
                                                    *marks(group_id, self.context.marker)],
                                              what=f"inspecting pid {pid} for adoption"),
                              shell.target)
        except TargetUnreachable as exc:
            raise AdoptRefused(pid, f"ssh:{target} is unreachable: {exc.why}") from exc
        p = info.proc
        if p is None or not p.alive:
            raise AdoptRefused(pid, f"no live process {pid} on {target} (it has exited or the "
                                    "pid is wrong)")
        if info.marked != "yes":
            wanted = " and ".join(marks(group_id, self.context.marker))
            raise AdoptRefused(pid, "its environment is not readable by the ssh user (another "
                                    "user?)" if info.marked == "unreadable" else
                                    f"it does not carry {wanted}: tether did not start it for "
                                    "this group")
        if start_time is not None and round((start_time - info.btime) * info.clk) != p.start:
            raise AdoptRefused(pid, f"its start time is {info.epoch(p.start):.2f}, not "
                                    f"{start_time:.2f}: the pid was reused")
        cgroup = info.cgroup_dir()
        if cgroup.rsplit("/", 1)[-1] != f"tether-{_cgroup_name(group_id)}":
            cgroup = ""
        # Not the leader of its own process group: only the marks (and cgroup) hold it.
        return SSHGroup(self, target, group_id, pid, p.start, info.btime, info.clk, cgroup,
                        notes=[f"adopted pid {pid}"], claim_pgid=p.pgid == pid,
                        claim_sid=p.sid == pid, boot=info.boot)

    async def aclose(self) -> None:
        await self.pool.aclose()
