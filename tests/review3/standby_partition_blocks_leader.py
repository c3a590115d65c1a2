"""A *standby* is cut off from PostgreSQL (packets dropped) just after its periodic
`INSERT INTO tether_leader ... ON CONFLICT DO UPDATE ... WHERE l.expires_at <= now()`
reached the server. That statement locks the leader row even though its WHERE is false
(the lease is held), and the transaction stays open server-side (idle in transaction)
until TCP keepalive notices the dead peer. The healthy leader's renewals (UPDATE of the
row) and every write batch (FOR SHARE of the row) wait on that lock: the leader steps
down and nobody can lead again. README: "a standby [fails]: nothing, until it is needed".

Run: .venv-test/bin/python -m tests.review3.standby_partition_blocks_leader
"""
from __future__ import annotations

import sys
import time

from tests.review3.harness import Proxy, cluster


def main() -> int:
    with cluster("spart") as cl:
        leader = cl.coordinator()
        assert cl.wait_leader() is leader
        # The standby's campaign reads the lease (and, when it has expired, takes it).
        proxy = Proxy(cl.pg.port, trip_on=b"FROM tether_leader")
        cl.coordinator(proxy.url(cl))
        time.sleep(1)
        proxy.armed = True  # the standby's next campaign round goes dark after its INSERT
        if not proxy.tripped.wait(15):
            print("the standby never campaigned?")
            return 2
        cut = time.monotonic()
        print("standby cut off from PostgreSQL mid-campaign")
        lost_at = None
        while time.monotonic() - cut < 5 * cl.ttl:  # it lost within one lease before the fix
            views = cl.views(addresses=leader.address)
            if not views or views[0].get("role") != "leader":
                lost_at = time.monotonic() - cut
                break
            time.sleep(0.5)
        if lost_at is None:
            print("the leader went on leading: OK")
            return 0
        print(f"the healthy leader stopped leading {lost_at:.1f} s after the standby's cut")
        deadline = time.monotonic() + 20  # does anyone lead again?
        while not ((views := cl.views(addresses=leader.address))
                   and views[0].get("role") == "leader") and time.monotonic() < deadline:
            time.sleep(0.5)
        print("leader's view:", views)
        print(cl.psql("SELECT state, wait_event_type, left(query, 60) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        led = bool(views) and views[0].get("role") == "leader"
        if not led:
            print("DEFECT: a standby cut off mid-campaign left the cluster without a leader")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
