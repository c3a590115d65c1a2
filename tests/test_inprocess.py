"""`tether serve`'s coordinator reaches its own agent through InProcessAgent, not loopback
gRPC. It must keep the contract a remote agent gives the coordinator (``AgentClient``):
domain errors that name the object, deadlines that read as "unreachable", values the
caller cannot change under the agent's feet, and a Watch stream."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from tests.plugins.processes import make_authority
from tether.agent.authority import Authority
from tether.coordinator.inprocess import InProcessAgent
from tether.core.errors import AgentUnreachable, InvalidSpec, NotFound
from tether.core.model import EventKind, GroupSpec, GroupState, Probe


@pytest.fixture
async def agent() -> AsyncIterator[tuple[InProcessAgent, Authority]]:
    auth, signallers = await make_authority("inproc-test")
    try:
        yield InProcessAgent(auth, "127.0.0.1:1", "epoch-1"), auth
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()


async def test_errors_arrive_as_domain_errors(agent: tuple[InProcessAgent, Authority]) -> None:
    a, _ = agent
    with pytest.raises(NotFound) as missing:
        await a.get("g-00000000", timeout=5)
    assert "g-00000000" in str(missing.value)
    with pytest.raises(InvalidSpec):
        await a.spawn(GroupSpec(argv=("x",), target="nope:here"), key="", group_id="",
                      timeout=5)


async def test_deadline_reads_as_unreachable(agent: tuple[InProcessAgent, Authority]) -> None:
    a, _ = agent
    # A readiness probe that never passes keeps Spawn busy past the caller's deadline.
    spec = GroupSpec(argv=("sleep", "1000"), ready=Probe.parse("exec:false"), start_timeout=30)
    with pytest.raises(AgentUnreachable) as late:
        await a.spawn(spec, key="", group_id="", timeout=0.3)
    assert "deadline" in str(late.value)


async def test_values_cannot_be_changed_by_the_other_side(
        agent: tuple[InProcessAgent, Authority]) -> None:
    a, _ = agent
    proc = await asyncio.create_subprocess_exec("sleep", "1000")
    try:
        spec = GroupSpec(argv=(f"adopted:{proc.pid}",))
        view = await a.adopt(proc.pid, None, spec, timeout=5)
        assert view.spec.argv == (f"adopted:{proc.pid}",)
        with pytest.raises(dataclasses.FrozenInstanceError):
            view.state = GroupState.STOPPED  # type: ignore[misc]
        with pytest.raises(TypeError):
            view.spec.env["X"] = "1"  # type: ignore[index]
        views, unknown = await a.stop_groups([view.group_id], None, timeout=10)
        assert unknown == {} and views[0].state is GroupState.STOPPED
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_watch_streams_state_changes(agent: tuple[InProcessAgent, Authority]) -> None:
    a, _ = agent
    stream = a.watch(0, "")
    events: asyncio.Queue[tuple[str, EventKind, str, GroupState]] = asyncio.Queue()

    async def follow() -> None:
        async for epoch, ev in stream:
            await events.put((epoch, ev.kind, ev.group.group_id, ev.group.state))

    task = asyncio.create_task(follow())
    try:
        view = await a.spawn(GroupSpec(argv=("sleep", "1000")), key="", group_id="",
                             timeout=10)
        views, _ = await a.stop_groups([view.group_id], None, timeout=10)
        assert views[0].state is GroupState.STOPPED
        seen = []
        while not seen or seen[-1] is not GroupState.STOPPED:
            epoch, _, gid, state = await asyncio.wait_for(events.get(), 5)
            assert epoch == "epoch-1"
            if gid == view.group_id:
                seen.append(state)
        assert GroupState.RUNNING in seen and GroupState.STOPPING in seen
    finally:
        task.cancel()
