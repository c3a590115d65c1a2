"""Session leases are wall-clock timestamps written by whichever coordinator leads
(Session.renew: time.time() + ttl), and a takeover refreshes only leases that would end
*sooner* than a fresh TTL (coordinator/sessions.py:42). A leader whose clock ran ahead by
X hands over leases that end X too late by the new leader's clock: an owner that died
keeps its processes running for X longer (here an hour, with a 4 s lease). README: "a
failover never expires a lease, an owner that stopped renewing still does", and the
leadership lease is careful to use no coordinator's clock, "whatever the hosts' clocks
say" - the session leases are not.

Run: .venv-test/bin/python -m tests.review3.skewed_clock_lease
"""
from __future__ import annotations

import signal
import sys
import time

from tests.review3.harness import cluster, marked

AHEAD = "import time as _t\n_real = _t.time\n_t.time = lambda: _real() + 3600.0\n"


def main() -> int:
    from tether.client import Client

    with cluster("skew") as cl:
        a = cl.coordinator(pre=AHEAD)  # its host's clock is an hour ahead
        assert cl.wait_leader() is a
        cl.coordinator()
        cl.agent("k1")
        cl.wait_agent_up("k1")
        with Client(cl.addresses, failover=30) as c:
            c.create_session("owned", ttl=4)
            gid = c.spawn(["sleep", "600"], session="owned", agent="k1", grace=1).view.group_id
        # The owner dies now (no more keepalives); so does the leader.
        a.signal(signal.SIGKILL)
        a.proc.wait()
        cl.coordinators.remove(a)
        b = cl.wait_leader()
        taken = time.monotonic()
        while time.monotonic() - taken < 15:
            with Client(b.address, failover=5) as c:
                state = c.session("owned").session.state.value
            if state == "stopped":
                break
            time.sleep(0.5)
        alive = marked(gid)
        print(f"15 s after the takeover (lease 4 s): session {state}, group processes {alive}")
        print(cl.psql("SELECT session_id, lease_expires_at - extract(epoch FROM now()) "
                      "FROM tether_sessions"))
        if state != "stopped" and alive:
            print("DEFECT: the dead owner's session outlives its lease by the old leader's "
                  "clock skew")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
