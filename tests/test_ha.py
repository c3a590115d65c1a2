"""Coordinators in high availability on a real PostgreSQL (issue 18).

Several `tether coordinator --store postgresql://...` processes, real agents, the real
CLI and SDK; PostgreSQL started by tests/plugins/postgres.py. Leaders are killed with
SIGKILL, paused with SIGSTOP, the database restarted under load. What runs is checked
independently (marked_alive), not taken from tether's word; every wait is for an event
(a leader named, a log line, a state in the store), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.plugins.postgres import PASSWORD, Bouncer, PgCluster, private_cluster
from tests.plugins.processes import (
    Daemon,
    marked_alive,
    start_daemon,
    stop_daemon,
    wait_until,
)
from tests.test_lease import WindowClient
from tether.client import Client
from tether.core.errors import TetherError
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc

LEASE = 2.0
AGENT_TTL = 3.0


@dataclass
class HA:
    """Coordinators sharing one PostgreSQL database, and agents registered with them."""

    root: Path
    pg: PgCluster
    url: str
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    coordinators: list[Daemon] = field(default_factory=list)
    agents: dict[str, Daemon] = field(default_factory=dict)
    dead: list[Daemon] = field(default_factory=list)

    @property
    def addresses(self) -> str:
        return ",".join(d.address for d in self.coordinators)

    def start_coordinator(self, *extra: str) -> Daemon:
        n = len(self.coordinators) + len(self.dead)
        state = self.root / f"c{n}"
        d = start_daemon("coordinator", ["--listen", "127.0.0.1:0", "--state-dir", str(state),
                                         "--leader-ttl", str(LEASE), "--agent-ttl",
                                         str(AGENT_TTL), *extra], state, "coordinator",
                         env={"TETHER_STORE": self.url})
        self.coordinators.append(d)
        return d

    def name(self, short: str) -> str:
        return f"{short}-{self.tag}"

    def start_agent(self, short: str) -> Daemon:
        state = self.root / short
        d = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", self.addresses,
                                   "--name", self.name(short), "--state-dir", str(state)],
                         state, "agent")
        self.agents[short] = d
        return d

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tether.coordinator.cli", *args],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL,
                              env={**os.environ, "TETHER_COORDINATOR": self.addresses})

    def json(self, *args: str) -> Any:
        res = self.cli(*args, "-o", "json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def client(self) -> Client:
        return Client(self.addresses, failover=60)

    def views(self) -> list[dict[str, Any]]:
        res = self.cli("coordinators", "-o", "json")
        return list(json.loads(res.stdout)["coordinators"]) if res.stdout else []

    def leader(self) -> Daemon | None:
        """The coordinator every live one names as leader (None while they disagree)."""
        views = [v for v in self.views() if v["role"] != "unreachable"]
        named = {v["leader"] for v in views}
        leading = [v["address"] for v in views if v["role"] == "leader"]
        if len(named) != 1 or leading != list(named):
            return None
        return next((d for d in self.coordinators if d.address == leading[0]), None)

    def wait_leader(self, other_than: Daemon | None = None, timeout: float = 30) -> Daemon:
        found: list[Daemon] = []

        def led() -> bool:
            d = self.leader()
            if d is not None and d is not other_than:
                found.append(d)
                return True
            return False

        wait_until(led, timeout, "one coordinator to lead, named so by all")
        return found[-1]

    def wait_agents_up(self) -> None:
        want = {self.name(s) for s in self.agents}
        wait_until(lambda: {a["name"] for a in self.json("agents")["agents"]
                            if a["state"] == "up"} >= want, 30, f"agents {sorted(want)} up")

    def kill(self, d: Daemon) -> None:
        d.proc.kill()
        d.proc.wait()
        self.coordinators.remove(d)
        self.dead.append(d)

    def close(self) -> None:
        for d in [*self.agents.values(), *self.coordinators]:
            if d.proc.poll() is None:
                os.kill(d.proc.pid, signal.SIGCONT)
            stop_daemon(d)
        for name in (self.name(s) for s in self.agents):
            for pid in marked_alive(agent=name):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ha(tmp_path: Path, pg_cluster: PgCluster, pg_url: str) -> Iterator[HA]:
    cluster = HA(tmp_path, pg_cluster, pg_url)
    try:
        yield cluster
    finally:
        cluster.close()


def live(ha: HA) -> set[int]:
    return {pid for s in ha.agents for pid in marked_alive(agent=ha.name(s))}


def coordinator_logs(ha: HA) -> str:
    return "".join(d.log() for d in [*ha.coordinators, *ha.dead])


# ------------------------------------------------------------------ failover


@pytest.mark.slow
def test_a_stop_of_1000_groups_survives_the_leader_killed_in_its_middle(ha: HA) -> None:
    """Three coordinators, four agents, 1000 groups: SIGKILL the leader while its
    StopSession runs; a standby finishes it; every group has exactly one exit record and
    zero survivors; the waiting CLI call completes through the new leader (or fails
    saying to retry, and the retry completes); a watcher loses nothing and gets nothing
    twice."""
    for _ in range(3):
        ha.start_coordinator()
    first = ha.wait_leader()
    for short in ("a", "b", "c", "d"):
        ha.start_agent(short)
    ha.wait_agents_up()

    # Cheap groups whose stop takes the whole grace: sleep ignores SIGWINCH, so every stop
    # waits 3 s and ends with SIGKILL: long enough to kill the leader in the middle.
    async def spawn_all() -> list[str]:
        from tether.client import AsyncClient

        gate = asyncio.Semaphore(64)
        async with AsyncClient(ha.addresses, failover=60) as c:
            async def one(n: int) -> str:
                async with gate:
                    g = await c.spawn(["sleep", "1000"], session="big",
                                      agent=ha.name("abcd"[n % 4]), stop_signal="WINCH",
                                      grace=3, label=f"n{n}")
                    return g.view.group_id

            return list(await asyncio.gather(*(one(n) for n in range(1000))))

    groups = asyncio.run(spawn_all())
    assert len(set(groups)) == 1000
    wait_until(lambda: len(live(ha)) == 1000, 60, "1000 sleeps to run")

    watched: list[Any] = []
    with ha.client() as c:
        def watch() -> None:
            ended: set[str] = set()
            try:
                for ev in c.watch("big", timeout=240):
                    watched.append(ev)
                    if ev.group.view.state.ended:
                        ended.add(ev.group.view.group_id)
                        if ended >= set(groups):
                            return
            except TetherError as exc:
                watched.append(exc)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        wait_until(lambda: len(watched) >= 1000, 60, "the watcher's snapshot")

        stop = subprocess.Popen([sys.executable, "-m", "tether.coordinator.cli", "stop", "big",
                                 "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ,
                                                "TETHER_COORDINATOR": ha.addresses})
        # The stop is under way when groups are stopping (the store says so, as any
        # coordinator reads it).
        wait_until(lambda: any(g["state"] == "stopping" for g in ha.json("show", "big")["groups"]),
                   30, "groups of the session to be stopping")
        ha.kill(first)
        second = ha.wait_leader(other_than=first)
        out, err = stop.communicate(timeout=240)
        if stop.returncode != 0:  # cut off: it must say to retry, and a retry completes
            assert stop.returncode == 4 and "retry" in err, err
            res = ha.cli("stop", "big", "-o", "json", timeout=240)
            assert res.returncode == 0, res.stderr
            out = res.stdout
        report = json.loads(out)
        watcher.join(240)

    assert report["complete"]
    assert sorted(g["group_id"] for g in report["groups"]) == sorted(groups)
    for g in report["groups"]:
        assert g["state"] == "stopped" and g["survivors"] == 0, g
        assert g["reason"] in ("forced_kill", "requested"), g
    assert live(ha) == set(), "every process of the session is gone"
    shown = ha.json("show", "big")
    assert shown["state"] == "stopped"
    assert len(shown["groups"]) == 1000 and all(g["reason"] for g in shown["groups"])
    # The watcher: resumed on the new leader, no sequence twice, every exit seen.
    errors = [e for e in watched if isinstance(e, Exception)]
    assert errors == []
    seqs = [e.seq for e in watched if e.kind.value != "initial"]
    assert seqs == sorted(set(seqs)), "events in order, none twice"
    assert ended_ids(watched) >= set(groups), "every group's end reached the watcher"
    assert "resuming the stop of session 'big'" in second.log()


def ended_ids(events: list[Any]) -> set[str]:
    return {e.group.view.group_id for e in events
            if not isinstance(e, Exception) and e.group.view.state.ended}


def test_a_watcher_resumes_on_the_new_leader_without_loss_or_repeat(ha: HA) -> None:
    first = ha.start_coordinator()
    ha.start_coordinator()
    assert ha.wait_leader() is first
    ha.start_agent("a")
    ha.wait_agents_up()
    with ha.client() as c:
        ids = [c.spawn(["sleep", "300"], session="w", grace=1).view.group_id for _ in range(3)]
        events: list[Any] = []
        stream = c.watch("w", timeout=120)
        while len(events) < 3:
            events.append(next(stream))
        assert {e.kind.value for e in events} == {"initial"}
        ha.kill(first)
        ha.wait_leader(other_than=first)
        c.stop("w")
        while not ids_ended(events, ids):
            events.append(next(stream))
        stream.close()
    seqs = [e.seq for e in events if e.kind.value != "initial"]
    assert seqs == sorted(set(seqs)) and seqs[0] > events[0].seq
    assert len({e.epoch for e in events}) == 1, "one store, one epoch of sequences"


def ids_ended(events: list[Any], ids: list[str]) -> bool:
    return set(ids) <= {e.group.view.group_id for e in events if e.group.view.state.ended}


def test_a_lease_held_by_an_editor_survives_a_failover(ha: HA) -> None:
    """The editor renews its lease through whichever coordinator leads; the failover
    itself expires nothing. A session whose owner is really gone still expires."""
    first = ha.start_coordinator()
    ha.start_coordinator()
    assert ha.wait_leader() is first
    ha.start_agent("a")
    ha.wait_agents_up()
    ttl = 3.0
    with ha.client() as editor:
        editor.create_session("held", ttl=ttl)
        kept = editor.spawn(["sleep", "300"], session="held").view.group_id
        editor.create_session("abandoned", ttl=ttl)
        gone = editor.spawn(["sleep", "300"], session="abandoned").view.group_id

        ha.kill(first)
        second = ha.wait_leader(other_than=first)
        # Renew through the new leader until its own clock has run past a whole TTL with
        # nothing but these renewals keeping the session alive.
        taken_over = time.time()
        renewed: list[float] = []

        def renewed_past_a_ttl() -> bool:
            s = editor.keepalive("held", ttl)
            renewed.append(s.session.lease_expires_at)
            return s.session.lease_expires_at > taken_over + 2 * ttl

        wait_until(renewed_past_a_ttl, 30, "renewals through the new leader")
        wait_until(lambda: editor.session("abandoned").session.state.value == "stopped", 30,
                   "the abandoned session to expire on the new leader")
        held = editor.session("held")
    assert held.session.state.value == "active"
    assert marked_alive(kept), "the held session's group runs on"
    assert marked_alive(gone) == []
    assert "session 'abandoned': lease of 3 s expired" in second.log()
    assert "session 'held': lease" not in second.log()


def test_a_window_follows_the_leader_through_a_failover(ha: HA) -> None:
    """A stream lease lives on the leader; when it dies, the window reconnects to the new
    leader with its resume token, within the grace, by itself. The new leader gave the
    lease its whole grace from the takeover; a lease nobody comes back for still ends."""
    first = ha.start_coordinator()
    ha.start_coordinator()
    assert ha.wait_leader() is first
    ha.start_agent("a")
    ha.wait_agents_up()
    with ha.client() as editor, editor.window("win", lease_grace=15) as w:
        kept = w.spawn(["sleep", "300"]).view.group_id
        gone = WindowClient(ha.addresses, "abandoned", 1.0)
        try:
            (lost,) = gone.first["ids"]
            gone.kill()  # with the leader: nobody comes back for this one
            ha.kill(first)
        finally:
            gone.close()
        second = ha.wait_leader(other_than=first)
        wait_until(lambda: editor.session("win").lease_held, 60,
                   "the window to take its lease back on the new leader")
        wait_until(lambda: editor.session("abandoned").session.stop_cause == "lease_lost", 60,
                   "the abandoned window's session to be stopped after its grace")
        assert not w.lost and editor.session("win").session.state.value == "active"
        assert marked_alive(kept), "the held window's group runs on"
        assert marked_alive(lost) == []
    assert w.report is not None and w.report.clean and w.report.stop_cause == "requested"
    assert marked_alive(kept) == []
    assert "session 'win': lease taken back by a stream" in second.log()


def test_standbys_serve_reads_and_redirect_the_rest(ha: HA) -> None:
    # A long lease: the standby stays a standby while the leader is paused below.
    first = ha.start_coordinator("--leader-ttl", "60")
    standby = ha.start_coordinator("--leader-ttl", "60")
    assert ha.wait_leader() is first
    ha.start_agent("a")
    ha.wait_agents_up()
    only = {**os.environ, "TETHER_COORDINATOR": standby.address}

    def via_standby(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tether.coordinator.cli", *args],
                              capture_output=True, text=True, timeout=60, env=only,
                              stdin=subprocess.DEVNULL)

    # A mutating call given only the standby's address follows it to the leader.
    res = via_standby("spawn", "--session", "r", "--", "sleep", "300")
    assert res.returncode == 0, res.stderr
    gid = res.stdout.strip()
    assert gid in first.log() and "CoordinatorService/Spawn" not in standby.log(), \
        "the leader did it (and audited it); the standby only pointed there"
    # Reads are answered by the standby itself, from the store.
    wait_until(lambda: gid in via_standby("show", "r").stdout, 10, "the standby to read it")
    first.signal(signal.SIGSTOP)  # the leader answers nothing now
    try:
        res = via_standby("show", "r", "-o", "json")
        assert res.returncode == 0 and json.loads(res.stdout)["groups"][0]["group_id"] == gid
        info = json.loads(via_standby("coordinators", "-o", "json").stdout)["coordinators"][0]
        assert info["role"] == "standby" and info["leader"] == first.address
    finally:
        first.signal(signal.SIGCONT)
    res = via_standby("stop", "r")
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------ fencing


def agent_call(address: str, epoch: int | None, group_id: str) -> grpc.RpcError | None:
    """A Get on an agent, as a coordinator of ``epoch`` would send it."""
    async def call() -> grpc.RpcError | None:
        async with grpc.aio.insecure_channel(address) as channel:
            md = (("tether-epoch", str(epoch)),) if epoch is not None else None
            try:
                await agrpc.AgentServiceStub(channel).Get(apb.GetRequest(group_id=group_id),
                                                          timeout=10, metadata=md)
            except grpc.aio.AioRpcError as exc:
                return exc
            return None

    return asyncio.run(call())


def test_a_paused_leader_is_fenced_notices_and_steps_down(ha: HA) -> None:
    """SIGSTOP the leader until a standby leads, then SIGCONT it: what it sends is not
    obeyed (its lapsed view of a lease would stop a session), it notices, steps down."""
    first = ha.start_coordinator()
    ha.start_coordinator()
    assert ha.wait_leader() is first
    agent = ha.start_agent("a")
    ha.wait_agents_up()
    ttl = 6.0  # more than a failover plus a call to a paused leader failing over
    with ha.client() as editor:
        editor.create_session("s", ttl=ttl)
        gid = editor.spawn(["sleep", "300"], session="s").view.group_id
        editor.keepalive("s", ttl)
        first.signal(signal.SIGSTOP)
        paused = time.monotonic()
        second = ha.wait_leader(other_than=first)
        # The paused leader's copy of the lease has lapsed by now; the real one is renewed
        # through the new leader.
        wait_until(lambda: editor.keepalive("s", ttl) is not None
                   and time.monotonic() > paused + ttl + 1, 60,
                   "the old copy of the lease to lapse")
        first.signal(signal.SIGCONT)
        wait_until(lambda: "stepping down as leader (epoch 1)" in first.log(), 30,
                   "the old leader to step down")
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "tether.coordinator.cli", "coordinators", "-o", "json",
             "--coordinator", first.address], capture_output=True, text=True, timeout=60
        ).stdout)["coordinators"][0]
        assert info["role"] == "standby" and info["leader"] == second.address
        editor.keepalive("s", ttl)
        assert editor.session("s").session.state.value == "active"
    assert marked_alive(gid), "nothing the old leader sent was obeyed"
    audit = (agent.state_dir / "audit.jsonl").read_text()
    stops = [json.loads(line) for line in audit.splitlines() if "StopGroups" in line]
    assert [s for s in stops if s["result"] == "OK"] == []
    # The agent obeys epoch 2 now, and says so to whoever comes with epoch 1.
    refused = agent_call(agent.address, 1, gid)
    assert refused is not None and refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("tether-fence", "2") in tuple(refused.trailing_metadata() or ())
    assert "epoch 1" in refused.details() and "step down" in refused.details()


def test_an_agent_remembers_the_newest_epoch_across_its_restart(ha: HA) -> None:
    ha.start_coordinator()
    ha.wait_leader()
    agent = ha.start_agent("a")
    ha.wait_agents_up()
    assert agent_call(agent.address, 5, "g-000000000000").code() == grpc.StatusCode.NOT_FOUND
    stop_daemon(agent)
    agent = ha.start_agent("a")
    refused = agent_call(agent.address, 4, "g-000000000000")
    assert refused is not None and refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A call without an epoch (an administrator's) is not fenced.
    assert agent_call(agent.address, None, "g-000000000000").code() == \
        grpc.StatusCode.NOT_FOUND


def test_a_leader_moves_above_an_epoch_from_the_stores_past(ha: HA) -> None:
    """An agent that obeyed epoch 40 (a database since restored from an older backup, or
    re-created) refuses the leader's epoch 1: the leader, still holding the lease, moves
    its epoch above 40 and its calls go through."""
    ha.start_coordinator()
    leader = ha.wait_leader()
    agent = ha.start_agent("a")
    assert agent_call(agent.address, 40, "g-000000000000").code() == grpc.StatusCode.NOT_FOUND
    ha.wait_agents_up()
    res = ha.cli("spawn", "--session", "p", "--", "sleep", "300")
    assert res.returncode == 0, res.stderr
    assert "obeys coordinator epoch 40" in leader.log()
    assert ha.views()[0]["epoch"] == 41


# ------------------------------------------------------------------ the store


def test_postgresql_restarted_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """Spawns keep coming while PostgreSQL stops and starts: coordinators step down and
    say why (UNAVAILABLE, naming the store), clients wait for a leader, and every spawn
    that was acknowledged is in the store afterwards, running."""
    with private_cluster() as pg:
        ha = HA(tmp_path, pg, pg.url(pg.create_database()))
        try:
            ha.start_coordinator()
            ha.start_coordinator()
            ha.wait_leader()
            ha.start_agent("a")
            ha.wait_agents_up()
            acked: list[str] = []
            failures: list[str] = []
            done = threading.Event()

            def load() -> None:
                with ha.client() as c:
                    n = 0
                    while not done.is_set():
                        n += 1
                        try:
                            acked.append(c.spawn(["sleep", "300"], session="load",
                                                 label=f"n{n}").view.group_id)
                        except TetherError as exc:
                            failures.append(str(exc))

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            wait_until(lambda: len(acked) >= 10, 30, "spawns under way")
            pg.stop()
            # The coordinators notice and say why: none leads, the store does not answer.
            wait_until(lambda: all(v["leader"] == "" and "unavailable" in v["error"]
                                   for v in ha.views()), 30,
                       "the coordinators to step down, naming the store")
            res = ha.cli("sessions", "--timeout", "12")
            assert res.returncode == 4 and "store" in res.stderr, res.stderr
            before = len(acked)
            pg.start()
            ha.wait_leader()
            wait_until(lambda: len(acked) >= before + 10, 60, "spawns to go on")
            done.set()
            loader.join(60)
            shown = {g["group_id"]: g for g in ha.json("show", "load")["groups"]}
            missing = [g for g in acked if g not in shown]
            assert missing == [], "acknowledged spawns lost"
            assert all(shown[g]["state"] == "running" for g in acked), \
            {g: (shown[g]["state"], shown[g].get("exit")) for g in acked
             if shown[g]["state"] != "running"}
            assert len(live(ha)) == len(shown), "no process runs that nobody has on record"
            assert failures == [], failures
        finally:
            ha.close()


def test_coordinators_behind_pgbouncer_in_transaction_mode_fail_over(
        tmp_path: Path, pg_cluster: PgCluster, pg_url: str, pg_bouncer: Bouncer) -> None:
    """Every transaction may land on another server connection: leadership, fenced
    writes and a takeover work without any session state."""
    ha = HA(tmp_path, pg_cluster, pg_bouncer.url(pg_url.rsplit("/", 1)[1]))
    try:
        first = ha.start_coordinator()
        ha.start_coordinator()
        assert ha.wait_leader() is first
        ha.start_agent("a")
        ha.wait_agents_up()
        res = ha.cli("spawn", "--session", "b", "--", "sleep", "300")
        assert res.returncode == 0, res.stderr
        ha.kill(first)
        res = ha.cli("stop", "b", "-o", "json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["groups"][0]["survivors"] == 0
        assert live(ha) == set()
    finally:
        ha.close()


def test_a_store_url_with_a_password_is_never_logged(ha: HA) -> None:
    d = start_daemon("coordinator", ["--listen", "127.0.0.1:0", "--state-dir",
                                     str(ha.root / "pw"), "--store", ha.url],
                     ha.root / "pw", "coordinator")
    try:
        ha.coordinators.append(d)
        ha.wait_leader()
        assert ha.cli("sessions").returncode == 0
    finally:
        stop_daemon(d)
    text = d.log()
    assert PASSWORD not in text
    assert "holds a password: every local user can read it" in text
    assert "postgresql://tether:***@" in text


def test_a_store_that_does_not_answer_is_named_with_the_next_step(tmp_path: Path) -> None:
    from tests.plugins.processes import free_port

    res = subprocess.run(
        [sys.executable, "-m", "tether.coordinator.cli", "coordinator", "--listen",
         "127.0.0.1:0", "--state-dir", str(tmp_path / "c")], capture_output=True, text=True,
        timeout=60, env={**os.environ, "TETHER_STORE":
                         f"postgresql://u:sekrit@127.0.0.1:{free_port()}/db"},
        stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert "the store PostgreSQL store postgresql://u:***@127.0.0.1" in res.stderr
    assert "check that PostgreSQL runs there" in res.stderr and "sekrit" not in res.stderr
