"""Issue 12.12 to 12.16: idempotency keys bound to their request, bounded history, leases
and coordinator downtime, partial stop overrides, and the small ones."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from tests.adversarial.helpers import (
    gid,
    kill_leftovers,
    processes_of,
    running,
    serve,
    spawn,
    tether,
    wait_for,
)
from tests.plugins.processes import free_port, marked_alive, start_daemon, stop_daemon
from tether.client import AsyncClient
from tether.coordinator.core import Coordinator, CoordinatorConfig
from tether.coordinator.model import TrackedGroup
from tether.coordinator.service import CoordinatorServicer, add_to_server
from tether.coordinator.sqlite_store import SQLiteStore
from tether.core.errors import TetherError
from tether.core.model import Containment, EventKind, GroupSpec, GroupState, GroupView
from tether.rpc.daemon import start_server

pytestmark = pytest.mark.slow


def test_an_idempotency_key_is_bound_to_its_request(tmp_path: Path) -> None:
    name = f"idem-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        first = gid(spawn(d, "a", ["sleep", "300"], "--idempotency-key", "k1"))
        again = gid(spawn(d, "a", ["sleep", "300"], "--idempotency-key", "k1"))
        assert again == first and len(marked_alive(first)) == 1
        before = d.json("sessions", "--all")
        other = spawn(d, "b", ["sleep", "301"], "--idempotency-key", "k1", check=False)
        assert other.returncode == 2, other.stderr
        assert "'k1'" in other.stderr and first in other.stderr
        assert d.json("sessions", "--all") == before, "a refused reuse changed something"
        assert d.json("stop", "a")["complete"]
        # The same request again, after the stop: the same answer, and `a` stays stopped.
        retried = spawn(d, "a", ["sleep", "300"], "--idempotency-key", "k1", "-o", "json")
        assert retried.stdout and '"state": "stopped"' in retried.stdout
        assert d.json("show", "a")["state"] == "stopped"
        assert marked_alive(first) == []
    kill_leftovers(name)


def test_big_environments_never_break_listings_and_are_never_listed(tmp_path: Path) -> None:
    name = f"big-{os.getpid()}"
    secret = "S" * (120 * 1024)
    with running(serve(tmp_path, name)) as d:
        async def body() -> None:
            async with AsyncClient(d.address) as c:
                await asyncio.gather(*(c.spawn(["sleep", "300"], session="big",
                                               env={"API_KEY": secret, "N": str(i)})
                                       for i in range(40)))

        asyncio.run(body())
        for args in (["sessions"], ["sessions", "--all", "-o", "json"], ["show", "big"],
                     ["show", "big", "-o", "json"], ["watch", "big", "--timeout", "2"]):
            res = d.cli(*args)
            assert res.returncode == 0, (args, res.stderr)
            assert secret[:64] not in res.stdout, f"`tether {' '.join(args)}` shows env values"
        assert d.json("stop", "big")["complete"]
    kill_leftovers(name)


def test_stopped_sessions_are_dropped_after_retention(tmp_path: Path) -> None:
    name = f"retain-{os.getpid()}"
    with running(serve(tmp_path, name, "--retain-stopped", "2")) as d:
        spawn(d, "old", ["sleep", "300"])
        assert d.json("stop", "old")["complete"]
        assert "old" in [s["session"] for s in d.json("sessions", "--all")["sessions"]]
        wait_for(lambda: "old" not in [s["session"] for s in
                                       d.json("sessions", "--all")["sessions"]], 30,
                 "the stopped session to be dropped")
        assert d.cli("show", "old").returncode == 3
    kill_leftovers(name)


def test_a_watch_resumes_where_it_broke_off(tmp_path: Path) -> None:
    name = f"resume-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        async def body() -> None:
            async with AsyncClient(d.address) as c:
                first = await c.spawn(["sleep", "300"], session="w", label="one")
                last = None
                async for ev in c.watch("w"):
                    last = ev
                    break  # the snapshot of `one`; then the client goes away
                assert last is not None and last.kind is EventKind.INITIAL
                second = await c.spawn(["sleep", "300"], session="w", label="two")
                await c.stop("w")
                seen = []
                async for ev in c.watch("w", since=last.seq, epoch=last.epoch):
                    seen.append((ev.seq, ev.kind, ev.group.view.group_id))
                    if ev.group.view.group_id == second.view.group_id and ev.group.state.ended:
                        break
                assert all(kind is not EventKind.INITIAL for _, kind, _ in seen), seen
                seqs = [s for s, _, _ in seen]
                assert seqs == sorted(set(seqs)) and seqs[0] > last.seq, "lost or doubled"
                ids = [g for _, _, g in seen]
                assert first.view.group_id in ids and second.view.group_id in ids

        asyncio.run(body())
    kill_leftovers(name)


def test_coordinator_downtime_never_counts_against_a_lease(tmp_path: Path) -> None:
    name = f"down-{os.getpid()}"
    port = str(free_port())
    coord = start_daemon("coordinator", ["--listen", f"127.0.0.1:{port}", "--state-dir",
                                         str(tmp_path / "c")], tmp_path, name="coordinator")
    agent = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator",
                                   f"127.0.0.1:{port}", "--name", name, "--state-dir",
                                   str(tmp_path / "a")], tmp_path, name=name)
    try:
        wait_for(lambda: coord.json("agents")["agents"], 30, "the agent to register")
        group = gid(spawn(coord, "leased", ["sleep", "300"]))
        assert coord.cli("keepalive", "leased", "--ttl", "3").returncode == 0
        coord.proc.kill()  # SIGKILL: down longer than the lease
        coord.proc.wait()
        time.sleep(4)  # the condition under test: the TTL runs out while it is down
        coord = start_daemon("coordinator", ["--listen", f"127.0.0.1:{port}", "--state-dir",
                                             str(tmp_path / "c")], tmp_path, name="coordinator")
        assert coord.json("show", "leased")["state"] == "active"
        # The owner is alive: its next renewal succeeds, nothing was stopped.
        assert coord.cli("keepalive", "leased", "--ttl", "30").returncode == 0
        assert marked_alive(group)
        assert coord.json("show", "leased")["stop_cause"] == ""
    finally:
        stop_daemon(coord)
        stop_daemon(agent)
        kill_leftovers(name)


def test_stop_grace_override_keeps_each_groups_stop_signal(tmp_path: Path) -> None:
    name = f"sig-{os.getpid()}"
    got = tmp_path / "got"
    trap = (f"import signal, sys, time\n"
            f"def seen(n, f):\n open({str(got)!r}, 'w').write(signal.Signals(n).name)\n"
            f" sys.exit(0)\n"
            f"signal.signal(signal.SIGINT, seen); signal.signal(signal.SIGTERM, seen)\n"
            f"print('ready', flush=True); time.sleep(300)")
    with running(serve(tmp_path, name)) as d:
        spawn(d, "s", [sys.executable, "-c", trap], "--stop-signal", "INT", "--grace", "30",
              "--log", str(tmp_path / "log"), "--ready", "log:ready")
        report = d.json("stop", "s", "--grace", "5")
        assert report["complete"] and report["groups"][0]["reason"] == "requested"
        assert got.read_text() == "SIGINT", "--grace changed the group's stop signal"
    kill_leftovers(name)


@pytest.mark.parametrize("args", [
    ["spawn", "--session", "s", "--stop-order", "99999999999", "--", "true"],
    ["adopt", "--session", "s", "--pid", "99999999999"],
    ["adopt", "--session", "s", "--pid", "-4"],
    ["spawn", "--session", "s", "--grace", "1e309", "--", "true"],
    ["keepalive", "s", "--ttl", "nan"],
])
def test_out_of_range_numbers_are_usage_errors_not_tracebacks(tmp_path: Path,
                                                               args: list[str]) -> None:
    res = tether(*args, env={"TETHER_COORDINATOR": "127.0.0.1:1"})
    assert res.returncode == 2, (args, res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "tether" in res.stderr


def test_a_client_deadline_says_it_timed_out(tmp_path: Path) -> None:
    name = f"late-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        res = d.cli("spawn", "--session", "t", "--timeout", "1", "--ready", "exec:sleep 30",
                    "--start-timeout", "60", "--", "sleep", "300")
        assert res.returncode == 4
        assert "did not answer within 1 s" in res.stderr and "unreachable" not in res.stderr
        assert d.json("stop", "t")["complete"]
    kill_leftovers(name)


def test_up_says_a_spawn_past_its_deadline_may_be_running(tmp_path: Path) -> None:
    name = f"upl-{os.getpid()}"
    f = tmp_path / "s.toml"
    f.write_text('session = "u"\n[[group]]\nargv = ["sleep", "300"]\n'
                 'ready = "exec:sleep 30"\nstart_timeout = 60\n')
    with running(serve(tmp_path, name)) as d:
        res = d.cli("up", str(f), "--timeout", "1")
        assert res.returncode == 1
        assert "may be running" in res.stderr and "refused" not in res.stderr
        assert d.json("stop", "u")["complete"]
    kill_leftovers(name)


def test_an_argv0_that_looks_like_an_option_runs_as_given(tmp_path: Path) -> None:
    name = f"dash-{os.getpid()}"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    prog = bindir / "-weird"
    prog.write_text(f"#!/bin/sh\necho \"ran as $0\" > {tmp_path / 'out'}\nexec sleep 300\n")
    prog.chmod(0o755)
    with running(serve(tmp_path, name)) as d:
        spawn(d, "a", ["-weird"], "--env", f"PATH={bindir}:/usr/bin:/bin")
        wait_for(lambda: (tmp_path / "out").exists(), 30, "the program to run")
        assert "-weird" in (tmp_path / "out").read_text()
        assert d.json("stop", "a")["complete"]
    kill_leftovers(name)


def test_a_readiness_failure_racing_a_stop_is_never_an_error(tmp_path: Path) -> None:
    name = f"rr-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        async def body() -> None:
            async with AsyncClient(d.address) as c:
                for i in range(10):
                    spawn_ = asyncio.ensure_future(c.spawn(
                        ["sleep", "300"], session=f"r{i}", ready="exec:false",
                        start_timeout=0.2 + i * 0.02))
                    await asyncio.sleep(0.2)
                    report = await c.stop(f"r{i}")
                    assert report.complete
                    try:
                        await spawn_
                    except TetherError as exc:  # a start failure is fine; INTERNAL is not
                        assert type(exc).__name__ == "StartFailed", exc

        asyncio.run(body())
        assert "IllegalTransition" not in d.log() and "Traceback" not in d.log()
        assert processes_of(name) == []
    kill_leftovers(name)


async def test_a_watcher_that_falls_behind_is_told_not_left_hanging(tmp_path: Path) -> None:
    """A real server whose subscriber queue holds 5 events; 50 events later the stream
    ends with an error (ABORTED) that says how to resume."""
    store = SQLiteStore(tmp_path / "c.sqlite3")
    coordinator = Coordinator(CoordinatorConfig(), store)
    await coordinator.load()
    coordinator.events.limit = 5
    server, port, _ = await start_server("127.0.0.1:0", [
        lambda s: add_to_server(s, CoordinatorServicer(coordinator))],
        ["tether.v1.CoordinatorService"])
    try:
        coordinator.sessions.create("w")
        tracked = coordinator.track(TrackedGroup("a", GroupView(
            "g-0000000000aa", GroupSpec(argv=("x",), session_id="w"), GroupState.RUNNING,
            Containment.PGID)))
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            events = c.watch("w").__aiter__()
            first = await anext(events)  # the snapshot: the subscription is in place
            assert first.kind is EventKind.INITIAL
            for _ in range(50):  # nobody reads meanwhile
                coordinator.publish(tracked, EventKind.STATE)
            async def drain() -> None:
                while True:
                    await anext(events)

            with pytest.raises(TetherError) as ended:
                await drain()
            assert "behind" in str(ended.value) and "resume" in str(ended.value)
    finally:
        await server.stop(None)
        await coordinator.close()
        await store.close()
