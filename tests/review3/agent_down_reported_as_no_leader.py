"""A spawn to a registered agent that is down is answered by the leader with UNAVAILABLE
(AgentUnreachable maps to it, protos/tether/rpc/status.py:33) and no `tether-leader`
trailer, so the SDK's _Route takes it for "this coordinator is gone" and goes round the
coordinators; the retried spawn (same key) then waits at the leader on the first
attempt's follow-up, which retries the dead agent forever. Given several coordinators,
`tether spawn` hangs for its whole deadline (90 s) and ends with "no leader among
coordinators ...; see `tether coordinators`": the leader was there all along, the agent
was not. (Given one address it fails at once, but as "coordinator ... is unreachable".)

Run: .venv-test/bin/python -m tests.review3.agent_down_reported_as_no_leader
"""
from __future__ import annotations

import signal
import sys
import time

from tests.review3.harness import cluster


def main() -> int:
    with cluster("deadagent") as cl:
        cl.coordinator()
        cl.wait_leader()
        cl.coordinator()
        a = cl.agent("z1")
        cl.wait_agent_up("z1")
        a.signal(signal.SIGKILL)
        a.proc.wait()
        t0 = time.monotonic()
        r = cl.cli("spawn", "--session", "z", "--agent", "z1", "--", "sleep", "1", timeout=150)
        took = time.monotonic() - t0
        print(f"tether spawn -> {r.returncode} after {took:.1f} s: {r.stderr.strip()[:400]}")
        if "no leader" in r.stderr or took > 30:
            print("DEFECT: a dead agent is reported (after the whole deadline) as a missing "
                  "leader")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
