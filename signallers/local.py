"""The local signaller: process groups on this host, contained as strongly as it allows.

Containment, best first:

* ``cgroup``: a cgroup v2 directory per group (``cgroups.py``), joined before the
  program runs. ``cgroup.procs`` lists every member however it escaped (setsid,
  double fork), ``cgroup.kill`` kills them atomically, and ``cgroup.events``
  reports ``populated 0`` (watched through epoll, EPOLLPRI) when the last one
  exits.
* ``subreaper``: the agent is a child subreaper, so orphaned descendants are
  re-parented to it instead of init; every child carries the ``TETHER_GROUP``
  and ``TETHER_AGENT`` markers in its environment. Members are found by the
  membership rule (``membership.py``). Exits are seen through pidfds.
* ``pgid``: the leader's process group and session (while provably the
  leader's) and descent; a child that calls ``setsid`` *and* whose parent dies
  is lost. Reported honestly.

Waiting is event-driven: a pidfd per leader (readable at exit, before the reap),
cgroup.events via epoll, pidfds on every known member in the weaker modes,
SIGCHLD to reap re-parented orphans. Nothing sleeps in a loop.

Starting never blocks the event loop: resolving the command, opening the log
(refusing anything but a regular file, so a FIFO cannot hang the agent) and the
vfork+exec run on this signaller's own small thread pool.

PID reuse: signals go through ``pidfd_send_signal`` on a pidfd opened after the
member was identified and re-checked (cgroup membership, or start time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tether.core.errors import AdoptRefused
from tether.core.model import Containment, LeaderStatus, OrphanPolicy
from tether.signallers import cgroups, launch, procfs
from tether.signallers.base import (
    Features,
    GroupHandle,
    LaunchSpec,
    Reattach,
    Signaller,
    SignallerContext,
)
from tether.signallers.cgroups import CgroupEventWatcher, CgroupTree
from tether.signallers.membership import Membership, Proc

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER: Final = 36
KILL_SWEEP_DEADLINE: Final = 10.0
LAUNCH_THREADS: Final = 4


def make_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


# ---------------------------------------------------------------- the handle


class LocalGroup(GroupHandle):
    """A group on this host. ``repr`` shows what it is: ``<LocalGroup g-1 pid=4123 cgroup>``."""

    def __init__(
        self,
        signaller: LocalSignaller,
        group_id: str,
        leader_pid: int,
        containment: Containment,
        cgroup: Path | None,
        leader_start: int,
        *,
        child: bool,
        membership: Membership | None = None,
        leader_alive: bool = True,
    ) -> None:
        self._signaller = signaller
        self.group_id = group_id
        self.leader_pid = leader_pid
        self.pgid = leader_pid
        self.containment = containment
        self._cgroup = cgroup
        self._leader_start = leader_start
        self.leader_start_time = procfs.ticks_to_epoch(leader_start)
        self._child = child
        self._members = membership or Membership(leader_pid, leader_start)
        self._leader_status: LeaderStatus | None = None
        self._emptied_at: float | None = None
        loop = asyncio.get_running_loop()
        self._leader_done: asyncio.Future[LeaderStatus] = loop.create_future()
        self._pidfd: int | None = None
        try:
            if not leader_alive:
                raise ProcessLookupError(leader_pid)
            self._pidfd = os.pidfd_open(leader_pid)
        except ProcessLookupError:
            self._leader_exited()
        else:
            loop.add_reader(self._pidfd, self._leader_exited)

    def __repr__(self) -> str:
        state = "exited" if self._leader_status else "alive"
        return (f"<LocalGroup {self.group_id} pid={self.leader_pid} leader {state} "
                f"{self.containment.value}>")

    @property
    def cgroup(self) -> str:
        return str(self._cgroup) if self._cgroup is not None else ""

    @property
    def emptied_at(self) -> float | None:
        return self._emptied_at

    # -- leader

    def _leader_exited(self) -> None:
        # Until it is reaped, the leader's pid number is still the leader's: record that
        # moment for the membership rule before the reap frees it.
        before = procfs.now_ticks()
        now = procfs.stat(self.leader_pid)
        if now is not None and now.start == self._leader_start:
            self._members.leader_held_at(before)
        status = LeaderStatus()
        if self._child:
            try:
                pid, raw = os.waitpid(self.leader_pid, os.WNOHANG)
            except ChildProcessError:
                pid, raw = 0, 0
            if pid:
                status = LeaderStatus.from_wait_status(raw)
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._signaller.forget_leader(self.leader_pid)
        self._leader_status = status
        if not self._leader_done.done():
            self._leader_done.set_result(status)

    @property
    def leader_status(self) -> LeaderStatus | None:
        return self._leader_status

    async def wait_leader(self) -> LeaderStatus:
        return await asyncio.shield(self._leader_done)

    # -- membership

    def _scan(self) -> dict[int, Proc]:
        """Weaker modes: the membership rule over a snapshot of /proc."""
        marker = ((self._signaller.context.marker, self.group_id)
                  if self.containment is Containment.SUBREAPER else None)
        before = procfs.now_ticks()
        return self._members.members(procfs.snapshot(marker), before)

    def _scan_settled(self) -> dict[int, Proc]:
        """A scan reads a snapshot of /proc; a member alive at the snapshot may fork and die
        while the scan runs, its child missing from the snapshot. An empty result is only
        believed when a second scan, started after the first ended, agrees."""
        return self._scan() or self._scan()

    async def members(self) -> list[int]:
        if self._cgroup is not None:
            return [pid for pid in cgroups.procs(self._cgroup) if procfs.alive(pid)]
        return sorted(self._scan_settled())

    # -- signals

    async def send_signals(self, sigs: Sequence[signal.Signals]) -> int:
        """Each signal in order to every member, one pass (TERM then CONT in a stop)."""
        if self._cgroup is not None:
            return self._signal_cgroup(sigs)
        found = self._scan_settled()

        def same(pid: int) -> bool:
            p = procfs.stat(pid)
            return p is not None and p.start == found[pid].start

        return sum(procfs.signal_pid_safely(pid, sigs, same) for pid in found)

    def _signal_cgroup(self, sigs: Sequence[signal.Signals]) -> int:
        """Open a pidfd on every listed member, then read the list again: a pid still listed
        while its pidfd is held is a member (a pid reused inside the cgroup is a member
        too), so no signal reaches a process that merely inherited a member's pid."""
        assert self._cgroup is not None
        listed = cgroups.procs(self._cgroup)
        fds: dict[int, int] = {}
        try:
            for pid in listed:
                with contextlib.suppress(OSError):
                    fds[pid] = os.pidfd_open(pid)
            still = set(cgroups.procs(self._cgroup)) if fds else set()
            sent = 0
            for pid, fd in fds.items():
                if pid in still:
                    with contextlib.suppress(ProcessLookupError):
                        for s in sigs:
                            signal.pidfd_send_signal(fd, s)
                        sent += 1
            return sent
        finally:
            for fd in fds.values():
                os.close(fd)

    async def kill(self) -> int:
        """SIGKILL everything, sweeping newcomers, until empty or ``KILL_SWEEP_DEADLINE``.
        Returns how many members were listed when the kills went out."""
        deadline = time.monotonic() + KILL_SWEEP_DEADLINE
        total = 0
        atomic = self._cgroup is not None and self._signaller.tree is not None \
            and self._signaller.tree.can_kill
        while time.monotonic() < deadline:
            if atomic:
                # A batch of groups reaching their grace together is killed in one loop
                # turn: two small syscalls per group, no per-member work.
                assert self._cgroup is not None
                listed = len(cgroups.procs(self._cgroup))
                if listed == 0 or not cgroups.kill_all(self._cgroup):
                    return total
                total += listed
            else:
                n = await self.send_signal(signal.SIGKILL)
                if n == 0 and not await self.members():
                    return total
                total += n
            if await self.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                return total
        return total

    async def wait(self, timeout: float | None = None) -> bool:
        if self._cgroup is not None:
            fut = self._signaller.events.wait_empty(self._cgroup)
            if not fut.done():
                try:
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(fut)
                except TimeoutError:
                    return False
            self._emptied_at = fut.result()
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self._scan_settled()
            if not found:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            await procfs.wait_pidfds(found, remaining)

    async def close(self) -> None:
        if self._pidfd is not None and not procfs.alive(self.leader_pid):
            self._leader_exited()  # reap now; otherwise the SIGCHLD reaper collects it later
        if self._cgroup is not None:
            cgroups.remove(self._cgroup)


