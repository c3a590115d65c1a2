"""The guardian: a small process that outlives its agent and keeps the promise.

Started by the agent in its own session. It holds a pidfd on the agent and
blocks in poll() until the agent exits (for any reason, SIGKILL included).
Then it ends every group whose orphan policy is ``kill`` and exits; ``keep``
groups are left for the next agent to re-adopt.

* cgroup containment: one write to ``<tree>/kill/cgroup.kill`` kills every kill
  group of the agent instance, escapees included; no file has to be read, so a
  state file that cannot be read never turns a ``keep`` group into a kill.
* weaker containment: every process carrying this agent instance's marker,
  unless the state file lists its group as ``keep``. If the state file cannot be
  read, nothing is killed by marker (keep groups must survive), and the guardian
  says so; the next agent's orphan sweep finds what is left.

After a clean agent shutdown every ``kill`` group is already ended, so the
guardian finds nothing to do. It imports nothing heavy (no grpc).

    python -m tether.agent.guardian --agent-pid PID --agent-marker MARKER \
        --state FILE [--cgroup-base DIR] [--v1-tree DIR]...

The v1 trees (cgroup v1 hierarchies holding limits of the agent's groups, see
``signallers/limits.py``) only carry limits: once the kill groups are dead their
cgroups there are empty, and the guardian removes them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import select
import signal
import sqlite3
import sys
import time
from pathlib import Path

from tether.agent.statefile import read_records
from tether.core.model import MARKER_ENV
from tether.signallers import cgroups, procfs

log = logging.getLogger(__name__)

SWEEP_DEADLINE = 10.0


def wait_for_exit(pid: int, timeout: float | None = None) -> bool:
    """Block until ``pid`` exits: poll() on a pidfd, no sleeping loop."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else int(timeout * 1000)))
    finally:
        os.close(fd)


def wait_all(pids: list[int], timeout: float) -> None:
    """Wait (poll() on pidfds) until every pid has exited, or ``timeout``."""
    fds = []
    for pid in pids:
        with contextlib.suppress(OSError):
            fds.append(os.pidfd_open(pid))
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                pending.discard(fd)
    finally:
        for fd in fds:
            os.close(fd)


def wait_empty(cgroup: Path, timeout: float) -> bool:
    """Wait for ``populated 0`` (POLLPRI on cgroup.events), or ``timeout``."""
    try:
        fd = os.open(cgroup / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        deadline = time.monotonic() + timeout
        while b"populated 1" in os.pread(fd, 256, 0):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)
        return True
    finally:
        os.close(fd)


def sweep_cgroups(base: Path) -> int:
    """Kill every kill-policy group of the tree at once; returns how many groups were live."""
    kill = base / "kill"
    live = [d for d in kill.iterdir() if d.is_dir() and cgroups.populated(d)] \
        if kill.is_dir() else []
    if live:
        cgroups.kill_all(kill)
        if not wait_empty(kill, SWEEP_DEADLINE):
            log.error("kill groups under %s are still populated after %g s", kill,
                      SWEEP_DEADLINE)
    with contextlib.suppress(FileNotFoundError):
        for d in kill.iterdir():
            if d.is_dir():
                with contextlib.suppress(OSError):
                    cgroups.remove(d)  # with any cgroups its program made inside
    # The tree itself, once nothing is left in it (a keep group keeps it for the next agent).
    for d in (kill, base / "keep", base):
        with contextlib.suppress(OSError):
            d.rmdir()
    return len(live)


def remove_empty_v1(tree: Path) -> None:
    """rmdir the empty group cgroups of a v1 tree (keep groups' are still populated)."""
    with contextlib.suppress(FileNotFoundError):
        for d in tree.iterdir():
            if d.is_dir() and not cgroups.procs(d):
                with contextlib.suppress(OSError):
                    d.rmdir()
    with contextlib.suppress(OSError):
        tree.rmdir()


def marked(marker: str, keep: set[str]) -> list[int]:
    """Live processes of this agent instance whose group is not ``keep``."""
    out = []
    for pid in procfs.pids():
        if pid == os.getpid():
            continue
        block = procfs.environ(pid)
        if not procfs.carries(block, marker):
            continue
        group = (procfs.env_value(block, MARKER_ENV) or "").split(".", 1)[0]
        if group in keep or "/keep/" in cgroups.own_cgroup(pid):
            continue
        if procfs.alive(pid):
            out.append(pid)
    return out


def _same(pid: int, start: float) -> bool:
    return procfs.same_process(pid, start)


def sweep_marked(marker: str, state: str) -> int:
    try:
        keep = {r.group_id for r in read_records(state)
                if r.orphan_policy == "keep" and not r.ended}
    except sqlite3.Error as exc:
        log.error("cannot read state file %s (%s): processes found by marker are left "
                  "alone, so that keep groups survive; the next agent's orphan sweep "
                  "reports them", state, exc)
        return 0
    total = 0
    deadline = time.monotonic() + SWEEP_DEADLINE
    while time.monotonic() < deadline:
        pids = marked(marker, keep)
        if not pids:
            break
        for pid in pids:
            start = procfs.start_time(pid)
            if start is not None:
                procfs.signal_pid_safely(pid, signal.SIGKILL,
                                         functools.partial(_same, start=start))
        total += len(pids)
        wait_all(pids, 1.0)
    return total


def take_over(path: str) -> int | None:
    """Take the dead agent's lock (a new run of the same instance waits for it), or None if
    a new run already holds it: then sweeping would kill that run's fresh groups."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        log.error("cannot open the agent's lock %s (%s); sweeping anyway", path, exc)
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"guardian {os.getpid()}\n".encode(), 0)
    return fd  # held until this process exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether-guardian", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent-pid", type=int, required=True)
    parser.add_argument("--agent-marker", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--cgroup-base", default="")
    parser.add_argument("--v1-tree", action="append", default=[])
    parser.add_argument("--lock", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s tether.guardian: %(message)s")
    # The agent's terminal or service manager must not take us down with it.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    wait_for_exit(args.agent_pid)
    lock = take_over(args.lock) if args.lock else None
    if args.lock and lock is None:
        log.info("agent %s (pid %d) is gone, but a new run of it already holds %s: it owns "
                 "the tree now; nothing to sweep", args.agent_marker, args.agent_pid, args.lock)
        return 0
    n = sweep_cgroups(Path(args.cgroup_base)) if args.cgroup_base else 0
    n += sweep_marked(args.agent_marker, args.state)
    for tree in args.v1_tree:
        remove_empty_v1(Path(tree))
    if n:
        log.warning("agent %s (pid %d) is gone; ended %d process(es)/cgroup(s) of its "
                    "kill-policy groups", args.agent_marker, args.agent_pid, n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
