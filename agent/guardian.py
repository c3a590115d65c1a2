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

Keep groups write to pipes the agent reads; the agent hands copies of their ends to
the guardian (``--control-fd``, see ``agent/keeper.py``). Once the agent is gone (and the
kill groups are swept, the lock let go) the guardian drains them into each group's
``--log`` (or nowhere) until every such group has closed its output, so no keep group
dies of SIGPIPE because its agent did.

    python -m tether.agent.guardian --agent-pid PID --agent-marker MARKER \
        --state FILE [--cgroup-base DIR] [--v1-tree DIR]... [--control-fd FD]

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
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass
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


# ---------------------------------------------------------------- keep groups' pipes


@dataclass
class Held:
    """Copies of one keep group's pipe ends (-1: none)."""

    stdout: int = -1
    stderr: int = -1
    stdin: int = -1
    log: int = -1

    def close(self) -> None:
        for fd in (self.stdout, self.stderr, self.stdin, self.log):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.stdout = self.stderr = self.stdin = self.log = -1


def apply(msg: bytes, fds: list[int], held: dict[str, Held]) -> None:
    """One message from the agent: ``hold GROUP MASK`` (with its descriptors) or
    ``drop GROUP``."""
    words = msg.decode(errors="replace").split()
    if len(words) >= 2 and words[1] in held:
        held.pop(words[1]).close()  # dropped, or held again (a resend): the old copies go
    if len(words) == 3 and words[0] == "hold":
        h = Held()
        given = iter(fds)
        for letter in words[2]:
            fd = next(given, -1)
            if letter == "o":
                h.stdout = fd
            elif letter == "e":
                h.stderr = fd
            elif letter == "i":
                h.stdin = fd
            elif letter == "l":
                h.log = fd
        held[words[1]] = h
        fds = [fd for fd in fds if fd not in (h.stdout, h.stderr, h.stdin, h.log)]
    for fd in fds:  # anything not taken (a malformed message)
        with contextlib.suppress(OSError):
            os.close(fd)


def receive(control: socket.socket, held: dict[str, Held]) -> bool:
    """Every message waiting; False once the agent closed its end (it exits)."""
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 1024, 8, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not msg and not fds:
            return False
        apply(msg, fds, held)


def follow_agent(pid: int, control: socket.socket | None) -> dict[str, Held]:
    """Block until the agent exits (poll on its pidfd), taking in what it hands over
    meanwhile; returns the keep groups' pipes still held."""
    held: dict[str, Held] = {}
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1
    poller = select.poll()
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    if control is not None:
        poller.register(control.fileno(), select.POLLIN)
    try:
        while pidfd >= 0:
            ready = {fd for fd, _ in poller.poll()}
            if control is not None and control.fileno() in ready and not receive(control, held):
                poller.unregister(control.fileno())
            if pidfd in ready:
                break
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    if control is not None:
        receive(control, held)  # what it sent just before it died
    return held


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def drain(held: dict[str, Held]) -> None:
    """Read every held stdout and stderr until its writers are gone, appending it to the
    group's log (or dropping it), so no keep group blocks or dies on a full or readerless
    pipe. Returns once every one of them is closed."""
    poller = select.poll()
    owner: dict[int, Held] = {}
    for h in held.values():
        for fd in (h.stdout, h.stderr):
            if fd >= 0:
                os.set_blocking(fd, False)
                poller.register(fd, select.POLLIN)
                owner[fd] = h
    while owner:
        for fd, _ in poller.poll():
            if fd not in owner:
                continue
            h = owner[fd]
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                if h.log >= 0:
                    try:
                        _write_all(h.log, data)
                    except OSError as exc:
                        log.error("cannot append to a keep group's log (%s); its output is "
                                  "dropped from now on", exc)
                        os.close(h.log)
                        h.log = -1
                continue
            poller.unregister(fd)
            del owner[fd]
            os.close(fd)
            if h.stdout == fd:
                h.stdout = -1
            else:
                h.stderr = -1
            if h.stdout < 0 and h.stderr < 0:
                h.close()
    for h in held.values():
        h.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether-guardian", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent-pid", type=int, required=True)
    parser.add_argument("--agent-marker", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--cgroup-base", default="")
    parser.add_argument("--v1-tree", action="append", default=[])
    parser.add_argument("--lock", default="")
    parser.add_argument("--control-fd", type=int, default=-1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s tether.guardian: %(message)s")
    # The agent's terminal or service manager must not take us down with it.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    control = socket.socket(fileno=args.control_fd) if args.control_fd >= 0 else None
    held = follow_agent(args.agent_pid, control)
    if control is not None:
        control.close()
    lock = take_over(args.lock) if args.lock else None
    if args.lock and lock is None:
        log.info("agent %s (pid %d) is gone, but a new run of it already holds %s: it owns "
                 "the tree now; nothing to sweep", args.agent_marker, args.agent_pid, args.lock)
    else:
        n = sweep_cgroups(Path(args.cgroup_base)) if args.cgroup_base else 0
        n += sweep_marked(args.agent_marker, args.state)
        for tree in args.v1_tree:
            remove_empty_v1(Path(tree))
        if n:
            log.warning("agent %s (pid %d) is gone; ended %d process(es)/cgroup(s) of its "
                        "kill-policy groups", args.agent_marker, args.agent_pid, n)
    if held:
        if lock is not None and lock >= 0:
            os.close(lock)  # swept: a new run of the agent may start while we drain
        log.info("agent %s (pid %d) is gone; keeping the output of %d keep group(s) flowing "
                 "into their logs until they end", args.agent_marker, args.agent_pid,
                 len(held))
        drain(held)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
