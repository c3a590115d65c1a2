"""One RegisterAgent whose `version` holds a NUL character (any agent credential, for its
own name; the field is not checked) wedges a PostgreSQL-backed leader for good: psycopg
refuses the text (DataError, not an OperationalError), the write-behind keeps the
poisoned agent row and retries it inside every later batch, so nothing is ever written
again: spawns, keepalives and stop intents all fail after 10 s with "cannot write the
state file", while the wedged coordinator keeps renewing its lease (separate
transactions), so no standby takes over. SQLite stores the same row without complaint.

Run: .venv-test/bin/python -m tests.review3.nul_registration_wedges_store
"""
from __future__ import annotations

import asyncio
import sys
import time

import grpc

from tests.review3.harness import cluster


async def register(target: str, **fields: str) -> str:
    from tether.v1 import coordinator_pb2 as cpb
    from tether.v1 import coordinator_pb2_grpc as cgrpc

    async with grpc.aio.insecure_channel(target) as ch:
        try:
            await cgrpc.CoordinatorServiceStub(ch).RegisterAgent(
                cpb.RegisterAgentRequest(**fields), timeout=20)
            return "ok"
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()[:160]}"


def main() -> int:
    from tether.client import Client

    with cluster("nulreg") as cl:
        leader = cl.coordinator()
        cl.coordinator()
        assert cl.wait_leader() is leader
        cl.agent("w1")
        cl.wait_agent_up("w1")
        answer = asyncio.run(register(leader.address, name="evil", address="127.0.0.1:9",
                                      version="1\x00", epoch="e1"))
        print("register 'evil' with a NUL in its version:", answer)
        wedged = False
        with Client(cl.addresses, failover=5, timeout=20) as c:
            t0 = time.monotonic()
            try:
                g = c.spawn(["sleep", "300"], session="after", agent="w1", grace=1)
                print(f"a normal spawn afterwards: {g.view.group_id} "
                      f"({time.monotonic() - t0:.1f} s)")
                c.stop("after")
            except Exception as exc:
                wedged = True
                print(f"a normal spawn afterwards failed after {time.monotonic() - t0:.1f} s:",
                      type(exc).__name__, str(exc)[:250])
        print("agents in the store:", cl.psql("SELECT name, version FROM tether_agents"))
        if wedged:
            print("DEFECT: the leader can write nothing any more")
            return 1
        if not answer.startswith("INVALID_ARGUMENT"):
            print("DEFECT: a registration the store cannot hold is not refused")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
