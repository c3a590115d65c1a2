"""The leader is cut off from PostgreSQL (packets dropped, as in a partition) while one of
its write batches is open: the batch's `SELECT ... FROM tether_leader ... FOR SHARE` has
reached the server, its COMMIT never will. The server keeps that transaction (idle in
transaction) and its row lock on tether_leader until TCP keepalive notices the dead peer
(hours by default); tether sets no idle_in_transaction_session_timeout, lock_timeout or
keepalive. The standby's takeover (an UPDATE of that row) waits on the lock: nobody leads,
although README says "cut off from the database: ... a standby takes over".

Run: .venv-test/bin/python -m tests.review3.leader_partition_blocks_failover
"""
from __future__ import annotations

import sys
import time

from tests.review3.harness import Proxy, cluster, create_session


def main() -> int:
    with cluster("lpart") as cl:
        proxy = Proxy(cl.pg.port, trip_on=b"FOR SHARE")
        first = cl.coordinator(proxy.url(cl))  # the leader's path to the DB goes through the proxy
        assert cl.wait_leader() is first
        standby = cl.coordinator()  # direct path: it can reach the DB all along
        time.sleep(1)
        proxy.armed = True
        # Any write will do; create a session (a batch under the leader's FOR SHARE check).
        create_session(cl.addresses, "p1")
        if not proxy.tripped.wait(10):
            print("the leader wrote nothing through the proxy?")
            return 2
        cut = time.monotonic()
        print("leader cut off from PostgreSQL mid-batch; waiting for the standby to lead "
              f"(lease {cl.ttl:g} s)")
        led = None
        while time.monotonic() - cut < 30:
            views = cl.views(addresses=standby.address)
            if views and views[0].get("role") == "leader":
                led = time.monotonic() - cut
                break
            time.sleep(0.5)
        print(cl.psql("SELECT state, wait_event_type, left(query, 70) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        print("standby view:", cl.views(addresses=standby.address))
        print("standby log tail:", standby.log()[-600:])
        if led is None:
            print("DEFECT: 30 s (15 leases) after the leader was cut off, nobody leads: the "
                  "standby's takeover waits on the row lock of the cut-off leader's open batch")
            return 1
        print(f"the standby leads {led:.1f} s after the cut")
        return 0


if __name__ == "__main__":
    sys.exit(main())
