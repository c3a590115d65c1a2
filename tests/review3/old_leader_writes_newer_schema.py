"""Rolling upgrade: a newer tether started as a standby migrates the schema at once
(PostgresStore.open -> _migrate, before it campaigns), under the older leader, which
never looks at the schema version again: write() checks the leader row only
(coordinator/postgres_store.py:309-315), load() alone compares versions. So the older
leader goes on acknowledging writes in its own format into the newer schema for as long
as it leads (a newer migration that splits a column, adds a NOT NULL one kept in step by
newer code, or moves rows gets rows it never wrote properly), while README promises "a
schema from a newer tether is refused with what to do".

The newer tether is simulated by this repository's code with one more migration (a
column the newer version would keep up to date).

Run: .venv-test/bin/python -m tests.review3.old_leader_writes_newer_schema
"""
from __future__ import annotations

import sys
import time

from tests.review3.harness import cluster

NEWER = ("import tether.coordinator.postgres_store as _p\n"
         "_p.MIGRATIONS = (*_p.MIGRATIONS, \"ALTER TABLE tether_groups ADD COLUMN "
         "state text NOT NULL DEFAULT 'unknown'\")\n"
         "_p.VERSION = len(_p.MIGRATIONS)\n")


def main() -> int:
    from tether.client import Client

    with cluster("schema") as cl:
        old = cl.coordinator()
        assert cl.wait_leader() is old
        cl.agent("m1")
        cl.wait_agent_up("m1")
        new = cl.coordinator(pre=NEWER)  # the upgraded standby
        from tether.coordinator import postgres_store
        newer = str(len(postgres_store.MIGRATIONS) + 1)  # one more than this tether's
        deadline = time.monotonic() + 60
        while cl.psql("SELECT value FROM tether_meta WHERE key = 'schema_version'") != newer:
            assert time.monotonic() < deadline, "the newer standby did not migrate"
            time.sleep(0.2)
        print("schema version now:", cl.psql("SELECT value FROM tether_meta WHERE key = "
                                             "'schema_version'"), "- migrated under the "
              "running older leader by", new.address)
        with Client(old.address, failover=5, timeout=20) as c:
            try:
                g = c.spawn(["sleep", "300"], session="s", agent="m1", grace=1)
                print("the older leader acknowledged a spawn:", g.view.group_id)
                acked = True
            except Exception as exc:
                print("the older leader refused:", exc)
                acked = False
            if acked:
                c.stop("s")
        print(cl.psql("SELECT group_id, state FROM tether_groups"))
        roles = {v["address"]: v["role"] for v in cl.views()}
        print("roles:", roles)
        # (A spawn acknowledged by the upgraded coordinator, leading now, is fine.)
        if acked and roles.get(old.address) == "leader":
            print("DEFECT: the older leader keeps writing into a schema a newer tether owns")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
