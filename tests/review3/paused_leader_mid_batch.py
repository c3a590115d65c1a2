"""README's failure table: "the leader paused (SIGSTOP, a long GC, a VM freeze) ...: it
stops leading at 3/4 of the lease; a standby takes over". Not if the pause catches one of
its write batches open: the batch's `SELECT ... FROM tether_leader ... FOR SHARE` has run,
its COMMIT is not sent, and the server keeps the row lock for as long as the pause lasts
(the paused process's connection is alive). The standby's takeover UPDATE waits on it:
no coordinator leads until the paused leader wakes up. Batches run at least every second
(agent heartbeats), more under load. (A proxy only picks the moment: it holds the
server's answer to FOR SHARE until the leader is stopped, then passes everything.)

Run: .venv-test/bin/python -m tests.review3.paused_leader_mid_batch
"""
from __future__ import annotations

import signal
import sys
import time

from tests.review3.harness import Proxy, cluster, create_session


def main() -> int:
    with cluster("pausebatch") as cl:
        proxy = Proxy(cl.pg.port, hold_on=b"FOR SHARE")
        first = cl.coordinator(proxy.url(cl))
        assert cl.wait_leader() is first
        standby = cl.coordinator()
        time.sleep(1)
        proxy.armed = True
        import threading
        threading.Thread(target=create_session, args=(first.address, "p1", 0.0, 5),
                         daemon=True).start()
        if not proxy.held.wait(10):
            print("no batch seen")
            return 2
        first.signal(signal.SIGSTOP)  # a GC pause / VM freeze, mid-batch
        proxy.release()
        paused = time.monotonic()
        led = None
        try:
            while time.monotonic() - paused < 30:
                v = cl.views(addresses=standby.address)
                if v and v[0].get("role") == "leader":
                    led = time.monotonic() - paused
                    break
                time.sleep(0.5)
            print(cl.psql("SELECT state, wait_event_type, left(query, 60) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        finally:
            first.signal(signal.SIGCONT)
        if led is None:
            print("DEFECT: the leader paused mid-batch for 30 s (15 leases): nobody led all "
                  "that time")
            return 1
        print(f"the standby leads {led:.1f} s after the pause")
        return 0


if __name__ == "__main__":
    sys.exit(main())
