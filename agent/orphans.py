"""Orphans: live processes of this agent's (marker or cgroup) that belong to no live group.

Left by a crash, by an earlier run of the agent, or escaped in a way the
containment did not hold. Found at start-up and whenever a group ends (scans
are coalesced: a burst of group ends costs one scan), counted, and reaped per
policy (``kill`` by default; ``report`` only lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from tether.core.model import MARKER_ENV
from tether.core.sessions import Orphan
from tether.signallers import cgroups, procfs
from tether.signallers.cgroups import CgroupTree

log = logging.getLogger(__name__)


def base_group(marker: str) -> str:
    """Probe processes carry ``g-x.probe3``: they belong to ``g-x``."""
    return marker.split(".", 1)[0]


#: Processes read between two yields to the event loop.
SCAN_SLICE = 64


async def find_orphans(agent_marker: str, tree: CgroupTree | None, live: set[str]
                       ) -> list[Orphan]:
    """Scan /proc (and this instance's cgroup tree) for processes of ours outside every
    live group. Only this agent instance's marker and tree count: another agent on the
    host, even one with the same name, is never looked at.

    Runs on the event loop in slices (a thread would hold the GIL against the loop and
    stall whatever the agent does meanwhile by up to the interpreter's switch interval): each
    process costs one read of its environment, searched as bytes for the marker; only
    the matches are parsed."""
    now = time.time()
    found: dict[int, Orphan] = {}
    me = os.getpid()
    for n, pid in enumerate(procfs.pids()):
        if n % SCAN_SLICE == SCAN_SLICE - 1:
            await asyncio.sleep(0)
        if pid == me:
            continue
        block = procfs.environ(pid)
        if not procfs.carries(block, agent_marker):
            continue
        gid = procfs.env_value(block, MARKER_ENV)
        if gid is None or base_group(gid) in live:
            continue
        orphan = _describe(pid, base_group(gid), "marker", now)
        if orphan is not None:
            found[pid] = orphan
    if tree is not None:
        for d in tree.group_dirs():
            if base_group(d.name) in live:
                continue
            for pid in cgroups.tree_procs(d):
                if pid not in found:
                    orphan = _describe(pid, base_group(d.name), "cgroup", now, str(d))
                    if orphan is not None:
                        found[pid] = orphan
    return sorted(found.values(), key=lambda o: o.pid)


def _describe(pid: int, group: str, found_by: str, now: float, cgroup: str = ""
              ) -> Orphan | None:
    p = procfs.stat(pid)
    if p is None or not p.alive:
        return None
    ctime = procfs.ticks_to_epoch(p.start)
    return Orphan(pid, procfs.cmdline(pid) or p.comm, group, now - ctime, found_by,
                  create_time=ctime, cgroup=cgroup)


class OrphanReaper:
    """Owns orphan scans for one agent; exposes counts for metrics."""

    def __init__(self, agent_marker: str, tree: CgroupTree | None, live: Callable[[], set[str]],
                 policy: str = "kill",
                 on_detect: Callable[[int], None] = lambda n: None,
                 on_reap: Callable[[int], None] = lambda n: None,
                 on_current: Callable[[int], None] = lambda n: None,
                 settle: Callable[[], Awaitable[None]] | None = None) -> None:
        if policy not in ("kill", "report"):
            raise ValueError(f"orphan reaping {policy!r} is unknown; use kill or report")
        self.agent_marker = agent_marker
        self.tree = tree
        self.live = live
        self.policy = policy
        self.on_detect = on_detect
        self.on_reap = on_reap
        self.on_current = on_current
        self.settle = settle
        self.current: list[Orphan] = []
        self._seen: set[tuple[int, float]] = set()
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()

    def request_scan(self) -> None:
        """Coalesced: many group ends in a burst cause one scan."""
        self._dirty.set()

    async def run(self, min_interval: float = 1.0) -> None:
        """Scan when asked; a burst of requests within ``min_interval`` costs one scan (a
        scan reads every process on the host, so a 1000-group stop must not cause 1000)."""
        while True:
            await self._dirty.wait()
            if self.settle is not None:
                # A scan in the middle of a 1000-group stop would compete with it for the
                # CPU and the GIL; the groups being stopped are verified by their own stops.
                await self.settle()
            self._dirty.clear()
            try:
                await self.sweep(self.policy == "kill")
            except Exception:
                log.exception("orphan scan failed")
            await asyncio.sleep(min_interval)

    async def sweep(self, kill: bool) -> list[Orphan]:
        async with self._lock:
            before = self.live()
            found = await find_orphans(self.agent_marker, self.tree, before)
            # Groups spawned while the scan ran (between its slices) are live, not orphans. From
            # here to the kill nothing awaits, so no group can start in between.
            live = before | self.live()
            found = [o for o in found if o.former_group not in live]
            new = [o for o in found if (o.pid, o.create_time) not in self._seen]
            for o in new:
                self._seen.add((o.pid, o.create_time))
                log.warning("orphan pid %d (former group %s, found by %s): %s", o.pid,
                            o.former_group, o.found_by, o.command)
            if new:
                self.on_detect(len(new))
            if kill and found:
                found = await self._reap(found, live)
            self.current = [o for o in found if not o.reaped]
            self.on_current(len(self.current))
            return found

    async def _reap(self, orphans: list[Orphan], live: set[str]) -> list[Orphan]:
        times = {o.pid: o.create_time for o in orphans}
        reaped: set[int] = set()
        for d in {o.cgroup for o in orphans if o.cgroup}:
            cgroups.kill_all(d)
        for o in orphans:
            if procfs.signal_pid_safely(o.pid, signal.SIGKILL,
                                        lambda pid: procfs.same_process(pid, times[pid])):
                reaped.add(o.pid)
        await procfs.wait_pidfds([o.pid for o in orphans], 5.0)
        reaped |= {o.pid for o in orphans if o.found_by == "cgroup"}
        live = live | self.live()  # never remove the cgroup of a group we know
        for d in {o.cgroup for o in orphans if o.cgroup and o.former_group not in live}:
            with contextlib.suppress(OSError):
                cgroups.remove(d)
        if reaped:
            log.warning("reaped %d orphan(s)", len(reaped))
            self.on_reap(len(reaped))
        return [replace(o, reaped=o.pid in reaped) for o in orphans]
