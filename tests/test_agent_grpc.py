"""AgentService over a real gRPC server on port 0: status codes, Watch, health, reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.plugins.processes import marked_alive
from tether.agent.authority import Authority
from tether.agent.service import AgentServicer, add_to_server
from tether.rpc.daemon import ListenError, start_server
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc
from tether.v1 import common_pb2 as pb


@pytest.fixture
async def stub(authority: Authority) -> AsyncIterator[Any]:
    servicer = AgentServicer(authority)
    server, port, _ = await start_server("127.0.0.1:0", [lambda s: add_to_server(s, servicer)],
                                         ["tether.v1.AgentService"])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield agrpc.AgentServiceStub(channel), channel
    finally:
        await channel.close()
        await server.stop(None)


def spec(*argv: str, **kw: Any) -> pb.GroupSpec:
    return pb.GroupSpec(argv=list(argv), stop=pb.StopPolicy(grace_seconds=1.0), **kw)


async def test_spawn_get_list_stop(stub: Any) -> None:
    s, _ = stub
    g = (await s.Spawn(apb.SpawnRequest(spec=spec("sh", "-c", "sleep 100 & sleep 100",
                                                  session_id="s1", label="web")))).group
    assert g.state == pb.GROUP_STATE_RUNNING
    assert g.leader_pid > 0
    counts = []

    async def members() -> int:
        counts.append((await s.Get(apb.GetRequest(group_id=g.group_id))).group.member_count)
        return counts[-1]

    # The shell forks its two sleeps after the spawn answered: wait for them to exist.
    for _ in range(1000):
        if await members() == 3:
            break
        await asyncio.sleep(0.01)
    assert counts[-1] == 3, counts  # the shell and its two sleeps
    listed = (await s.List(apb.ListRequest(session_id="s1"))).groups
    assert [x.group_id for x in listed] == [g.group_id]
    stopped = (await s.Stop(apb.StopRequest(group_id=g.group_id))).group
    assert stopped.state == pb.GROUP_STATE_STOPPED
    assert stopped.exit.reason == pb.EXIT_REASON_REQUESTED
    assert stopped.exit.survivors == 0
    assert marked_alive(g.group_id) == []


async def test_idempotency_key_never_starts_a_second_copy(stub: Any) -> None:
    s, _ = stub
    req = apb.SpawnRequest(spec=spec("sleep", "100"), idempotency_key="k-1")
    a, b = await asyncio.gather(s.Spawn(req), s.Spawn(req))
    assert a.group.group_id == b.group.group_id
    assert len(marked_alive(a.group.group_id)) == 1


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (apb.SpawnRequest(spec=pb.GroupSpec()), grpc.StatusCode.INVALID_ARGUMENT, "argv is empty"),
        (apb.SpawnRequest(spec=spec("x", ready="smoke:signal")),
         grpc.StatusCode.INVALID_ARGUMENT, "readiness probe kind"),
        (apb.SpawnRequest(spec=pb.GroupSpec(argv=["x"], stop=pb.StopPolicy(signal="NOPE"))),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown signal"),
        (apb.SpawnRequest(spec=spec("x", target="carrier:pigeon")),
         grpc.StatusCode.INVALID_ARGUMENT, "known signallers"),
        (apb.SpawnRequest(spec=pb.GroupSpec(argv=["x"], orphan_policy=7)),
         grpc.StatusCode.INVALID_ARGUMENT, "orphan policy"),
        (apb.SpawnRequest(spec=pb.GroupSpec(argv=["x"], stop=pb.StopPolicy(grace_seconds=-5))),
         grpc.StatusCode.INVALID_ARGUMENT, "grace"),
        (apb.SpawnRequest(spec=spec("x", label="bad\x07name")),
         grpc.StatusCode.INVALID_ARGUMENT, "control characters"),
    ],
)
async def test_malformed_spawns_get_invalid_argument(stub: Any, request_: Any,
                                                     code: grpc.StatusCode, words: str) -> None:
    s, _ = stub
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.Spawn(request_)
    assert info.value.code() == code
    assert words in (info.value.details() or "")


async def test_unknown_group_is_not_found_with_next_step(stub: Any) -> None:
    s, _ = stub
    for call in (s.Stop(apb.StopRequest(group_id="g-missing")),
                 s.Signal(apb.SignalRequest(group_id="g-missing", signal="TERM")),
                 s.Get(apb.GetRequest(group_id="g-missing"))):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "g-missing" in (info.value.details() or "")


async def test_adopt_refusal_is_failed_precondition(stub: Any) -> None:
    s, _ = stub
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.Adopt(apb.AdoptRequest(pid=2**22 + 3, spec=pb.GroupSpec(session_id="s")))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_watch_streams_state_changes_and_exit_records(stub: Any) -> None:
    s, _ = stub
    stream = s.Watch(apb.WatchRequest(session_id="w"))
    events: list[pb.GroupEvent] = []

    async def collect() -> None:
        async for ev in stream:
            events.append(ev)
            if ev.kind == "exit":
                return

    task = asyncio.ensure_future(collect())
    await stream.initial_metadata()  # the agent says the subscription is in place
    await s.Spawn(apb.SpawnRequest(spec=spec("sh", "-c", "exit 4", session_id="w")))
    await asyncio.wait_for(task, 10)
    stream.cancel()
    states = [e.group.state for e in events]
    assert states[0] == pb.GROUP_STATE_STARTING
    assert states[-1] == pb.GROUP_STATE_EXITED
    assert events[-1].group.exit.exit_code == 4
    assert events[-1].group.exit.reason == pb.EXIT_REASON_NATURAL


async def test_health_and_reflection_are_on(stub: Any) -> None:
    _, channel = stub
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="tether.v1.AgentService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert "tether.v1.AgentService" in names


async def test_port_in_use_and_non_loopback_without_tls_are_refused(stub: Any) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ListenError, match=f"127.0.0.1:{port}"):
            await start_server(f"127.0.0.1:{port}", [], [])
    with pytest.raises(ListenError, match="without TLS"):
        await start_server("0.0.0.0:0", [], [])
