"""A deposed leader's Restart (and Forget, ListPorts) calls are obeyed by agents that
have fenced its epoch: GrpcAgentClient.restart/forget/list_ports
(coordinator/grpc_agent.py:171-217) send no `tether-epoch` header, and the agent's
FenceInterceptor lets a call without the header through unfenced (agent/fence.py:107).
README: "Every call the leader makes to an agent carries its epoch ... a paused or
partitioned old leader can make an agent do nothing." Restart kills a group's
processes and starts new ones; Forget drops records.

The reproduction: leader A (epoch 1) is killed, B leads (epoch 2) and the agent obeys 2:
a Get as A would send it is refused; a Restart as A would send it is carried out.

Run: .venv-test/bin/python -m tests.review3.unfenced_restart
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time

from tests.review3.harness import cluster, marked


async def as_old_leader(address: str, gid: str, epoch: int) -> tuple[str, str]:
    from tether.coordinator.grpc_agent import GrpcAgentClient
    from tether.core.errors import TetherError
    from tether.rpc.security import ClientSecurity

    client = GrpcAgentClient("r1", address, ClientSecurity(), epoch=lambda: epoch)
    try:
        try:
            await client.get(gid, timeout=10)
            got = "obeyed"
        except TetherError as exc:
            got = f"refused: {type(exc).__name__}"
        try:
            view = await client.restart(gid, None, timeout=30)
            restarted = f"obeyed (restarts={view.restarts}, state={view.state.value})"
        except TetherError as exc:
            restarted = f"refused: {type(exc).__name__}: {exc}"
        return got, restarted
    finally:
        await client.close()


def main() -> int:
    from tether.client import Client

    with cluster("unfenced") as cl:
        first = cl.coordinator()
        assert cl.wait_leader() is first
        cl.coordinator()
        agent = cl.agent("r1")
        cl.wait_agent_up("r1")
        with Client(cl.addresses, failover=30) as c:
            gid = c.spawn(["sleep", "300"], session="s", agent="r1", grace=1).view.group_id
        before = marked(gid)
        first.signal(signal.SIGKILL)
        first.proc.wait()
        cl.coordinators.remove(first)
        second = cl.wait_leader()
        epoch = cl.views()[0]["epoch"]
        # Wait (on the agent's own word) until the new leader's calls raised its fence.
        deadline = time.monotonic() + 30
        while f"coordinator epoch {epoch} now leads" not in agent.log():
            assert time.monotonic() < deadline, "the agent never obeyed the new leader"
            time.sleep(0.1)
        got, restarted = asyncio.run(as_old_leader(agent.address, gid, epoch - 1))
        after = marked(gid)
        print(f"new leader {second.address} epoch {epoch}; as the old leader (epoch {epoch - 1}):")
        print("  Get:", got)
        print("  Restart:", restarted)
        print("  group processes before:", before, "after:", after)
        if got.startswith("refused") and restarted.startswith("obeyed"):
            print("DEFECT: the agent refuses the old epoch's Get but obeys its Restart")
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
