"""Stream leases (issue 17, item 1) and the SDK's window (item 4), through real daemons and
real client processes: a client killed with SIGKILL loses its session (cause lease_lost,
every process gone); a client that comes back with its resume token within the grace
keeps everything (another process, as an editor window that reloads; the same process
after a coordinator restart); and what a hostile or careless client may try.

No test measures wall time: each waits for the event (the session stopped with its
cause, the lease held again). bench/lease.py measures kill -> every process gone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.plugins.processes import (
    Daemon,
    free_port,
    marked_alive,
    start_daemon,
    stop_daemon,
    wait_until,
)
from tether.client import AsyncClient, LeaseLost
from tether.core.errors import Conflict, InvalidSpec, PermissionDenied, ResourceExhausted
from tether.rpc.auth import ADMITTED_HEADER
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

pytestmark = pytest.mark.slow

#: A client process holding a window: spawns N trees (each with a setsid escapee), prints
#: {"ids", "token", "resumed"}, then waits for a line on stdin: "exit" leaves the block
#: (prints the report), "lost" waits until the lease is lost (prints why).
CLIENT = r"""
import json, sys
from tether.client import Client
addr, session, grace, token, n = sys.argv[1:6]
with Client(addr, failover=60) as c, c.window(session, lease_grace=float(grace),
                                              resume_token=token) as w:
    ids = [w.spawn(["sh", "-c", "setsid sleep 600 & exec sleep 600"], label=f"p{i}").view.group_id
           for i in range(int(n))]
    print(json.dumps({"ids": ids, "token": w.resume_token, "resumed": w.state.resumed}),
          flush=True)
    line = sys.stdin.readline().strip()
    if line == "lost":
        print(json.dumps({"lost": w.wait_lost(timeout=300)}), flush=True)
if w.report is not None:
    print(json.dumps({"cause": w.report.stop_cause, "clean": w.report.clean}), flush=True)
