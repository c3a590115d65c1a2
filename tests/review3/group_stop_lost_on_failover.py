"""`tether stop S --group G` (StopSession with a selector) is answered with "the stop goes
on in the coordinator" when an agent does not answer in time, but nothing of it is
persisted (fanout.stop_groups, coordinator/fanout.py:322-345: a task, no StopIntent):
after a failover the new leader knows nothing of it and the group runs on, while a whole
session's stop is resumed from its intent. README (per-group control): "Returns once each
has a record, or at wait with what is known (the stop goes on, owned by the coordinator)".

Run: .venv-test/bin/python -m tests.review3.group_stop_lost_on_failover
"""
from __future__ import annotations

import signal
import sys
import time

from tests.review3.harness import cluster, marked


def main() -> int:
    from tether.client import Client

    with cluster("gstop") as cl:
        first = cl.coordinator()
        assert cl.wait_leader() is first
        cl.coordinator()
        agent = cl.agent("g1")
        cl.wait_agent_up("g1")
        with Client(cl.addresses, failover=30) as c:
            gid = c.spawn(["sleep", "300"], session="s", agent="g1", grace=1).view.group_id
            c.spawn(["sleep", "300"], session="s", agent="g1", grace=1, label="keep")
        agent.signal(signal.SIGSTOP)  # a slow agent (GC, a hung disk, a network blip)
        res = cl.cli("stop", "s", "--group", gid, "--timeout", "4", timeout=60)
        print("tether stop s --group:", res.returncode, res.stderr.strip()[-200:])
        first.signal(signal.SIGKILL)
        first.proc.wait()
        cl.coordinators.remove(first)
        cl.wait_leader()
        agent.signal(signal.SIGCONT)
        deadline = time.monotonic() + 30  # the stop goes on: wait for its processes to end
        while (alive := marked(gid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        print(cl.cli("show", "s").stdout)
        print("stopped group's processes alive 30 s after the agent answers again:", alive)
        cl.cli("stop", "s")
        if alive:
            print("DEFECT: the acknowledged group stop was dropped by the failover")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
