"""After the database loses its newest leader row (restored from a backup, or failed over
to an asynchronous replica that had not received it: README's "database restored" row),
the next coordinator takes the *same* epoch number the agents already obey from the
previous leader, and the previous leader still counts itself leader until its next
renewal (ttl/3 later). Agents fence on the number alone (agent/fence.py:59: equal epochs
pass), so for that window two coordinators lead with one epoch and agents obey both.
README: "If the database names the leader but an agent has obeyed a higher epoch ... the
leader moves its epoch above the agent's" covers higher epochs only, never equal ones.

Here: B leads (epoch 1, lease 60 s); the database loses its tether_leader row just after
B renewed; C starts and leads with epoch 1 too; while both say they lead, B signals a
group of C's session and the agent obeys.

Run: .venv-test/bin/python -m tests.review3.restored_store_two_leaders
"""
from __future__ import annotations

import json
import sys
import time

from tests.review3.harness import cluster, marked


def main() -> int:
    from tether.client import Client

    with cluster("restore", ttl=30.0) as cl:
        b = cl.coordinator()
        assert cl.wait_leader() is b
        cl.agent("x1", coordinators=b.address)
        cl.wait_agent_up("x1")
        with Client(b.address, failover=10) as cb:
            gid = cb.spawn(["sleep", "300"], session="s", agent="x1", grace=1).view.group_id
        print("group", gid, "pids", marked(gid))
        # Wait for B's renewal (expiry jumps to a lease ahead), then lose the row.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            left = float(cl.psql("SELECT extract(epoch FROM expires_at - now()) "
                                 "FROM tether_leader"))
            if left > cl.ttl - 1:
                break
            time.sleep(0.05)
        cl.psql("DELETE FROM tether_leader")  # the restored database has no newer row
        restored = time.monotonic()
        c = cl.coordinator()
        views = []
        while time.monotonic() - restored < 15:
            views = [cl.views(addresses=d.address)[0] for d in (b, c)]
            if all(v.get("role") == "leader" for v in views):
                break
            time.sleep(0.1)
        print("views:", json.dumps([{k: v[k] for k in ("address", "role", "epoch")}
                                    for v in views]))
        both = all(v.get("role") == "leader" for v in views)
        obeyed = False
        if both:
            # B, which still counts itself leader, signals the group; the agent obeys epoch 1.
            with Client(b.address, failover=2, timeout=10) as cb:
                rep = cb.signal("s", "TERM")
                print("B's signal:", [(g.group_id, g.members_signalled, g.error)
                                      for g in rep.groups])
                obeyed = any(g.members_signalled > 0 for g in rep.groups)
            print("group pids now:", marked(gid))
            print("agent's fence epoch file:",
                  (cl.root / "agent-x1" / "coordinator-epoch-x1.json").read_text())
        if both and obeyed:
            print("DEFECT: two coordinators lead with the same epoch; the agent obeyed the "
                  "one the store no longer names")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