"""


class WindowClient:
    """A separate Python process holding a window through the SDK."""

    def __init__(self, address: str, session: str, grace: float, token: str = "", n: int = 1,
                 prefix: list[str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-c", CLIENT, address, session, str(grace), token,
             str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the window client failed: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.first: dict[str, Any] = json.loads(line)

    def say(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise AssertionError(f"the window client ended: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        return json.loads(out)  # type: ignore[no-any-return]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


@pytest.fixture
def clients() -> Iterator[list[WindowClient]]:
    made: list[WindowClient] = []
    yield made
    for c in made:
        c.close()


def serve(tmp_path: Path, *extra: str) -> Daemon:
    return start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                                  "--agent-name", f"ls-{tmp_path.name[-10:]}", *extra], tmp_path)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Daemon]:
    d = serve(tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


def test_a_client_killed_with_sigkill_loses_its_session_and_every_process(
        srv: Daemon, clients: list[WindowClient]) -> None:
    c = WindowClient(srv.address, "ed-1", 1.0, n=2)
    clients.append(c)
    ids = c.first["ids"]
    assert all(len(marked_alive(g)) == 2 for g in ids), "each tree and its setsid escapee"
    shown = srv.json("show", "ed-1")
    assert (shown["lease_held"], shown["lease_grace_seconds"]) == (True, 1.0)

    c.kill()
    # The event: the session stops with cause lease_lost (Wait returns once no group lives).
    report = srv.json("wait", "ed-1", "--timeout", "120")
    assert report["complete"] and report["stop_cause"] == "lease_lost", report
    assert {g["group_id"] for g in report["groups"]} == set(ids)
    assert all(g["survivors"] == 0 and g["reason"] == "requested" for g in report["groups"])
    assert all(marked_alive(g) == [] for g in ids)
    shown = srv.json("show", "ed-1")
    assert (shown["state"], shown["stop_cause"]) == ("stopped", "lease_lost")
    log = srv.log()
    assert "session 'ed-1': lease stream gone (stream_ended)" in log
    assert "not taken back within its grace of 1 s; stopping it" in log

    # A spawn the dead client sent late never revives the session.
    late = srv.cli("spawn", "--session", "ed-1", "--", "sleep", "300")
    assert late.returncode == 1 and "lease was lost" in late.stderr, late.stderr
    assert srv.json("show", "ed-1")["state"] == "stopped"
    # Its token does not take a lease that is over back.
    res = subprocess.run([sys.executable, "-c", CLIENT, srv.address, "ed-1", "1",
                          c.first["token"], "0"], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "lease_lost" in res.stderr and "cannot be taken back" \
        in res.stderr, res.stderr

    lines = srv.cli("audit", "-o", "json", check=True).stdout.splitlines()
    audit = [e for e in map(json.loads, lines) if e["method"].endswith("/OpenLease")]
    assert [(e["session"], e["result"], e["details"]["resume"]) for e in audit] == \
        [("ed-1", "OK", "false"), ("ed-1", "FAILED_PRECONDITION", "true")]
    assert c.first["token"] not in srv.log() and c.first["token"] not in json.dumps(audit)


def test_a_reload_within_the_grace_keeps_everything(
        srv: Daemon, clients: list[WindowClient]) -> None:
    """An editor window that reloads: a new process takes the lease back with the token the
    old one was given, and the session (every process of it) carries on."""
    old = WindowClient(srv.address, "ed-2", 60.0, n=2)
    clients.append(old)
    ids, token = old.first["ids"], old.first["token"]
    old.kill()
    wait_until(lambda: srv.json("show", "ed-2")["lease_held"] is False, 30,
               "the coordinator to see the stream gone")
    assert srv.json("show", "ed-2")["state"] == "active", "within the grace"

    new = WindowClient(srv.address, "ed-2", 60.0, token=token, n=0)
    clients.append(new)
    assert new.first == {"ids": [], "token": token, "resumed": True}
    shown = srv.json("show", "ed-2")
    assert (shown["state"], shown["lease_held"]) == ("active", True)
    assert {g["group_id"] for g in shown["groups"]} == set(ids)
    assert all(len(marked_alive(g)) == 2 for g in ids), "nothing was stopped"
    assert "session 'ed-2': lease taken back by a stream" in srv.log()

    # Leaving the block stops the session cleanly and waits for its report.
    assert new.say("exit") == {"cause": "requested", "clean": True}
    assert all(marked_alive(g) == [] for g in ids)


def test_a_coordinator_restart_keeps_the_lease_and_gives_the_grace_from_the_restart(
        tmp_path: Path, clients: list[WindowClient]) -> None:
    """The stream dies with the coordinator; the client reconnects by itself with its token
    (same address) and the restarted coordinator, which knows the lease from its store,
    hands it back. Processes live on their agent all along."""
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "c")]
    coord = start_daemon("coordinator", args, tmp_path / "c")
    agent = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", coord.address,
                                   "--name", f"la-{tmp_path.name[-8:]}", "--state-dir",
                                   str(tmp_path / "a")], tmp_path / "a")
    try:
        wait_until(lambda: any(a["state"] == "up" for a in coord.json("agents")["agents"]), 30,
                   "the agent to register")
        c = WindowClient(coord.address, "ed-3", 20.0, n=1)
        clients.append(c)
        ids = c.first["ids"]
        stop_daemon(coord)
        coord = start_daemon("coordinator", args, tmp_path / "c", name="coordinator2")
        wait_until(lambda: coord.json("show", "ed-3").get("lease_held") is True, 60,
                   "the client to take its lease back from the restarted coordinator")
        assert coord.json("show", "ed-3")["state"] == "active"
        assert all(len(marked_alive(g)) == 2 for g in ids)
        assert "session 'ed-3': lease taken back" in coord.log()
        assert c.say("exit") == {"cause": "requested", "clean": True}
        assert all(marked_alive(g) == [] for g in ids)
    finally:
        stop_daemon(coord)
        stop_daemon(agent)


# ------------------------------------------------------------------ what a client may try


async def test_one_holder_per_lease_and_only_its_token_takes_it_over(srv: Daemon) -> None:
    async with AsyncClient(srv.address) as c, c.window("ed-4", lease_grace=30) as first:
        g = (await first.spawn(["sleep", "300"])).view.group_id
        with pytest.raises(Conflict, match="already has a stream lease"):
            await c.window("ed-4").open()
        last = first.resume_token[-1]
        for wrong in ("x" * 43, first.resume_token[:-1] + ("B" if last == "A" else "A")):
            with pytest.raises(PermissionDenied, match="resume token does not match"):
                await c.window("ed-4", resume_token=wrong).open()
        with pytest.raises(InvalidSpec, match="resume token is longer"):
            await c.window("ed-4", resume_token="y" * 5000).open()
        with pytest.raises(Conflict, match="stream lease"):
            await c.keepalive("ed-4", 60)

        # The token takes it over; the first stream is told, and does not take it back.
        second = c.window("ed-4", resume_token=first.resume_token)
        await second.open()
        assert "taken over" in await first.wait_lost()
        with pytest.raises(LeaseLost):
            await first.spawn(["sleep", "1"])
        assert (await c.session("ed-4")).lease_held
        assert marked_alive(g)
        await second.close()
        assert second.report is not None and second.report.clean
        assert second.report.stop_cause == "requested"
        await first.close()  # a lost window stops nothing (the session may be another's)


async def test_a_stop_by_someone_else_ends_the_window(srv: Daemon) -> None:
    async with AsyncClient(srv.address) as c, AsyncClient(srv.address) as other:
        w = c.window("ed-5", lease_grace=30)
        await w.open()
        g = (await w.spawn(["sleep", "300"])).view.group_id
        await other.stop("ed-5")
        assert "session stopped (requested)" in await w.wait_lost()
        assert marked_alive(g) == []
        await w.close()


@pytest.mark.parametrize("grace", [-1.0, 0.0, math.nan, math.inf, 1e9])
async def test_a_bad_grace_is_refused_and_changes_nothing(srv: Daemon, grace: float) -> None:
    async with AsyncClient(srv.address) as c:
        with pytest.raises(InvalidSpec, match="lease grace"):
            await c.window("ed-6", lease_grace=grace).open()
        assert all(v.session.session_id != "ed-6" for v in await c.sessions())


async def test_names_with_control_characters_and_strange_streams_are_refused(
        srv: Daemon) -> None:
    async with AsyncClient(srv.address) as c:
        for name in ("a\x00b", "a\nb", "", "x" * 5000):
            with pytest.raises(InvalidSpec):
                await c.window(name).open()
    async with grpc.aio.insecure_channel(srv.address) as channel:
        stub = cgrpc.CoordinatorServiceStub(channel)
        call = stub.OpenLease(timeout=30)
        assert ADMITTED_HEADER in dict(await call.initial_metadata() or ())
        await call.write(cpb.LeaseRequest(session_id="ed-7", lease_grace_seconds=30))
        first = await call.read()
        assert first.status == cpb.LEASE_STATUS_HELD and first.resume_token
        await call.write(cpb.LeaseRequest())
        assert (await call.read()).renewals == 1
        await call.write(cpb.LeaseRequest(session_id="another"))
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one stream per session" in await call.details()
    # That stream is gone: its session waits out its grace, then stops (not at once).
    shown = srv.json("show", "ed-7")
    assert shown["state"] == "active" and shown["lease_held"] is False


def test_lease_streams_are_bounded_per_credential(tmp_path: Path) -> None:
    d = serve(tmp_path, "--max-lease-streams", "2")
    script = r"""
