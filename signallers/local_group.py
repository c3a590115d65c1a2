"""A group on this host: the local signaller's ``GroupHandle``.

Membership is the kernel's word where the group has a cgroup (``cgroup.procs``),
else the membership rule over a snapshot of ``/proc`` (``membership.py``). The leader
is watched through a pidfd; its exit is reaped here (it is the agent's child) and
the moment just before the reap is when its pid number was last provably the
leader's. Signals go through pidfds opened after the member was re-checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tether.core.model import Containment, LeaderStatus
from tether.signallers import cgroups, limits, procfs
from tether.signallers.base import GroupHandle, Stdio
from tether.signallers.limits import Placement
from tether.signallers.membership import Membership, Proc

if TYPE_CHECKING:
    from tether.signallers.local import LocalSignaller

log = logging.getLogger(__name__)

KILL_SWEEP_DEADLINE: Final = 10.0


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
        placement: Placement | None = None,
        stdio: Stdio | None = None,
    ) -> None:
        self._signaller = signaller
        self._stdio = stdio
        self._placement = placement or Placement()
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

    @property
    def limits(self) -> str:
        return self._placement.describe

    async def oom_kills(self) -> int:
        return limits.oom_kills(self._placement, self._cgroup)

    @property
    def stdio(self) -> Stdio | None:
        return self._stdio

    # -- leader

    def _leader_exited(self) -> None:
        # Until it is reaped, the leader's pid number is still the leader's: record that
        # moment for the membership rule before the reap frees it.
        before = procfs.now_ticks()
        now = procfs.stat(self.leader_pid)
        if now is not None and now.start == self._leader_start:
            self._members.leader_held_at(before)
        self._members.leader_exited()
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
            return [pid for pid in cgroups.tree_procs(self._cgroup) if procfs.alive(pid)]
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
        listed = cgroups.tree_procs(self._cgroup)
        fds: dict[int, int] = {}
        try:
            for pid in listed:
                with contextlib.suppress(OSError):
                    fds[pid] = os.pidfd_open(pid)
            still = set(cgroups.tree_procs(self._cgroup)) if fds else set()
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
                # cgroup.kill takes the whole subtree; "populated" speaks for it too.
                if not cgroups.populated(self._cgroup) or not cgroups.kill_all(self._cgroup):
                    return total
                total += len(cgroups.tree_procs(self._cgroup))
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
        if self._stdio is not None:
            self._stdio.finish()  # the agent finished it at the run's end; this is a guard
        if self._pidfd is not None and not procfs.alive(self.leader_pid):
            self._leader_exited()  # reap now; otherwise the SIGCHLD reaper collects it later
        if self._cgroup is not None:
            cgroups.remove(self._cgroup)
        limits.remove_v1(self._placement.v1)
