"""Issue 12.4 and 12.6: a spawn's outcome does not depend on its caller staying, and a
session stop closes the session first, then stops spawns that were in flight."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from tests.adversarial.helpers import kill_leftovers, processes_of, running, serve, wait_for
from tether.client import AsyncClient, TimedOut
from tether.core.errors import Conflict
from tether.core.model import EventKind
from tether.core.sessions import GroupEntry

pytestmark = pytest.mark.slow


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_client_that_gives_up_during_readiness_leaves_no_phantom(tmp_path: Path) -> None:
    name = f"gaveup-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        port = closed_port()  # nothing will ever listen: readiness never passes
        res = d.cli("spawn", "--session", "s", "--ready", f"tcp:{port}", "--timeout", "2",
                    "--start-timeout", "6", "--", "sleep", "4")
        assert res.returncode == 4, res.stderr
        assert "did not answer within 2 s" in res.stderr and "may still be working" in res.stderr

        async def ended() -> dict[str, object]:
            async with AsyncClient(d.address) as c:
                async for ev in c.watch("s"):
                    if ev.kind in (EventKind.EXIT, EventKind.INITIAL) and ev.group.state.ended:
                        rec = ev.group.view.exit
                        assert rec is not None
                        return {"state": ev.group.state.value, "reason": rec.reason.value,
                                "failure": rec.failure.value if rec.failure else None,
                                "pid": ev.group.view.leader_pid}
            raise AssertionError("the watch ended before the group did")

        out = asyncio.run(asyncio.wait_for(ended(), 60))
        # sleep 4 exits before the probe could ever pass: an immediate crash, recorded.
        assert out["state"] == "failed" and out["reason"] == "start_failed", out
        assert out["failure"] == "immediate_crash"
        assert processes_of(name) == []
    kill_leftovers(name)


def test_a_stop_ends_spawns_that_were_in_flight(tmp_path: Path) -> None:
    name = f"inflight-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        async def body() -> None:
            async with AsyncClient(d.address) as c:
                await c.spawn(["sleep", "300"], session="s", label="first")
                # In flight: its readiness probe will not pass for 300 s.
                slow = asyncio.ensure_future(c.spawn(
                    ["sleep", "300"], session="s", label="slow",
                    ready=f"tcp:{closed_port()}", start_timeout=300))
                async for ev in c.watch("s"):
                    if ev.group.view.spec.label == "slow":
                        break  # the agent has it (starting)
                report = await c.stop("s", timeout=60)
                assert report.complete and report.clean, report
                labels = {g.label: g.state.value for g in report.groups}
                assert labels == {"first": "stopped", "slow": "stopped"}, labels
                entry = await asyncio.wait_for(slow, 30)
                assert entry.state.value == "stopped"
                view = await c.session("s")
                assert view.session.state.value == "stopped" and view.live_count == 0
            assert processes_of(name) == []

        asyncio.run(body())
    kill_leftovers(name)


def test_a_spawn_racing_a_stop_never_leaves_a_process_in_a_stopped_session(
        tmp_path: Path) -> None:
    """Many spawns in flight while the stop starts (each waits for a readiness probe, so
    the coordinator holds them when the stop arrives): whatever the interleaving, the
    stop covers them, and nothing of the session runs afterwards."""
    name = f"race-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        async def body() -> None:
            async with AsyncClient(d.address) as c:
                await c.spawn(["sleep", "300"], session="r")
                spawns = [asyncio.ensure_future(c.spawn(
                    ["sleep", "300"], session="r", label=f"n{i}",
                    ready=f"exec:sh -c 'sleep 0.{i % 5}'")) for i in range(20)]
                seen: set[str] = set()
                async for ev in c.watch("r"):  # until the agent holds every one of them
                    seen.add(ev.group.view.spec.label)
                    if seen >= {f"n{i}" for i in range(20)}:
                        break
                report = await c.stop("r", timeout=60)
                assert report.complete
                results = await asyncio.gather(*spawns, return_exceptions=True)
                started = set()
                for r in results:
                    # Refused (the session was already stopping), or started: before the
                    # stop (answered running) or during it (answered with how it ended).
                    assert isinstance(r, Conflict | TimedOut | GroupEntry), r
                    if isinstance(r, GroupEntry):
                        started.add(r.view.group_id)
                view = await c.session("r")
                assert view.live_count == 0
                ended = {g.view.group_id for g in view.groups if g.state.ended}
                assert started <= ended, "a group started for the session outlived its stop"
            wait_for(lambda: processes_of(name) == [], 30, "every process of the session gone")

        asyncio.run(body())
    kill_leftovers(name)



def test_a_late_spawn_never_restarts_a_session_whose_lease_expired(tmp_path: Path) -> None:
    """The owner died (its lease expired and the session stopped); a spawn it sent before
    dying arrives late. It must not start a new, unleased run nobody will ever stop."""
    name = f"late-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        async def body() -> None:
            async with AsyncClient(d.address) as c:
                await c.create_session("w", ttl=1)
                await c.spawn(["sleep", "300"], session="w")
                async for ev in c.watch("w"):
                    if ev.group.state.ended:
                        break  # the lease lapsed and the session stopped
                view = await c.session("w")
                assert view.session.stop_cause == "lease_expired"
                with pytest.raises(Conflict) as refused:
                    await c.spawn(["sleep", "300"], session="w")
                assert "lease expired" in str(refused.value)
                assert (await c.session("w")).live_count == 0
                await c.create_session("w", ttl=30)  # a new run, asked for explicitly
                again = await c.spawn(["sleep", "300"], session="w")
                assert again.state.value == "running"
                assert (await c.stop("w")).clean

        asyncio.run(body())
        assert processes_of(name) == []
    kill_leftovers(name)