import asyncio, sys
from tether.client import AsyncClient
from tether.core.errors import ResourceExhausted
async def main():
    async with AsyncClient(sys.argv[1]) as c:
        a, b = c.window("b-1"), c.window("b-2")
        await a.open(); await b.open()
        try:
            await c.window("b-3").open()
        except ResourceExhausted as exc:
            print("refused:", exc)
        await a.close()
        third = c.window("b-3")
        await third.open()
        print("after one closed:", third.state.held)
        await b.close(); await third.close()
asyncio.run(main())
"""
    try:
        res = subprocess.run([sys.executable, "-c", script, d.address], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        assert "refused: this credential (open) already has 2 lease streams open" in res.stdout
        assert "--max-lease-streams 2" in res.stdout
        assert "after one closed: True" in res.stdout
    finally:
        stop_daemon(d)
    assert ResourceExhausted  # the SDK maps RESOURCE_EXHAUSTED to it (used above)


def test_the_lease_survives_in_the_store(tmp_path: Path) -> None:
    """What a restarted coordinator needs to honour a token: the grace and the token's
    hash, never the token."""
    import sqlite3

    d = serve(tmp_path)
    try:
        c = WindowClient(d.address, "ed-8", 30.0, n=0)
        token = c.first["token"]
        stop_daemon(d)
        c.close()
    finally:
        stop_daemon(d)
    db = sqlite3.connect(tmp_path / "st" / "coordinator.sqlite3")
    try:
        (grace, stored), = db.execute("SELECT lease_grace, lease_token FROM sessions "
                                      "WHERE session_id = 'ed-8'")
    finally:
        db.close()
    import hashlib

    assert grace == 30.0 and stored == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (tmp_path / "st" / "coordinator.sqlite3").read_bytes().decode(
        errors="replace")
    assert os.path.exists(tmp_path / "st")


# ------------------------------------------------------------------ review 4


async def _open_raw(address: str, request: cpb.LeaseRequest) -> tuple[str, str]:
    """One OpenLease stream, raw: its first answer's status name or the refusal's code."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = cgrpc.CoordinatorServiceStub(channel).OpenLease(timeout=30)
        await call.write(request)
        try:
            answer = await call.read()
            return cpb.LeaseStatus.Name(answer.status), ""
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        finally:
            call.cancel()


