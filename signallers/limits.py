"""Resource limits (``--memory``, ``--cpus``, ``--pids``) for the local signaller's groups.

Per controller, best first:

* **cgroup v2**, where the host delegates the controller to the agent: it is enabled
  on the way down (``+memory +cpu +pids`` into ``cgroup.subtree_control`` of the
  agent's own cgroup, its tree and the tree's ``kill``/``keep`` dirs; processes live
  only in the leaf group dirs, so the no-internal-processes rule holds) and the
  limit is written into the group's own cgroup: ``memory.max``, ``cpu.max``,
  ``pids.max``. OOM kills are counted in ``memory.events`` (``oom_kill``).
* **cgroup v1**, on "hybrid" hosts (systemd's, and many containers) where the v2
  tree exists but the controller is bound to a v1 hierarchy: a per-group cgroup in
  that hierarchy, under the agent's own cgroup there (found through
  ``/proc/self/mountinfo`` and ``/proc/self/cgroup``, never a fixed path), named like
  the v2 tree: ``<own>/tether.<agent>.<instance>/<group>``. The launch puts the
  program there at the same point it joins its v2 cgroup (the gate shell's pid, or
  ``0`` written by the child before exec), so it never runs a single instruction
  outside its limits. ``memory.limit_in_bytes``, ``cpu.cfs_quota_us`` over
  ``cpu.cfs_period_us``, ``pids.max``; OOM kills from ``memory.oom_control``
  (``oom_kill``, Linux 4.13+). The v1 cgroups are removed when the group ends.

Containment stays the v2 cgroup's job (membership, ``cgroup.kill``, events); the v1
cgroups only carry limits. Without cgroup v2 containment limits are refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tether.core.errors import InvalidSpec
from tether.core.model import Limits
from tether.signallers import cgroups
from tether.signallers.procfs import read_small

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD = 100_000
FLAGS = {"memory": "--memory", "cpu": "--cpus", "pids": "--pids"}


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def find_v1(mountinfo: str = "/proc/self/mountinfo", cgroup: str = "/proc/self/cgroup"
            ) -> dict[str, Path]:
    """controller -> this process's own cgroup directory in that controller's v1 hierarchy,
    for the controllers tether limits (memory, cpu, pids) that are mounted as v1."""
    try:
        mounts = Path(mountinfo).read_text()
        own = Path(cgroup).read_text()
    except OSError:
        return {}
    # "4:memory:/process_api/abc", "1:cpu,cpuacct:/": controller -> path in its hierarchy
    paths: dict[str, str] = {}
    for line in own.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1]:
            for c in parts[1].split(","):
                paths[c] = parts[2]
    found: dict[str, Path] = {}
    for line in mounts.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if not sep or len(fields) < 5 or len(rest) < 3 or rest[0] != "cgroup":
            continue
        options = set(rest[2].split(","))
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        for c in CONTROLLERS:
            if c not in options or c in found or c not in paths:
                continue
            own_path = paths[c]
            if root != "/" and not (own_path == root or own_path.startswith(root + "/")):
                continue  # our cgroup is not visible through this mount
            rel = own_path[len(root):] if root != "/" else own_path
            found[c] = Path(mount_point) / rel.lstrip("/")
    return found


def _controllers(path: Path) -> set[str]:
    try:
        return set(read_small(str(path)).decode().split())
    except OSError:
        return set()


@dataclass(frozen=True)
class Placement:
    """Where a group's limits live: extra v1 cgroups to join, and what to show users."""

    v1: Mapping[str, Path] = field(default_factory=dict)
    #: The v2 group dir holds the memory controller (its memory.events counts OOM kills).
    v2_memory: bool = False
    describe: str = ""

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.v1.values()]


