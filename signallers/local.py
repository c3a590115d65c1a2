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
import functools
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Final

from tether.core.errors import AdoptRefused, InvalidSpec
from tether.core.model import Containment, OrphanPolicy
from tether.signallers import cgroups, launch, limits, procfs
from tether.signallers.base import (
    Features,
    GroupHandle,
    LaunchSpec,
    Reattach,
    Signaller,
    SignallerContext,
)
from tether.signallers.cgroups import CgroupEventWatcher, CgroupTree
from tether.signallers.limits import Limiter, Placement
from tether.signallers.local_group import LocalGroup
from tether.signallers.membership import Membership
from tether.signallers.stdio import PipeStdio

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER: Final = 36
LAUNCH_THREADS: Final = 16  # a stuck filesystem holds a thread per launch that touches it
TEE_THREADS: Final = 4


def make_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


class LocalSignaller(Signaller):
    """Signaller for this host. One per agent; owns the agent instance's cgroup tree."""

    kind = "local"
    features = Features(inherit_env=True, log_probe=True, reattach=True, run_as_user=True,
                        ports=True, limits=True, host_files=True, stdin_pipe=True)

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
        # Appends captured output to --log files: a stuck filesystem holds one of these.
        self._tee_pool = concurrent.futures.ThreadPoolExecutor(TEE_THREADS,
                                                               thread_name_prefix="tether-log")
        self._shell_usable = launch.shell_usable()
        self.subreaper = opts.get("subreaper", "1") != "0" and make_subreaper()
        wanted = opts.get("containment", "auto")
        self._containment = self._detect(wanted)
        self.limiter: Limiter | None = None
        if self.tree is not None and self.cgroup_mount is not None:
            self.limiter = Limiter(self.tree, self.cgroup_mount)
            log.info("resource limits: %s", ", ".join(
                f"{c} via cgroup {self.limiter.how(c) or 'unavailable'}"
                for c in limits.CONTROLLERS))
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

    def check(self, spec: LaunchSpec) -> None:
        if spec.limits:
            if self._containment is not Containment.CGROUP or self.limiter is None:
                flags = "/".join(f"--{c}" for c in ("memory", "cpus", "pids")
                                 if getattr(spec.limits, c) is not None)
                raise InvalidSpec(
                    f"{flags} needs cgroup containment, and this agent runs with containment "
                    f"{self._containment.value} (no writable cgroup v2 tree); run the agent as "
                    "root or in a delegated cgroup, or drop the limits", field="limits")
            self.limiter.check(spec.limits, "local")

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        self._install_sigchld()
        cgroup = None
        if self.tree is not None and self._containment is Containment.CGROUP:
            cgroup = self.tree.group_dir(spec.group_id, spec.orphan_policy)
        self._launching += 1
        fut = asyncio.get_running_loop().run_in_executor(
            self._pool, launch.start, spec, cgroup, self._shell_usable, self.limiter)
        try:
            launched = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The launch thread goes on (a probe cancelled at its group's start timeout):
            # what it starts must not outlive the cancel, nor run as nobody's.
            fut.add_done_callback(functools.partial(self._launched_after_cancel, cgroup))
            raise
        except BaseException:
            self._launch_done()
            raise
        popen = launched.popen
        # No await from here to the handle: the reaper must see the leader as ours.
        self._leaders.add(popen.pid)
        self._launch_done()
        leader = procfs.stat(popen.pid)
        start = leader.start if leader is not None else procfs.now_ticks()
        stdio = None
        if launched.pipes is not None:
            stdio = PipeStdio(*launched.pipes, log_path=spec.log_path, pool=self._tee_pool)
            launched.pipes = None  # the handle's now
        try:
            handle = LocalGroup(self, spec.group_id, popen.pid, self._containment, cgroup,
                                start, child=True, placement=launched.placement, stdio=stdio)
        except OSError as exc:  # EMFILE from pidfd_open: nothing of this start may live on
            self._abandon(popen, cgroup)
            limits.remove_v1(launched.placement.v1)
            for fd in stdio.fds() if stdio is not None else ():
                os.close(fd)
            raise launch.classify_exec_error(exc, spec) from exc
        # The handle reaps the leader (pidfd, waitpid) and keeps its status; the Popen object
        # must not: marked done, its destructor neither warns nor queues the pid for
        # subprocess's own reaping, which would steal the status.
        popen.returncode = 0
        return handle

    def _launch_done(self) -> None:
        self._launching -= 1
        if self._reap_pending and self._sigchld_loop is not None:
            self._sigchld_loop.call_soon(self._reap_orphans)

    def _launched_after_cancel(self, cgroup: Path | None,
                               fut: asyncio.Future[launch.Launched]) -> None:
        try:
            if not fut.cancelled() and fut.exception() is None:
                launched = fut.result()
                self._abandon(launched.popen, cgroup)
                limits.remove_v1(launched.placement.v1)
                launched.close_pipes()
        finally:
            self._launch_done()

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
                cgroups.move_tree(membership, cgroup)
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

    async def reattach(self, record: Reattach) -> GroupHandle | None:
        """After an agent restart: take back a group that survived, or None if it is gone.
        The leader counts as alive only if its start time still matches (PID reuse)."""
        self._install_sigchld()
        if record.leader_pid <= 0:
            return await self._reattach_unlaunched(record)
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
        placement = (self.limiter.existing(record.group_id) if self.limiter is not None
                     else Placement())
        handle = LocalGroup(self, record.group_id, record.leader_pid, containment, cgroup,
                            start, child=False, membership=membership,
                            leader_alive=leader_alive, placement=placement)
        if not membership.claim_pgid:
            handle.pgid = -1
        if not await handle.members():
            await handle.close()
            return None
        return handle

    async def _reattach_unlaunched(self, record: Reattach) -> GroupHandle | None:
        """The agent died between the durable record and writing the leader's pid: only
        the group's cgroup (its path follows from the id) can say what, if anything,
        was launched. Without cgroups nothing proves membership: not re-adopted (the
        orphan sweep finds such processes by marker)."""
        if self.tree is None or self._containment is not Containment.CGROUP:
            return None
        cgroup = self.tree.group_dir(record.group_id, record.orphan_policy)
        if not cgroup.is_dir():
            return None
        handle = LocalGroup(self, record.group_id, 0, Containment.CGROUP, cgroup, 0,
                            child=False, leader_alive=False,
                            membership=Membership(0, 0, claim_pgid=False, claim_sid=False))
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
        self._tee_pool.shutdown(wait=False)  # queued appends still run
        if self.tree is not None:
            # Empty unless `keep` groups still run (then the guardian/next agent needs it).
            self.tree.remove()
        if self.limiter is not None:
            self.limiter.remove_tree()