async def test_an_existing_sessions_window_and_labels_are_checked_and_a_bad_row_loads(
        tmp_path: Path) -> None:
    """A window name for an *existing* session is checked like a new one's (OpenLease on a
    TTL session, CreateSession); and a row stored unchecked by an older version is repaired
    on load (reported), not a coordinator that no longer starts."""
    import sqlite3

    bad = "w\x00\n" + "y" * 300
    d = serve(tmp_path)
    try:
        async with grpc.aio.insecure_channel(d.address) as channel:
            stub = cgrpc.CoordinatorServiceStub(channel)
            await stub.CreateSession(cpb.CreateSessionRequest(session_id="svc", ttl_seconds=600))
            for request in (cpb.CreateSessionRequest(session_id="svc", window=bad),
                            cpb.CreateSessionRequest(session_id="svc", labels={"k": "v\n"})):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.CreateSession(request)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        code, details = await _open_raw(d.address, cpb.LeaseRequest(
            session_id="svc", window=bad, lease_grace_seconds=30))
        assert code == "INVALID_ARGUMENT" and "window" in details, (code, details)
        assert d.json("show", "svc")["window"] == ""
    finally:
        stop_daemon(d)
    db = sqlite3.connect(tmp_path / "st" / "coordinator.sqlite3")
    try:
        with db:
            db.execute("UPDATE sessions SET window = ?, labels = ? WHERE session_id = 'svc'",
                       (bad, json.dumps({"ok": "1", "bad\n": "2"})))
    finally:
        db.close()
    d = serve(tmp_path)
    try:
        shown = d.json("show", "svc")
        assert (shown["state"], shown["window"], shown["labels"]) == ("active", "", {"ok": "1"})
        log = d.log()
        assert "stored session 'svc': its window is invalid" in log
        assert "stored session 'svc': label 'bad\\n' is invalid" in log
    finally:
        stop_daemon(d)


