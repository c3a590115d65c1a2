"""``RemoteGroup``: one group handle for every remote target, written once over a
``RemoteShell``.

Membership
    Every look is one ``scan`` (the target's whole process table, the marker search and
    the group's cgroup in one pass); *which* processes are members is decided here, by
    the one rule in ``signallers/membership.py``: the group's cgroup or both marks
    (``TETHER_GROUP`` and this agent instance's ``TETHER_AGENT``), the leader's process
    group or session only while the leader's pid number is provably still the
    leader's (start time in clock ticks, and the clock read before the table), and
    descent. An empty answer is believed only when a second scan, begun after the first
    ended, agrees (a member may fork and die while the table is read).

Signals
    Membership is decided here, the signals are sent there: the ``signal`` operation
    gets ``PID:START`` per member and signals a pid only if it still started at that
    tick and is not a zombie (no pidfd in a shell: the window is one ``/proc`` read),
    and the leader's process group only while the leader's number still holds its start
    time. A stop's signals (TERM then CONT) go out in one pass.

Waiting
    The one poll loop: ``wait`` scans, then waits until every member it found has ended
    (a transport that can hold a channel open runs ``watch`` there, which checks with
    backoff from 10 ms to 200 ms and prints a heartbeat; otherwise ``watch 1`` is polled
    with bounded exponential backoff, ``POLL_FIRST`` doubling to ``POLL_MAX_BOUNDED`` for
    a bounded wait or ``POLL_MAX_UNBOUNDED`` for an open-ended one, and any event the
    transport offers resets it), then scans again. When the target cannot be asked,
    ``wait``, ``wait_leader`` and ``members`` raise ``TargetUnreachable`` (the agent's
    watcher retries with backoff): a group is never reported empty because nobody could
    look. A target that ended (``TargetGone``) is empty.

Kill
    The one sweep: SIGKILL every member, wait up to a second, again, until empty or the
    deadline; what survives is logged, kept in ``detail``, and handed to ``survived``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping, Sequence
from typing import Final

from tether.core.errors import TargetUnreachable
from tether.core.model import Containment, LeaderStatus
from tether.signallers.base import GroupHandle
from tether.signallers.membership import Membership, Proc
from tether.signallers.remote.wire import (
    OPS,
    RemoteShell,
    ShellResult,
    TargetGone,
    marks,
    parse_scan,
    signal_names,
)

log = logging.getLogger("tether.signallers.remote")

POLL_FIRST: Final = 0.05
POLL_MAX_BOUNDED: Final = 1.0
POLL_MAX_UNBOUNDED: Final = 5.0
KILL_SWEEP_DEADLINE: Final = 10.0


def note(notes: list[str], text: str, keep: int = 20) -> None:
    """Remember what happened to a group (for its exit record): the latest ``keep``."""
    notes.append(text)
    del notes[:-keep]


class RemoteGroup(GroupHandle):
    """A group on a remote target: ``<RemoteGroup g-1 docker:web pid=12 leader alive pgid>``."""

    def __init__(self, shell: RemoteShell, group_id: str, agent_marker: str, leader_pid: int,
                 leader_start: int, btime: int, clk: int, *, containment: Containment,
                 cgroup: str = "", claim_pgid: bool = True, claim_sid: bool = True,
                 leader_status: LeaderStatus | None = None,
                 notes: list[str] | None = None, boot: str = "") -> None:
        self.shell = shell
        self.group_id = group_id
        self.leader_pid = leader_pid
        self.pgid = leader_pid if claim_pgid else -1
        self.containment = containment
        self.clk = max(clk, 1)
        self.leader_start_time = btime + leader_start / self.clk
        self._leader_start = leader_start
        self._marks = marks(group_id, agent_marker)
        self._cgroup = cgroup
        self._membership = Membership(leader_pid, leader_start, claim_pgid, claim_sid)
        self._leader_status = leader_status
        #: The target's boot id when the group started: after a reboot, a pid with the
        #: leader's number and start tick is somebody else (boots are much alike).
        self._boot = boot
        self.notes: list[str] = notes if notes is not None else []
        # One scan at a time, results applied in order; a closed group scans no more, so a
        # stop reported done leaves no scan of ours running there.
        self._scan_lock = asyncio.Lock()
        self._closed = False
        self._killed: set[int] = set()
        self.log = logging.LoggerAdapter(log, {"group": group_id, "target": shell.target})

    def __repr__(self) -> str:
        leader = "exited" if self._leader_status is not None else "alive"
        return (f"<{type(self).__name__} {self.group_id} {self.shell.target} "
                f"pid={self.leader_pid} leader {leader} {self.containment.value}>")

    @property
    def cgroup(self) -> str:
        return self._cgroup

    @property
    def detail(self) -> str:
        return "; ".join(self.notes)

    @property
    def leader_status(self) -> LeaderStatus | None:
        return self._leader_status

    # -- hooks for a transport's own knowledge

    def kill_deadline(self) -> float:
        return KILL_SWEEP_DEADLINE

    def wake_keys(self) -> Sequence[str]:
        """Keys for ``RemoteShell.listen`` (a container, an exec)."""
        return ()

    async def busy(self, targets: Sequence[str]) -> bool:
        """True if some target is known alive without asking the target (a running exec)."""
        return False

    async def survived(self, pids: list[int], deadline: float) -> None:
        """Members outlived the SIGKILL sweep (another user's, stuck in the kernel)."""
        self.log.warning("group %s still had members %s after %g s of SIGKILL sweeps (another "
                         "user's process, or stuck in the kernel?)", self.group_id, pids, deadline)
        note(self.notes, f"SIGKILL sweeps for {deadline:g} s left members {pids} alive")

    # -- membership

    async def _scan(self) -> dict[int, Proc]:
        if self._closed:
            return {}
        async with self._scan_lock:
            if self._closed:
                return {}
            result = await self.shell.run(OPS, ["scan", *self._marks, self._cgroup],
                                          what=f"listing the members of group {self.group_id}")
            snap = parse_scan(result, self.clk, self.shell.target)
            if snap.boot and self._boot and snap.boot != self._boot:
                note(self.notes, "the target rebooted: every process of the group ended")
                raise TargetGone(self.shell.target, f"it rebooted (boot id {snap.boot}, not "
                                 f"{self._boot}); every process of group {self.group_id} "
                                 "ended with it")
            self._boot = self._boot or snap.boot
            return self._membership.members(snap.procs, snap.now)

    async def _settled(self) -> dict[int, Proc]:
        return await self._scan() or await self._scan()

    async def members(self) -> list[int]:
        return sorted(await self._settled())

    # -- signals

    def _targets(self, found: Mapping[int, Proc]) -> list[str]:
        lead = self.leader_pid
        grouped = self._membership.claim_pgid and any(p.pgid == lead for p in found.values())
        out = [f"-{lead}:{self._leader_start}"] if grouped else []
        out += [f"{'g' if grouped and p.pgid == lead else ''}{p.pid}:{p.start}"
                for p in found.values()]
        return out

    async def send_signals(self, sigs: Sequence[signal.Signals]) -> int:
        found = await self._settled()
        if not found:
            return 0
        names = signal_names(sigs)
        result = await self.shell.run(
            OPS, ["signal", names, self._cgroup, *self._targets(found)],
            what=f"sending {names} to group {self.group_id}",
            unverified=f"{names} may or may not have been delivered")
        if result.status != 0 or "Z" not in result.out.splitlines():
            raise TargetUnreachable(self.shell.target, f"sending {names} to group "
                                    f"{self.group_id} failed (status {result.status}: "
                                    f"{result.first_line()[:200]!r})")
        refused = [row[1] for row in result.rows() if row[0] == "e" and len(row) > 1]
        if refused:
            self.log.warning("%s was refused for pid(s) %s (another user's process?)", names,
                             ", ".join(sorted(set(refused))))
        self._killed.update(found)
        return len(found)

    async def kill(self) -> int:
        """SIGKILL every member, sweeping newcomers, until empty or the deadline. Returns how
        many distinct members the kills went to."""
        loop = asyncio.get_running_loop()
        limit = self.kill_deadline()
        deadline = loop.time() + limit
        self._killed = set()
        while loop.time() < deadline:
            if await self.send_signal(signal.SIGKILL) == 0:
                return len(self._killed)
            if await self.wait(min(1.0, max(0.0, deadline - loop.time()))):
                return len(self._killed)
        left = await self.members()
        if left:
            await self.survived(left, limit)
        return len(self._killed)

    # -- waiting

    async def wait(self, timeout: float | None = None) -> bool:
        scope = asyncio.timeout(timeout)
        try:
            if timeout is not None and timeout <= 0:
                return not await self._settled()
            cap = POLL_MAX_UNBOUNDED if timeout is None else POLL_MAX_BOUNDED
            async with scope, self.shell.listen(self.wake_keys()) as woke:
                found = await self._settled()
                while found:
                    await self._until_gone([f"{p.pid}:{p.start}" for p in found.values()],
                                           woke, cap)
                    found = await self._settled()
            return True
        except TimeoutError:
            if scope.expired():
                return False
            raise
        except TargetGone:
            return True
        finally:
            # The scope holds this task: kept in a traceback, task -> exception -> frame ->
            # scope -> task would be a cycle that only a later garbage collection frees.
            del scope

    async def _until_gone(self, targets: list[str], woke: asyncio.Event, cap: float) -> None:
        """Return once no ``PID:START`` in ``targets`` is alive there."""
        what = f"waiting for group {self.group_id} to end"

        def gone(result: ShellResult) -> bool:
            if result.status not in (0, 1):
                raise TargetUnreachable(self.shell.target, f"{what}: the check failed (status "
                                        f"{result.status}: {result.first_line()[:200]!r})")
            return result.status == 0

        followed = await self.shell.follow(OPS, ["watch", "0", *targets], what=what)
        if followed is not None and gone(followed):
            return
        delay = POLL_FIRST
        while True:
            woke.clear()
            if not await self.busy(targets) and gone(
                    await self.shell.run(OPS, ["watch", "1", *targets], what=what)):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woke.wait(), delay)
            delay = POLL_FIRST if woke.is_set() else min(delay * 2, cap)

    async def wait_leader(self) -> LeaderStatus:
        """Until the leader has exited. Its status is known only where the transport knows it
        (a remote leader is nobody's child of ours): else ``LeaderStatus()``."""
        if self._leader_status is None:
            try:
                async with self.shell.listen(self.wake_keys()) as woke:
                    await self._until_gone([f"{self.leader_pid}:{self._leader_start}"], woke,
                                           POLL_MAX_UNBOUNDED)
            except TargetGone:
                pass
            if self._leader_status is None:
                self._leader_status = LeaderStatus()
        return self._leader_status

    async def close(self) -> None:
        """The group has ended: wait for a scan still in flight, and scan no more."""
        self._closed = True
        async with self._scan_lock:
            pass
