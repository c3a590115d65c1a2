"""`tether serve`'s coordinator reaches its own agent through InProcessAgentStub, not
loopback gRPC. It must keep the contract a remote agent gives the coordinator: status
codes and messages, deadlines, private copies of requests, a Watch stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.plugins.processes import make_authority
from tether.agent.authority import Authority
from tether.agent.service import AgentServicer
from tether.coordinator.inprocess import InProcessAgentStub
from tether.v1 import agent_pb2 as apb
from tether.v1 import common_pb2 as pb


@pytest.fixture
async def stub() -> AsyncIterator[tuple[InProcessAgentStub, Authority]]:
    auth, signallers = await make_authority("inproc-test")
    try:
        yield InProcessAgentStub(AgentServicer(auth)), auth
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()


async def test_errors_arrive_as_grpc_statuses(stub: tuple[InProcessAgentStub, Authority]
                                              ) -> None:
    s, _ = stub
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await s.Get(apb.GetRequest(group_id="g-nope"), timeout=5)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    assert "g-nope" in (missing.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await s.Spawn(apb.SpawnRequest(spec=pb.GroupSpec()), timeout=5)
    assert empty.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_deadline_becomes_deadline_exceeded(stub: tuple[InProcessAgentStub, Authority]
                                                  ) -> None:
    s, _ = stub
    # A readiness probe that never passes keeps Spawn busy past the caller's deadline.
    spec = pb.GroupSpec(argv=["sleep", "1000"], ready="exec:false", start_timeout_seconds=30)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await s.Spawn(apb.SpawnRequest(spec=spec), timeout=0.3)
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_requests_stay_the_callers(stub: tuple[InProcessAgentStub, Authority]) -> None:
    s, _ = stub
    proc = await asyncio.create_subprocess_exec("sleep", "1000")
    try:
        req = apb.AdoptRequest(pid=proc.pid, spec=pb.GroupSpec())
        reply = await s.Adopt(req, timeout=5)
        assert reply.group.spec.argv == [f"adopted:{proc.pid}"]
        assert list(req.spec.argv) == []  # the servicer filled in its own copy
        await s.StopGroups(apb.StopGroupsRequest(group_ids=[reply.group.group_id]), timeout=10)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_watch_streams_state_changes(stub: tuple[InProcessAgentStub, Authority]) -> None:
    s, _ = stub
    events: asyncio.Queue[pb.GroupEvent] = asyncio.Queue()

    async def follow() -> None:
        async for ev in s.Watch(apb.WatchRequest()):
            await events.put(ev)

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0)
        spawned = await s.Spawn(apb.SpawnRequest(spec=pb.GroupSpec(argv=["sleep", "1000"])),
                                timeout=10)
        gid = spawned.group.group_id
        reply = await s.StopGroups(apb.StopGroupsRequest(group_ids=[gid]), timeout=10)
        assert reply.groups[0].state == pb.GROUP_STATE_STOPPED
        seen = []
        while not seen or seen[-1] != pb.GROUP_STATE_STOPPED:
            ev = await asyncio.wait_for(events.get(), 5)
            if ev.group.group_id == gid:
                seen.append(ev.group.state)
        assert pb.GROUP_STATE_RUNNING in seen and pb.GROUP_STATE_STOPPING in seen
    finally:
        task.cancel()
