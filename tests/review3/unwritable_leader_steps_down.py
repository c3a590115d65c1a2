"""A leader whose writes keep failing (here: every session row violates a constraint the
database gained) must step down so that a standby gets its chance, instead of renewing
its lease forever while answering every write with "cannot write the state"
(review3 nul_registration_wedges_store: "a leader that cannot write must step down").

Run: .venv-test/bin/python -m tests.review3.unwritable_leader_steps_down
"""
from __future__ import annotations

import sys

from tests.review3.harness import cluster, create_session


def main() -> int:
    with cluster("unwritable") as cl:
        first = cl.coordinator()
        assert cl.wait_leader() is first
        cl.coordinator()
        cl.psql("ALTER TABLE tether_sessions ADD CONSTRAINT r3_refuse CHECK (false) NOT VALID")
        print("create a session:", create_session(first.address, "s", timeout=15)[:200])
        try:
            second = cl.wait_leader(timeout=40, other_than=first)
        except TimeoutError:
            print("DEFECT: the leader cannot write and keeps the lease")
            return 1
        print("the leader stepped down; now leading:", second.address)
        return 0


if __name__ == "__main__":
    sys.exit(main())