async def test_a_refused_spawn_leaves_a_windows_session_alone(srv: Daemon) -> None:
    """A spawn its agent refuses takes back only a session that spawn created: never one a
    window holds (or any existing one), which would leave the lease pointing at nothing."""
    async with AsyncClient(srv.address) as c, c.window("ed-u", lease_grace=30) as w:
        with pytest.raises(InvalidSpec, match="no user"):
            await w.spawn(["sleep", "300"], user="tether-no-such-user-r4")
        shown = await c.session("ed-u")
        assert shown.session.state.value == "active" and shown.lease_held
        assert shown.session.lease_grace == 30
        # A session only that refused spawn created is taken back, as before.
        with pytest.raises(InvalidSpec, match="no user"):
            await c.spawn(["sleep", "300"], session="ed-u2", user="tether-no-such-user-r4")
        assert all(v.session.session_id != "ed-u2" for v in await c.sessions())
        await w.spawn(["sleep", "300"])  # the window carries on in its own session
    assert w.report is not None and w.report.stop_cause == "requested"
    assert len(w.report.groups) == 1 and w.report.clean


def test_spawns_refused_together_take_back_the_session_they_created(tmp_path: Path) -> None:
    """review6 refused_spawns_leak_session: two spawns into a new session, both refused by
    an agent over the network: the first one refused saw the other in flight and kept the
    session; the last one refused must take it back, or an empty session lingers."""
    import asyncio

    coord = start_daemon("coordinator", ["--listen", "127.0.0.1:0", "--state-dir",
                                         str(tmp_path / "c")], tmp_path / "c")
    agent = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", coord.address,
                                   "--name", f"rt-{tmp_path.name[-8:]}", "--state-dir",
                                   str(tmp_path / "a")], tmp_path / "a")
    try:
        wait_until(lambda: any(a["state"] == "up" for a in coord.json("agents")["agents"]), 30,
                   "the agent to register")
        names = [f"ed-two-{n}" for n in range(5)]

        async def run() -> set[str]:
            async with AsyncClient(coord.address) as c:
                results = await asyncio.gather(*(
                    c.spawn(["sleep", "300"], session=name, user="tether-no-such-user-r6")
                    for name in names for _ in range(2)), return_exceptions=True)
                assert all(isinstance(r, InvalidSpec) for r in results), results
                return {v.session.session_id for v in await c.sessions()} & set(names)

        left = asyncio.run(run())
        assert left == set(), f"sessions only refused spawns created are left: {left}"
    finally:
        stop_daemon(agent)
        stop_daemon(coord)


def test_a_coordinator_down_longer_than_the_grace_keeps_a_live_clients_window(
        tmp_path: Path, clients: list[WindowClient]) -> None:
    """The restarted coordinator gives the lease its grace from its restart, so the client
    keeps trying while it cannot reach it, past its own count of the grace."""
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "c")]
    coord = start_daemon("coordinator", args, tmp_path / "c")
    agent = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", coord.address,
                                   "--name", f"lg-{tmp_path.name[-8:]}", "--state-dir",
                                   str(tmp_path / "a")], tmp_path / "a")
    try:
        wait_until(lambda: any(a["state"] == "up" for a in coord.json("agents")["agents"]), 30,
                   "the agent to register")
        c = WindowClient(coord.address, "ed-d", 3.0, n=1)
        clients.append(c)
        ids = c.first["ids"]
        stop_daemon(coord)
        # The event: the client says its grace has passed without a coordinator to ask.
        assert c.proc.stderr is not None
        while "unreachable for longer than the lease grace" not in (
                line := c.proc.stderr.readline()):
            assert line and "lease lost" not in line, line or "the client ended"
        coord = start_daemon("coordinator", args, tmp_path / "c", name="coordinator2")
        wait_until(lambda: coord.json("show", "ed-d").get("lease_held") is True, 60,
                   "the client to take its lease back from the restarted coordinator")
        assert all(len(marked_alive(g)) == 2 for g in ids)
        assert c.say("exit") == {"cause": "requested", "clean": True}
        assert all(marked_alive(g) == [] for g in ids)
    finally:
        stop_daemon(coord)
        stop_daemon(agent)


