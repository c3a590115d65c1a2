"""README's failure table prices a paused leader (SIGSTOP, GC, VM freeze) "as above":
median 1.7 s, max 2.2 s with a 2 s lease, and says the goal "failover under 3 s" is met.
bench/ha.py measures only SIGKILL, where the kernel resets the dead leader's connections
at once. A paused leader's connections stay open and silent: the SDK's call waits for its
PROBE_EVERY (2 s) before it asks the others, and they name the paused leader until its
lease ends, so the next look is 2 s later again. This runs bench/ha.py's failover
measurement with SIGSTOP instead of SIGKILL.

Run: .venv-test/bin/python -m tests.review3.paused_failover_time
"""
from __future__ import annotations

import asyncio
import signal
import statistics
import sys
import time

from tests.review3.harness import cluster

RUNS = 6


async def one_run(addresses: str, lead: str, victim_pid: int, run: int) -> float:
    from tether.client import AsyncClient

    async with AsyncClient(addresses, failover=60) as c:
        c.address = lead
        await c.spawn(["sleep", "1000"], session=f"f{run}", grace=1, agent="pa")
        t0 = time.monotonic()
        import os
        os.kill(victim_pid, signal.SIGSTOP)
        report = await c.stop(f"f{run}")
        took = time.monotonic() - t0
    assert report.complete, report
    return took


def main() -> int:
    with cluster("pausefo") as cl:
        for _ in range(2):
            cl.coordinator()
        cl.wait_leader()
        cl.agent("pa")
        cl.wait_agent_up("pa")
        times = []
        for run in range(RUNS):
            lead = cl.wait_leader()
            took = asyncio.run(one_run(cl.addresses, lead.address, lead.pid, run))
            times.append(took)
            print(f"  paused-leader failover {run + 1}/{RUNS}: {took * 1000:.0f} ms", flush=True)
            lead.signal(signal.SIGCONT)  # it steps down and stands by for the next run
            time.sleep(3)
        med, worst = statistics.median(times), max(times)
        print(f"median {med:.2f} s, max {worst:.2f} s (README: 1.7 s / 2.2 s, goal < 3 s)")
        if worst > 3.0:
            print("DEFECT: a paused leader's failover is not what README states")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
