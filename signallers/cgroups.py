"""cgroup v2 for the local signaller: the agent instance's subtree, and its events.

Layout, under the cgroup the agent itself runs in::

    tether.<agent>.<instance>/      one per agent instance: no other live agent shares it
        kill/<group-id>/            groups whose orphan policy is kill
        keep/<group-id>/            groups that outlive their agent, for re-adoption

The instance part makes two agents on one host (even with one name, or names that
sanitise alike) own disjoint trees. Splitting by policy lets the guardian end every
``kill`` group of its dead agent with one write to ``kill/cgroup.kill``, without
reading any state file, so a file that cannot be read never turns a ``keep`` group
into a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

from tether.core.model import OrphanPolicy
from tether.signallers import procfs
from tether.signallers.membership import Membership
from tether.signallers.procfs import read_small

log = logging.getLogger(__name__)

POLICY_DIRS = {OrphanPolicy.KILL: "kill", OrphanPolicy.KEEP: "keep"}


def find_cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """The cgroup v2 mount point, wherever the host put it (``/sys/fs/cgroup`` or ``.../unified``)."""
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def own_cgroup(pid: int | str = "self") -> str:
    """A process's path in the unified hierarchy ("0::/path")."""
    with contextlib.suppress(OSError):
        for line in read_small(f"/proc/{pid}/cgroup").decode().splitlines():
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def procs(cgroup: Path | str) -> list[int]:
    """PIDs listed in ``cgroup.procs`` (zombies included); [] if the cgroup is gone."""
    try:
        return [int(p) for p in read_small(f"{cgroup}/cgroup.procs").split()]
    except FileNotFoundError:
        return []


def subtree(cgroup: Path | str) -> list[Path]:
    """The cgroup and every cgroup below it, parents first. A program may make cgroups of
    its own inside its group's (a nested tether, a container runtime): they are the
    group's too."""
    out = [Path(cgroup)]
    for root, dirs, _ in os.walk(cgroup):
        out.extend(Path(root) / d for d in sorted(dirs))
    return out


def tree_procs(cgroup: Path | str) -> list[int]:
    """PIDs in the cgroup and in every cgroup below it."""
    found: list[int] = []
    for c in subtree(cgroup):
        found.extend(procs(c))
    return found


def write(path: Path | str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def kill_all(cgroup: Path | str) -> bool:
    """``cgroup.kill``: SIGKILL every member at once. False if the cgroup is gone."""
    try:
        write(f"{cgroup}/cgroup.kill", b"1")
    except FileNotFoundError:
        return False
    return True


def populated(cgroup: Path | str) -> bool:
    try:
        return b"populated 1" in read_small(f"{cgroup}/cgroup.events")
    except FileNotFoundError:
        return False


def remove(cgroup: Path | str) -> bool:
    """rmdir an empty cgroup and the (empty) cgroups a program made inside it, deepest
    first; True if it is gone. A busy one is left (and logged)."""
    try:
        for c in reversed(subtree(cgroup)):
            os.rmdir(c)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        log.warning("cgroup %s still busy; left in place", cgroup)
        return False
    return True


def move_tree(membership: Membership, cgroup: Path) -> None:
    """Move every member of an adopted tree into its cgroup, oldest first, until a
    snapshot finds no member outside (a fork during the move lands in the next pass)."""
    for _ in range(5):
        inside = set(procs(cgroup))
        outside = [p for p in membership.members(procfs.snapshot(), procfs.now_ticks()).values()
                   if p.pid not in inside]
        if not outside:
            return
        for p in sorted(outside, key=lambda p: p.start):
            current = procfs.stat(p.pid)
            if current is not None and current.start == p.start:
                with contextlib.suppress(ProcessLookupError):
                    write(cgroup / "cgroup.procs", str(p.pid).encode())


class CgroupTree:
    """One agent instance's subtree (see the module docstring)."""

    def __init__(self, mount: Path, agent_name: str, instance: str) -> None:
        self.name = f"tether.{safe_name(agent_name)}.{safe_name(instance)}"
        self.base = mount / own_cgroup().lstrip("/") / self.name
        self.can_kill = False

    def create(self) -> None:
        """Make the tree; raises OSError if cgroup v2 is not writable here."""
        self.base.mkdir(exist_ok=True)
        for sub in POLICY_DIRS.values():
            (self.base / sub).mkdir(exist_ok=True)
        probe = self.base / "kill" / ".probe"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        # cgroup.kill (Linux 5.14+) kills every member at once, setsid escapees too.
        self.can_kill = (self.base / "cgroup.kill").exists()

    def group_dir(self, group_id: str, policy: OrphanPolicy) -> Path:
        return self.base / POLICY_DIRS[policy] / group_id

    def group_dirs(self) -> Iterator[Path]:
        """Every group directory of the tree (live groups and leftovers)."""
        for sub in POLICY_DIRS.values():
            with contextlib.suppress(FileNotFoundError):
                for d in (self.base / sub).iterdir():
                    if d.is_dir():
                        yield d

    def remove(self) -> None:
        """Remove the tree if nothing lives in it (``keep`` groups keep it for the next
        instance)."""
        for d in list(self.group_dirs()):
            if not populated(d):
                with contextlib.suppress(OSError):
                    remove(d)
        for sub in POLICY_DIRS.values():
            with contextlib.suppress(OSError):
                (self.base / sub).rmdir()
        with contextlib.suppress(OSError):
            self.base.rmdir()


class CgroupEventWatcher:
    """One epoll over every group's cgroup.events; resolves waiters on ``populated 0``."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, tuple[Path, list[asyncio.Future[float]]]] = {}
        self._by_path: dict[Path, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._epoll.fileno(), self._on_ready)

    def wait_empty(self, cgroup: Path) -> asyncio.Future[float]:
        """A future resolved with the ``time.monotonic()`` at which the cgroup was seen empty."""
        self._ensure_reader()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        fd = self._by_path.get(cgroup)
        if fd is not None:
            self._fds[fd][1].append(fut)
        else:
            try:
                fd = os.open(cgroup / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fut.set_result(time.monotonic())  # the cgroup is gone: nothing lives in it
                return fut
            self._epoll.register(fd, select.EPOLLPRI | select.EPOLLERR)
            self._fds[fd] = (cgroup, [fut])
            self._by_path[cgroup] = fd
        # Check after registering: the cgroup may have emptied before.
        if b"populated 1" not in os.pread(fd, 256, 0):
            self._resolve(fd)
        return fut

    def _resolve(self, fd: int) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            return
        now = time.monotonic()  # when the agent learned the cgroup is empty
        for w in entry[1]:
            if not w.done():
                w.set_result(now)
        self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, OSError):
            self._epoll.unregister(fd)
        os.close(fd)
        path, _ = self._fds.pop(fd)
        self._by_path.pop(path, None)

    def _on_ready(self) -> None:
        for fd, _ in self._epoll.poll(0):
            entry = self._fds.get(fd)
            if entry is None:
                continue
            _, waiters = entry
            try:
                text = os.pread(fd, 256, 0).decode()
            except OSError:
                text = "populated 0"
            waiters[:] = [w for w in waiters if not w.done()]
            if "populated 0" in text or not waiters:
                self._resolve(fd)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._epoll.fileno())
        for fd in list(self._fds):
            for w in self._fds[fd][1]:
                w.cancel()
            self._unregister(fd)
        self._epoll.close()
