"""A spawn cut off by a failover while its group is still starting (readiness pending)
"succeeds" on the retry with the group in state `starting`, and a readiness failure that
follows is never reported to the caller. The new leader's reconcile (spawns.py:438-462)
tracks the group as soon as the agent's Get answers, binds the key and ends the flight;
the SDK's retry (same idempotency key) then gets `seen.view` at once
(fanout.py:87-96). Without a failover the same call waits for the start's outcome and
raises StartFailed. README/SDK: spawn "returns it once running. A start failure raises
StartFailed"; the CLI "prints its id once running".

Run: .venv-test/bin/python -m tests.review3.failover_spawn_not_ready
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from tests.review3.harness import cluster


def main() -> int:
    from tether.client import Client

    with cluster("notready") as cl:
        first = cl.coordinator()
        assert cl.wait_leader() is first
        cl.coordinator()
        cl.agent("i1")
        cl.wait_agent_up("i1")
        out: list[Any] = []

        def spawn() -> None:
            try:
                with Client(cl.addresses, failover=60) as c:
                    # Never ready: the probe fails until the start timeout (8 s) ends it.
                    out.append(c.spawn(["sleep", "300"], session="i", agent="i1", grace=1,
                                       ready="exec:false", start_timeout=8))
            except Exception as exc:
                out.append(exc)

        t = threading.Thread(target=spawn, daemon=True)
        t.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            res = cl.cli("show", "i", "-o", "json")
            if res.returncode == 0 and '"starting"' in res.stdout:
                break
            time.sleep(0.1)
        first.signal(signal.SIGKILL)
        first.proc.wait()
        cl.coordinators.remove(first)
        cl.wait_leader()
        t.join(60)
        r = out[0] if out else None
        print("the spawn call returned:", type(r).__name__,
              getattr(getattr(r, "view", None), "state", r))
        print(cl.cli("show", "i").stdout)
        cl.cli("stop", "i")
        if r is not None and not isinstance(r, Exception):
            print("DEFECT: the caller was told the spawn succeeded while its group was still "
                  "starting; it never became ready")
            return 1
        if type(r).__name__ != "StartFailed":
            print("DEFECT: the spawn did not report the start's failure:", r)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
