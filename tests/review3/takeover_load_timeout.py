"""A takeover loads the whole state, and turns every row into objects on the event loop
(PostgresStore.load: rows.group_of for each group, inside the transaction;
Coordinator.load: track() for each), the loop that also renews the lease. The state
includes every retained stopped session's groups (default retention: 7 days, at most
10000 stopped sessions). A leader never reloads, so it runs fine with such a history;
when it dies, the standby that takes the lease blocks its own loop longer than
HOLD * ttl while loading, lapses ("the lease was not renewed ... (paused?)"), steps down,
takes the lease again with the next epoch, loads again... forever: nobody serves, and
while a load runs the coordinator answers no RPC at all (GetLeader included).

Here: 10000 stopped sessions of 4 groups each (within the default retention cap) are in
the store, the lease is the default 3 s, the leader is SIGKILLed. (On this 2-core VM
20000 groups still load in time; R3_PER=2 shows it.)

Run: .venv-test/bin/python -m tests.review3.takeover_load_timeout
"""
from __future__ import annotations

import os
import signal
import sys
import time

import psycopg

from tests.review3.harness import cluster

SESSIONS = 10000
PER = int(os.environ.get("R3_PER", "4"))
TTL = float(os.environ.get("R3_TTL", "3"))  # README: the default --leader-ttl


def main() -> int:
    from tether.client import Client

    with cluster("bigload", ttl=TTL) as cl:
        first = cl.coordinator()
        assert cl.wait_leader() is first
        second = cl.coordinator()
        cl.agent("b1")
        cl.wait_agent_up("b1")
        with Client(cl.addresses, failover=30) as c:
            c.spawn(["true"], session="seed", agent="b1", grace=1)
            c.stop("seed")
        with psycopg.connect(cl.url) as conn:
            grp = conn.execute("SELECT agent, group_pb FROM tether_groups").fetchone()
            ses = conn.execute('SELECT "window", labels, state, ttl, lease_expires_at, '
                               "stop_cause, created_at, stopped_at FROM tether_sessions "
                               "WHERE session_id = 'seed'").fetchone()
            now = time.time()
            with conn.cursor().copy('COPY tether_sessions (session_id, "window", labels, state, '
                                    "ttl, lease_expires_at, stop_cause, created_at, stopped_at)"
                                    " FROM STDIN") as cp:
                for s in range(SESSIONS):
                    cp.write_row((f"h{s}", ses[0], ses[1], ses[2], ses[3], ses[4], ses[5],
                                  now - 3600 + s * 0.01, now - 3600 + s * 0.01))
            with conn.cursor().copy("COPY tether_groups (agent, group_id, session_id, "
                                    "idempotency_key, group_pb, error, fingerprint, attempts) "
                                    "FROM STDIN") as cp:
                for i in range(SESSIONS * PER):
                    cp.write_row((grp[0], f"g-{i:012x}", f"h{i // PER}", f"k{i}", grp[1], "",
                                  "", 0))
            conn.commit()
        print(f"history in the store: {SESSIONS} stopped sessions, {SESSIONS * PER} groups")
        first.signal(signal.SIGKILL)
        first.proc.wait()
        cl.coordinators.remove(first)
        t0 = time.monotonic()
        led = None
        while time.monotonic() - t0 < 60:
            v = cl.views(addresses=second.address)
            if v and v[0].get("role") == "leader":
                led = time.monotonic() - t0
                break
            time.sleep(1)
        log = second.log().splitlines()
        terms = [ln for ln in log if "leading with epoch" in ln]
        lapsed = [ln for ln in log if "stepping down" in ln]
        print(f"the standby took the lease {len(terms)} times and lost it {len(lapsed)} times:")
        for ln in lapsed[:3]:
            print("  ", ln[:200])
        if led is None:
            print("DEFECT: 60 s after the leader died nobody leads: each takeover blocks its "
                  "own event loop loading the retained history and lapses")
            return 1
        print(f"the standby leads after {led:.1f} s")
        return 0


if __name__ == "__main__":
    sys.exit(main())