def test_a_restart_does_not_give_a_lost_stream_its_grace_again(
        tmp_path: Path, clients: list[WindowClient]) -> None:
    """A lease whose stream was already gone keeps the expiry its grace gave it (restarts
    add at most a short allowance, never a whole grace each): a coordinator that restarts
    more often than the grace still stops a dead client's session."""
    import sqlite3
    import time

    d = serve(tmp_path)
    try:
        c = WindowClient(d.address, "ed-g", 600.0, n=1)
        clients.append(c)
        ids = c.first["ids"]
        c.kill()
        wait_until(lambda: d.json("show", "ed-g")["lease_held"] is False, 30,
                   "the coordinator to see the stream gone")
    finally:
        stop_daemon(d)
    db = sqlite3.connect(tmp_path / "st" / "coordinator.sqlite3")
    try:
        (saved,), = db.execute("SELECT lease_expires_at FROM sessions WHERE session_id = 'ed-g'")
        assert saved > 0, "the expiry the grace gave is stored"
        with db:  # as after a long downtime: the grace ran out while no coordinator ran
            db.execute("UPDATE sessions SET lease_expires_at = ? WHERE session_id = 'ed-g'",
                       (time.time() - 3600,))
    finally:
        db.close()
    d = serve(tmp_path)
    try:
        report = d.json("wait", "ed-g", "--timeout", "60")
        assert report["complete"] and report["stop_cause"] == "lease_lost", report
        assert all(marked_alive(g) == [] for g in ids)
    finally:
        stop_daemon(d)


def test_a_grace_end_stamped_by_a_clock_that_ran_ahead_is_cut_to_one_grace(
        tmp_path: Path, clients: list[WindowClient]) -> None:
    """review6 skewed_clock_stream_grace: a released lease's grace end is a wall-clock
    time from the host that wrote it; a leader whose clock ran an hour ahead must not
    give a dead client's processes an hour more: at most one grace from the load."""
    import sqlite3
    import time

    d = serve(tmp_path)
    try:
        c = WindowClient(d.address, "ed-s", 3.0, n=1)
        clients.append(c)
        ids = c.first["ids"]
        c.kill()
        wait_until(lambda: d.json("show", "ed-s")["lease_held"] is False, 30,
                   "the coordinator to see the stream gone")
    finally:
        stop_daemon(d)
    db = sqlite3.connect(tmp_path / "st" / "coordinator.sqlite3")
    try:
        with db:  # as a coordinator whose clock is an hour ahead would have written it
            db.execute("UPDATE sessions SET lease_expires_at = ? WHERE session_id = 'ed-s'",
                       (time.time() + 3600,))
    finally:
        db.close()
    d = serve(tmp_path)
    try:
        # (serve stopped the group when it exited; the session is what must not linger)
        wait_until(lambda: d.json("show", "ed-s")["state"] == "stopped", 120,
                   "the session to be stopped within about one grace, not an hour")
        assert d.json("show", "ed-s")["stop_cause"] == "lease_lost"
        assert all(marked_alive(g) == [] for g in ids)
    finally:
        stop_daemon(d)


async def test_a_window_does_not_take_over_a_session_in_use_without_a_lease(
        srv: Daemon) -> None:
    """A window on the name of a running session with no lease (a service started with
    `tether spawn`) is refused: its processes would live only as long as that client.
    One with a TTL lease is turned into the window's stream lease, as documented."""
    async with AsyncClient(srv.address) as c:
        g = (await c.spawn(["sleep", "300"], session="svc-a")).view.group_id
        with pytest.raises(Conflict, match=r"in use .* TTL lease first"):
            await c.window("svc-a", lease_grace=30).open()
        shown = await c.session("svc-a")
        assert (shown.session.lease_grace, shown.lease_held) == (0.0, False)
        assert marked_alive(g)
        await c.keepalive("svc-a", 600)
        async with c.window("svc-a", lease_grace=30) as w:
            assert w.state is not None and w.state.held
            assert (await c.session("svc-a")).session.ttl == 0
        assert w.report is not None and [r.group_id for r in w.report.groups] == [g]


