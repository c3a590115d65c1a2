"""The guardian: a small process that outlives its agent and keeps the promise.

Started by the agent in its own session. It holds a pidfd on the agent and
blocks in poll() until the agent exits (for any reason, SIGKILL included).
Then it ends every group whose orphan policy is ``kill`` (``cgroup.kill``
where the group has a cgroup, SIGKILL to every marked process otherwise),
keeps sweeping until nothing of them is left (bounded), and exits. Groups
with policy ``keep`` are left for the next agent to re-adopt.

After a clean agent shutdown every ``kill`` group is already ended, so the
guardian finds nothing to do. It imports nothing heavy (no grpc).

    python -m tether.agent.guardian --agent-pid PID --agent-name NAME \
        --state FILE [--cgroup-base DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path

import psutil

from tether.agent.model import AGENT_ENV, MARKER_ENV
from tether.agent.statefile import read_records

log = logging.getLogger("tether.guardian")

SWEEP_DEADLINE = 10.0


def wait_for_exit(pid: int) -> None:
    """Block until ``pid`` exits: poll() on a pidfd, no sleeping loop."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass
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


def keep_groups(state: str) -> set[str]:
    return {r.group_id for r in read_records(state)
            if r.orphan_policy == "keep" and not r.ended}


def marked(agent_name: str, keep: set[str]) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["status"]):
        if p.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) or p.pid == os.getpid():
            continue
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get(AGENT_ENV) == agent_name and MARKER_ENV in env \
                and env[MARKER_ENV].split(".", 1)[0] not in keep:
            out.append(p)
    return out


def sweep(agent_name: str, state: str, cgroup_base: Path | None) -> int:
    """Kill every process of the agent's kill-policy groups; return how many were alive."""
    keep = keep_groups(state)
    total = 0
    deadline = time.monotonic() + SWEEP_DEADLINE
    while time.monotonic() < deadline:
        alive = 0
        if cgroup_base is not None and cgroup_base.is_dir():
            for d in cgroup_base.iterdir():
                if d.is_dir() and d.name.split(".", 1)[0] not in keep:
                    with contextlib.suppress(OSError):
                        if "populated 1" in (d / "cgroup.events").read_text():
                            alive += 1
                            (d / "cgroup.kill").write_text("1")
        procs = marked(agent_name, keep)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        alive += len(procs)
        if procs:
            wait_all([p.pid for p in procs], 1.0)
        total += alive
        if not alive:
            break
    if cgroup_base is not None and cgroup_base.is_dir():
        for d in cgroup_base.iterdir():
            if d.is_dir() and d.name.split(".", 1)[0] not in keep:
                with contextlib.suppress(OSError):
                    d.rmdir()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether-guardian", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent-pid", type=int, required=True)
    parser.add_argument("--agent-name", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--cgroup-base", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s tether.guardian: %(message)s")
    # The agent's terminal or service manager must not take us down with it.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    wait_for_exit(args.agent_pid)
    base = Path(args.cgroup_base) if args.cgroup_base else None
    n = sweep(args.agent_name, args.state, base)
    if n:
        log.warning("agent %r (pid %d) is gone; ended %d process(es)/cgroup(s) of its "
                    "kill-policy groups", args.agent_name, args.agent_pid, n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
