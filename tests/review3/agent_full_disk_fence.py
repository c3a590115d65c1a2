"""An agent whose state directory is full keeps stopping groups for the coordinator that
leads (its group records are kept in memory and retried: README, "a full tmpfs state
directory"), but after a failover it obeys nobody: the new leader's first call must move
the fence, Fence.admit (agent/fence.py:66-75) writes the epoch file first and lets the
OSError (ENOSPC) escape, so every call of the new epoch fails (UNKNOWN) for as long as the
disk is full. A session stop through the new leader never reaches the agent: the
session's processes outlive it, on an agent that is up and answering.

Run (root: mounts a 4 MB tmpfs): .venv-test/bin/python -m tests.review3.agent_full_disk_fence
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from tests.review3.harness import cluster, marked


def fill(path: str) -> None:
    with contextlib.suppress(OSError), open(os.path.join(path, "filler"), "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def main() -> int:
    with cluster("fulldisk") as cl:
        state = cl.root / "agent-d1"
        state.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)],
                       check=True)
        pids: list[int] = []
        try:
            first = cl.coordinator()
            assert cl.wait_leader() is first
            cl.coordinator()
            cl.agent("d1")
            cl.wait_agent_up("d1")
            from tether.client import Client

            with Client(cl.addresses, failover=30) as c:
                g1 = c.spawn(["sleep", "300"], session="s1", agent="d1", grace=1).view.group_id
                g2 = c.spawn(["sleep", "300"], session="s2", agent="d1", grace=1).view.group_id
            pids = marked(g1) + marked(g2)
            fill(str(state))
            res = cl.cli("stop", "s1", "--timeout", "20")
            print("full disk, same leader: stop s1 ->", res.returncode, "; s1 alive:", marked(g1))
            first.signal(signal.SIGKILL)
            first.proc.wait()
            cl.coordinators.remove(first)
            cl.wait_leader()
            t0 = time.monotonic()
            res = cl.cli("stop", "s2", "--timeout", "20", timeout=60)
            print(f"full disk, after a failover: stop s2 -> {res.returncode} in "
                  f"{time.monotonic() - t0:.1f} s", res.stdout.strip()[-300:], res.stderr.strip()[-300:])
            alive = marked(g2)
            print("s2 processes alive:", alive)
            log = cl.agents[0].log()
            print("agent log:", [ln for ln in log.splitlines() if "No space" in ln][:2])
            if alive:
                print("DEFECT: after a failover the agent refuses every call of the new leader "
                      "while its disk is full; the stopped session's process lives on")
                return 1
            return 0
        finally:
            for d in cl.agents:
                d.stop()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["umount", "-l", str(state)], check=False)


if __name__ == "__main__":
    sys.exit(main())