async def test_a_take_back_with_the_token_passes_the_credentials_stream_limit(
        tmp_path: Path) -> None:
    """A stream with the resume token of a held lease replaces that lease's stream (whose
    connection may be dead without the coordinator knowing yet): the per-credential limit
    lets it through; any other stream past the limit is still refused."""
    d = serve(tmp_path, "--max-lease-streams", "1")
    try:
        async with grpc.aio.insecure_channel(d.address) as channel:
            stub = cgrpc.CoordinatorServiceStub(channel)
            first = stub.OpenLease(timeout=60)
            await first.write(cpb.LeaseRequest(session_id="r", lease_grace_seconds=60))
            token = (await first.read()).resume_token
            for request in (cpb.LeaseRequest(session_id="r2"),
                            cpb.LeaseRequest(session_id="r", resume_token="x" * 43)):
                code, details = await _open_raw(d.address, request)
                assert code == "RESOURCE_EXHAUSTED" and "--max-lease-streams 1" in details
            second = stub.OpenLease(timeout=60)
            await second.write(cpb.LeaseRequest(session_id="r", resume_token=token))
            answer = await second.read()
            assert answer.status == cpb.LEASE_STATUS_HELD and answer.resumed
            assert await first.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "taken over" in await first.details()
            second.cancel()
    finally:
        stop_daemon(d)


async def test_a_credential_past_its_limit_has_one_silent_stream_waiting_not_more(
        tmp_path: Path) -> None:
    """A stream past its credential's limit waits for its opening message (a take-back
    may come); a second one is refused at once, so silent streams of one credential
    cannot take the places every other credential needs."""
    d = serve(tmp_path, "--max-lease-streams", "1")
    try:
        async with grpc.aio.insecure_channel(d.address) as channel:
            stub = cgrpc.CoordinatorServiceStub(channel)
            held = stub.OpenLease(timeout=60)
            await held.write(cpb.LeaseRequest(session_id="p", lease_grace_seconds=60))
            await held.read()
            # Two silent streams past the limit: one is counted and waits for a token
            # (whichever the coordinator took first), the other is refused at once.
            calls = [stub.OpenLease(timeout=60) for _ in range(2)]
            reads = [asyncio.ensure_future(call.read()) for call in calls]
            done, pending = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            (first,) = done
            assert isinstance(first.exception(), grpc.aio.AioRpcError)
            refused = first.exception()
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
            assert "--max-lease-streams 1" in (refused.details() or "")
            assert pending, "the one waiting stream is still given its chance"
            for call in calls:
                call.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            held.cancel()
    finally:
        stop_daemon(d)


def test_a_window_retries_a_take_back_the_stream_limit_turns_away(
        tmp_path: Path, clients: list[WindowClient]) -> None:
    """RESOURCE_EXHAUSTED on a reconnect is no verdict on the lease: the window tries
    again (within the grace) instead of declaring it lost."""
    import asyncio

    d = serve(tmp_path, "--max-lease-streams", "2")
    try:
        w = WindowClient(d.address, "w", 8.0, n=0)
        clients.append(w)

        async def run() -> None:
            async with grpc.aio.insecure_channel(d.address) as channel:
                stub = cgrpc.CoordinatorServiceStub(channel)

                renewing: list[asyncio.Task[None]] = []

                async def renew(call: Any) -> None:
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError,
                                             grpc.aio.UsageError):
                        while True:
                            await call.write(cpb.LeaseRequest())
                            await call.read()
                            await asyncio.sleep(0.5)

                async def hold(session: str) -> Any:
                    call = stub.OpenLease(timeout=120)
                    await call.write(cpb.LeaseRequest(session_id=session,
                                                      lease_grace_seconds=60))
                    try:
                        await call.read()
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        return None
                    renewing.append(asyncio.ensure_future(renew(call)))
                    return call

                r1 = await hold("r1")
                assert r1 is not None
                w.proc.send_signal(signal.SIGSTOP)  # the window's stream goes silent
                try:
                    await asyncio.to_thread(
                        wait_until, lambda: d.json("show", "w")["lease_held"] is False, 60,
                        "the silent stream to lose the lease")
                    for _ in range(1200):  # its slot, once it is free
                        if (r2 := await hold("r2")) is not None:
                            break
                        await asyncio.sleep(0.05)
                    assert r2 is not None, "the silent stream's slot never came free"
                finally:
                    w.proc.send_signal(signal.SIGCONT)

                def turned_away() -> bool:
                    lines = d.cli("audit", "-o", "json", check=True).stdout.splitlines()
                    return any(e["session"] == "w" and e["result"] == "RESOURCE_EXHAUSTED"
                               for e in map(json.loads, lines)
                               if e["method"].endswith("/OpenLease"))

                await asyncio.to_thread(wait_until, turned_away, 60,
                                        "the window's take-back to be turned away")
                r2.cancel()
                await asyncio.to_thread(
                    wait_until, lambda: d.json("show", "w")["lease_held"] is True, 60,
                    "the window to take its lease back once a stream slot is free")
                r1.cancel()
                for task in renewing:
                    task.cancel()

        asyncio.run(run())
        assert w.say("exit") == {"cause": "requested", "clean": True}
    finally:
        stop_daemon(d)