# ---------------------------------------------------------------- the signaller


@dataclass(eq=False)
class _Handoff:
    """Between a launch thread and the coroutine that waits for it: who ends the process
    if that coroutine is cancelled."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    wanted: bool = True
    popen: subprocess.Popen[bytes] | None = None


class LaunchAbandoned(Exception):
    """A launch whose caller had gone: its process was killed and reaped in the thread."""


def _consume(fut: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    if not fut.cancelled():
        fut.exception()


class LocalSignaller(Signaller):
    """Signaller for this host. One per agent; owns the agent instance's cgroup tree."""

    kind = "local"
    features = Features(inherit_env=True, log_probe=True, reattach=True)

    def __init__(self, context: SignallerContext | None = None) -> None:
        self.context = context or SignallerContext()
        opts = self.context.options
        self.cgroup_mount = cgroups.find_cgroup2_mount()
        self.tree: CgroupTree | None = None
        self.events = CgroupEventWatcher()
        self._leaders: set[int] = set()
        self._launching = 0
        self._reap_pending = False
        self._sigchld_loop: asyncio.AbstractEventLoop | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(LAUNCH_THREADS,
                                                           thread_name_prefix="tether-launch")
        self._shell_usable = launch.shell_usable()
        self.subreaper = opts.get("subreaper", "1") != "0" and make_subreaper()
        wanted = opts.get("containment", "auto")
        self._containment = self._detect(wanted)
        log.info("local signaller: containment %s (asked: %s)%s", self._containment.value, wanted,
                 f", cgroups under {self.tree.base}" if self.tree else "")

    @property
    def cgroup_base(self) -> Path | None:
        return self.tree.base if self.tree is not None else None

    def _detect(self, wanted: str) -> Containment:
        if wanted not in ("auto", "cgroup", "subreaper", "pgid"):
            raise ValueError(f"containment {wanted!r} is unknown; use auto, cgroup, subreaper or pgid")
        if wanted in ("auto", "cgroup") and self.cgroup_mount is not None:
            tree = CgroupTree(self.cgroup_mount, self.context.agent_name,
                              self.context.instance or f"p{os.getpid()}")
            try:
                tree.create()
            except OSError as exc:
                log.info("cgroup v2 at %s is not writable here (%s)", self.cgroup_mount, exc)
            else:
                self.tree = tree
                return Containment.CGROUP
        if wanted == "cgroup":
            raise RuntimeError(
                "containment 'cgroup' was asked for but no writable cgroup v2 hierarchy was found; "
                "run as root, delegate a cgroup to this user, or use --containment auto"
            )
        if wanted in ("auto", "subreaper") and self.subreaper:
            return Containment.SUBREAPER
        return Containment.PGID

    @property
    def containment(self) -> Containment:
        return self._containment

    # -- reaping of re-parented orphans (we are their subreaper)

    def _install_sigchld(self) -> None:
        if not self.subreaper or self._sigchld_loop is not None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signal.SIGCHLD, self._sigchld)
            self._sigchld_loop = loop
            # A full wakeup pipe only means a SIGCHLD burst: one queued byte is enough to
            # reap them all, so do not print a warning per lost byte.
            fd = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(fd, warn_on_full_buffer=False)

    def _sigchld(self) -> None:
        """A burst of SIGCHLDs (a 1000-group stop) costs one reaping pass, not 1000."""
        if not self._reap_pending and self._sigchld_loop is not None:
            self._reap_pending = True
            self._sigchld_loop.call_soon(self._reap_orphans)

    def _reap_orphans(self) -> None:
        if self._launching:
            return  # a leader being launched is not in _leaders yet: reap after the launch
        self._reap_pending = False
        for pid in procfs.children_of_self():
            if pid in self._leaders:
                continue  # its pidfd watcher reaps it and keeps the status
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def forget_leader(self, pid: int) -> None:
        self._leaders.discard(pid)

    # -- Signaller

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        self._install_sigchld()
        cgroup = None
        if self.tree is not None and self._containment is Containment.CGROUP:
            cgroup = self.tree.group_dir(spec.group_id, spec.orphan_policy)
        self._launching += 1
        try:
            handoff = _Handoff()
            launching = asyncio.get_running_loop().run_in_executor(
                self._pool, self._launch, spec, cgroup, handoff)
            try:
                popen = await asyncio.shield(launching)
            except asyncio.CancelledError:
                # The caller gave up (a probe cancelled by a stop) while the launch runs on in
                # its thread: whatever it starts is killed and reaped, never left running,
                # and the caller's cancellation completes only once that is done.
                launching.add_done_callback(_consume)  # its LaunchAbandoned is expected
                with handoff.lock:
                    handoff.wanted = False
                    started = handoff.popen
                ending = threading.Thread(target=self._abandon, args=(started, cgroup),
                                          name="tether-abandon", daemon=True) \
                    if started is not None else None
                if ending is not None:
                    ending.start()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(launching)  # ends with LaunchAbandoned, or launched
                    if ending is not None:
                        await asyncio.to_thread(ending.join)
                raise
            # No await from here to the handle: the reaper must see the leader as ours.
            self._leaders.add(popen.pid)
        finally:
            self._launching -= 1
            if self._reap_pending and self._sigchld_loop is not None:
                self._sigchld_loop.call_soon(self._reap_orphans)
        leader = procfs.stat(popen.pid)
        start = leader.start if leader is not None else procfs.now_ticks()
        try:
            handle = LocalGroup(self, spec.group_id, popen.pid, self._containment, cgroup,
                                start, child=True)
        except OSError as exc:  # EMFILE from pidfd_open: nothing of this start may live on
            self._abandon(popen, cgroup)
            raise launch.classify_exec_error(exc, spec) from exc
        # The handle reaps the leader (pidfd, waitpid) and keeps its status; the Popen object
        # must not: marked done, its destructor neither warns nor queues the pid for
        # subprocess's own reaping, which would steal the status.
        popen.returncode = 0
        return handle

    def _launch(self, spec: LaunchSpec, cgroup: Path | None, handoff: _Handoff
                ) -> subprocess.Popen[bytes]:
        """On the launch pool: start, then hand the process over, unless its caller gave
        up meanwhile: then end it here."""
        popen = launch.start(spec, cgroup, self._shell_usable)
        with handoff.lock:
            if handoff.wanted:
                handoff.popen = popen
                return popen
        self._abandon(popen, cgroup)
        raise LaunchAbandoned(spec.group_id)

    def _abandon(self, popen: subprocess.Popen[bytes], cgroup: Path | None) -> None:
        if cgroup is not None:
            cgroups.kill_all(cgroup)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        self.forget_leader(popen.pid)
        if cgroup is not None:
            with contextlib.suppress(OSError):
                cgroups.remove(cgroup)

    async def adopt(self, group_id: str, pid: int, start_time: float | None, where: str,
                    policy: OrphanPolicy = OrphanPolicy.KILL) -> GroupHandle:
        self._install_sigchld()
        if pid in (os.getpid(), 1):
            raise AdoptRefused(pid, "that is the agent itself or init")
        leader = procfs.stat(pid)
        if leader is None:
            raise AdoptRefused(pid, "no such process (it has exited or the pid is wrong)")
        if not leader.alive:
            raise AdoptRefused(pid, "it has already exited (zombie)")
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            raise AdoptRefused(pid, "no such process (it has exited)") from None
        if os.geteuid() != 0 and uid != os.getuid():
            raise AdoptRefused(pid, f"it runs as uid {uid}, this agent as uid {os.getuid()}")
        if start_time is not None and leader.start != procfs.epoch_to_ticks(start_time):
            raise AdoptRefused(
                pid, f"its start time is {procfs.ticks_to_epoch(leader.start):.2f}, not "
                     f"{start_time:.2f}: the pid was reused")
        # Only claim the process group / session if the adopted process leads it: a
        # child of an interactive shell shares the shell's, which is not ours to end.
        membership = Membership(pid, leader.start, claim_pgid=leader.pgid == pid,
                                claim_sid=leader.sid == pid)
        cgroup = None
        if self.tree is not None and self._containment is Containment.CGROUP:
            cgroup = self.tree.group_dir(group_id, policy)
            cgroup.mkdir(exist_ok=True)
            try:
                self._move_tree(membership, cgroup)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    cgroups.kill_all(cgroup)  # nothing half-adopted stays in our tree
                    cgroups.remove(cgroup)
                raise AdoptRefused(pid, f"cannot move it into {cgroup}: {exc}") from exc
        handle = LocalGroup(self, group_id, pid, self._containment, cgroup, leader.start,
                            child=False, membership=membership)
        if not membership.claim_pgid:
            handle.pgid = -1
        return handle

    @staticmethod
    def _move_tree(membership: Membership, cgroup: Path) -> None:
        """Move every member of an adopted tree into its cgroup, oldest first, until a
        snapshot finds no member outside (a fork during the move lands in the next pass)."""
        for _ in range(5):
            outside = [p for p in membership.members(procfs.snapshot(), procfs.now_ticks()).values()
                       if p.pid not in set(cgroups.procs(cgroup))]
            if not outside:
                return
            for p in sorted(outside, key=lambda p: p.start):
                current = procfs.stat(p.pid)
                if current is not None and current.start == p.start:
                    with contextlib.suppress(ProcessLookupError):
                        cgroups.write(cgroup / "cgroup.procs", str(p.pid).encode())

    async def reattach(self, record: Reattach) -> GroupHandle | None:
        """After an agent restart: take back a group that survived, or None if it is gone.
        The leader counts as alive only if its start time still matches (PID reuse)."""
        self._install_sigchld()
        start = procfs.epoch_to_ticks(record.leader_start_time)
        leader = procfs.stat(record.leader_pid)
        leader_alive = leader is not None and leader.start == start and leader.alive
        cgroup = Path(record.cgroup) if record.cgroup else None
        if cgroup is not None and not cgroup.is_dir():
            cgroup = None
        containment = Containment.CGROUP if cgroup is not None else (
            Containment.SUBREAPER if self.subreaper else Containment.PGID)
        membership = Membership(record.leader_pid, start)
        if leader is not None and leader.start != start:
            # The pid now names an unrelated process: its pgid/sid are not ours.
            membership.claim_pgid = membership.claim_sid = False
        handle = LocalGroup(self, record.group_id, record.leader_pid, containment, cgroup,
                            start, child=False, membership=membership,
                            leader_alive=leader_alive)
        if not membership.claim_pgid:
            handle.pgid = -1
        if not await handle.members():
            await handle.close()
            return None
        return handle

    async def aclose(self) -> None:
        if self._sigchld_loop is not None and not self._sigchld_loop.is_closed():
            self._sigchld_loop.remove_signal_handler(signal.SIGCHLD)
        self._sigchld_loop = None
        self.events.close()
        self.events = CgroupEventWatcher()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.tree is not None:
            # Empty unless `keep` groups still run (then the guardian/next agent needs it).
            self.tree.remove()