class Limiter:
    """Applies limits for one agent instance's cgroup tree (v2, else v1 per controller)."""

    def __init__(self, tree: cgroups.CgroupTree, mount: Path,
                 v1: Mapping[str, Path] | None = None, v2: Iterable[str] | None = None) -> None:
        """``v1`` and ``v2`` replace what is detected (which v1 hierarchies to use, which v2
        controllers to try enabling): a host's answer is then the kernel's, at the write."""
        self.tree = tree
        self.mount = mount
        self.v1_base = dict(find_v1() if v1 is None else v1)
        self._lock = threading.Lock()
        self._enabled: set[str] = set()
        self._v2_failed: dict[str, str] = {}
        own = tree.base.parent
        self._own = own
        self._own_is_root = own == mount
        offered = _controllers(own / "cgroup.controllers")
        delegated = _controllers(own / "cgroup.subtree_control")
        self._v2_possible = set(v2) if v2 is not None else {
            c for c in CONTROLLERS if c in offered and (self._own_is_root or c in delegated)}
        self._v2_offered = offered
        # An earlier run of this instance that died (its guardian killed the groups) left
        # empty v1 cgroups behind: remove them; a live `keep` group's stay.
        self.remove_tree()

    def _v1_dir(self, controller: str) -> Path | None:
        base = self.v1_base.get(controller)
        if base is None or not os.access(base, os.W_OK | os.X_OK):
            return None
        return base

    def how(self, controller: str) -> str | None:
        """"v2", "v1" or None (not available) for one controller."""
        if controller in self._v2_possible and controller not in self._v2_failed:
            return "v2"
        if self._v1_dir(controller) is not None:
            return "v1"
        return None

    def check(self, limits: Limits, target: str) -> None:
        """Refuse limits this host cannot enforce, naming what is missing."""
        for c in limits.controllers:
            if self.how(c) is None:
                raise InvalidSpec(self.missing(c, target), field=c if c != "cpu" else "cpus")

    def missing(self, controller: str, target: str) -> str:
        flag = FLAGS[controller]
        v2 = (f"cgroup v2 at {self.mount} offers {' '.join(sorted(self._v2_offered)) or 'none'} "
              f"to the agent's cgroup {self._own}")
        if controller in self._v2_offered and not self._own_is_root:
            v2 += (f" but does not delegate {controller} below it (it is not in "
                   f"{self._own}/cgroup.subtree_control)")
        if controller in self._v2_failed:
            v2 += f"; enabling it failed: {self._v2_failed[controller]}"
        v1 = self.v1_base.get(controller)
        v1_text = (f"the cgroup v1 {controller} hierarchy at {v1} is not writable by this agent"
                   if v1 is not None else f"no cgroup v1 {controller} hierarchy is mounted")
        return (f"{flag} is not supported for target {target!r} on this host: it needs the "
                f"cgroup {controller} controller, and {v2}, and {v1_text}. Delegate it to the "
                "agent (systemd: Delegate=yes on its unit; or run it as root), or drop "
                f"{flag}")

    # ---------------------------------------------------------------- on the launch thread

    def _enable_v2(self, controllers: Iterable[str]) -> list[str]:
        """Enable controllers on the way down to the group dirs; returns those that failed
        (and remembers why, so later spawns use v1 for them)."""
        failed = []
        with self._lock:
            for c in controllers:
                if c in self._enabled:
                    continue
                control = self._own / "cgroup.subtree_control"
                try:
                    for d in (self._own, self.tree.base,
                              *(self.tree.base / s for s in cgroups.POLICY_DIRS.values())):
                        control = d / "cgroup.subtree_control"
                        if c not in _controllers(control):
                            cgroups.write(control, f"+{c}".encode())
                except OSError as exc:
                    self._v2_failed[c] = f"writing +{c} to {control}: {exc.strerror}"
                    log.warning("cannot enable the cgroup v2 %s controller for the agent's "
                                "tree (%s); using cgroup v1 where mounted",
                                c, self._v2_failed[c])
                    failed.append(c)
                else:
                    self._enabled.add(c)
        return failed

    def prepare(self, group_id: str, group_dir: Path, limits: Limits) -> Placement:
        """Write the limits for a group whose v2 dir exists and is still empty. Raises
        ``InvalidSpec`` (nothing left behind) if a controller cannot be had."""
        plan = {c: self.how(c) for c in limits.controllers}
        v2 = [c for c, how in plan.items() if how == "v2"]
        for c in self._enable_v2(v2):
            plan[c] = "v1" if self._v1_dir(c) is not None else None
        for c, how in plan.items():
            if how is None:
                raise InvalidSpec(self.missing(c, "local"), field=c)
        v1: dict[str, Path] = {}
        try:
            for c, how in plan.items():
                if how == "v2":
                    self._write_v2(group_dir, c, limits)
                else:
                    base = self._v1_dir(c)
                    assert base is not None
                    d = base / self.tree.name / group_id
                    d.mkdir(parents=True, exist_ok=True)
                    v1[c] = d
                    self._write_v1(d, c, limits)
        except OSError as exc:
            remove_v1(v1)
            raise InvalidSpec(f"cannot set the limits ({limits.describe()}) in {exc.filename}: "
                              f"{exc.strerror}; check that the agent may write there",
                              field="limits") from exc
        parts = []
        if any(how == "v2" for how in plan.values()):
            parts.append("cgroup v2 " + ", ".join(_v2_files(c) for c, how in plan.items()
                                                 if how == "v2"))
        if v1:
            parts.append("cgroup v1 " + ", ".join(f"{_v1_files(c)} in {d}"
                                                 for c, d in v1.items()))
        return Placement(v1, plan.get("memory") == "v2",
                         f"{limits.describe()} ({'; '.join(parts)})")

    @staticmethod
    def _write_v2(d: Path, controller: str, limits: Limits) -> None:
        if controller == "memory" and limits.memory is not None:
            cgroups.write(d / "memory.max", str(limits.memory).encode())
        elif controller == "cpu" and limits.cpus is not None:
            quota = max(1000, round(limits.cpus * CPU_PERIOD))
            cgroups.write(d / "cpu.max", f"{quota} {CPU_PERIOD}".encode())
        elif controller == "pids" and limits.pids is not None:
            cgroups.write(d / "pids.max", str(limits.pids).encode())

    @staticmethod
    def _write_v1(d: Path, controller: str, limits: Limits) -> None:
        if controller == "memory" and limits.memory is not None:
            cgroups.write(d / "memory.limit_in_bytes", str(limits.memory).encode())
        elif controller == "cpu" and limits.cpus is not None:
            quota = max(1000, round(limits.cpus * CPU_PERIOD))
            cgroups.write(d / "cpu.cfs_period_us", str(CPU_PERIOD).encode())
            cgroups.write(d / "cpu.cfs_quota_us", str(quota).encode())
        elif controller == "pids" and limits.pids is not None:
            cgroups.write(d / "pids.max", str(limits.pids).encode())

    # ---------------------------------------------------------------- after the launch

    def existing(self, group_id: str) -> Placement:
        """The v1 cgroups a group of this tree already has (re-adoption after a restart)."""
        v1 = {}
        for c, base in self.v1_base.items():
            d = base / self.tree.name / group_id
            if d.is_dir():
                v1[c] = d
        return Placement(v1, False, "")

    def v1_trees(self) -> list[Path]:
        """This instance's directory in each v1 hierarchy (made on first use)."""
        return [base / self.tree.name for base in self.v1_base.values()]

    def remove_tree(self) -> None:
        """Remove this instance's v1 dirs, if empty (at agent shutdown)."""
        for base in self.v1_base.values():
            d = base / self.tree.name
            with contextlib.suppress(FileNotFoundError):
                for child in d.iterdir():
                    if child.is_dir() and not _v1_populated(child):
                        with contextlib.suppress(OSError):
                            child.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()


def _v2_files(c: str) -> str:
    return {"memory": "memory.max", "cpu": "cpu.max", "pids": "pids.max"}[c]


def _v1_files(c: str) -> str:
    return {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us",
            "pids": "pids.max"}[c]


def _v1_populated(d: Path) -> bool:
    try:
        return bool(read_small(str(d / "cgroup.procs")).strip())
    except OSError:
        return False


def remove_v1(dirs: Mapping[str, Path]) -> None:
    """rmdir a group's v1 cgroups (empty once its v2 cgroup is); a busy one is logged."""
    for d in dirs.values():
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cannot remove cgroup %s: %s", d, exc)
            else:
                log.warning("cgroup %s still busy; left in place", d)


def oom_kills(placement: Placement, group_dir: Path | None) -> int:
    """OOM kills the kernel made in the group (v2 memory.events or v1 memory.oom_control)."""
    files = []
    if placement.v2_memory and group_dir is not None:
        files.append(group_dir / "memory.events")
    if "memory" in placement.v1:
        files.append(placement.v1["memory"] / "memory.oom_control")
    total = 0
    for f in files:
        try:
            text = read_small(str(f)).decode()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                total += int(value)
    return total