#: Loaded by the daemon (PYTHONPATH): its wall clock (time.time) runs OFFSET seconds off,
#: OFFSET read from a file, as an NTP step or an operator fixing the date would move it.
STEPPED_CLOCK = r"""
import os, threading, time
_real, _sleep, _offset = time.time, time.sleep, [0.0]
def _watch(path=os.environ["TETHER_TEST_CLOCK"]):
    while True:
        try:
            _offset[0] = float(open(path).read().strip() or 0)
        except (OSError, ValueError):
            pass
        _sleep(0.02)
time.time = lambda: _real() + _offset[0]
threading.Thread(target=_watch, daemon=True).start()
"""


def test_the_grace_is_a_duration_not_a_wall_clock_time(
        tmp_path: Path, clients: list[WindowClient]) -> None:
    """The wall clock stepping back an hour during the grace does not keep a dead client's
    session an hour longer."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(STEPPED_CLOCK)
    clock = tmp_path / "offset"
    clock.write_text("0")
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"lc-{tmp_path.name[-8:]}"], tmp_path,
                     env={"PYTHONPATH": str(tmp_path / "site"),
                          "TETHER_TEST_CLOCK": str(clock)})
    try:
        c = WindowClient(d.address, "ed-c", 3.0, n=1)
        clients.append(c)
        ids = c.first["ids"]
        c.kill()
        wait_until(lambda: d.json("show", "ed-c")["lease_held"] is False, 30,
                   "the coordinator to see the stream gone")
        clock.write_text("-3600")  # the wall clock steps back an hour, within the grace
        report = d.json("wait", "ed-c", "--timeout", "60")
        assert report["complete"] and report["stop_cause"] == "lease_lost", report
        assert all(marked_alive(g) == [] for g in ids)
    finally:
        stop_daemon(d)


async def test_create_session_with_a_ttl_on_a_stream_leased_session_is_refused(
        srv: Daemon) -> None:
    """Like KeepAlive: a TTL would replace the grace (a dead client's session kept for the
    TTL, or its grace cut short)."""
    async with AsyncClient(srv.address) as c, c.window("ed-t", lease_grace=30):
        with pytest.raises(Conflict, match="stream lease"):
            await c.create_session("ed-t", ttl=3600)
        shown = await c.session("ed-t")
        assert (shown.session.ttl, shown.session.lease_grace, shown.lease_held) == \
            (0.0, 30.0, True)


def test_a_crashed_clients_stream_leaves_no_unretrieved_task(
        tmp_path: Path, clients: list[WindowClient]) -> None:
    """A client SIGKILLed mid-stream: the handler's pending read is cancelled and awaited,
    not abandoned (asyncio would log "Task exception was never retrieved" at ERROR)."""
    d = serve(tmp_path)
    try:
        for i in range(3):
            c = WindowClient(d.address, f"ed-k{i}", 30.0, n=0)
            clients.append(c)
            c.kill()
            wait_until(lambda i=i: d.json("show", f"ed-k{i}")["lease_held"] is False, 30,
                       "the coordinator to see the stream gone")
    finally:
        stop_daemon(d)
    log = d.log()
    assert "lease stream gone" in log
    assert "never retrieved" not in log and "StopAsyncIteration" not in log, log
