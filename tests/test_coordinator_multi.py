"""A coordinator and several agents, each its own process on loopback.

Sessions spread across agents, stopped phase by phase; an agent killed; the
coordinator killed in the middle of a stop and restarted; leases that lapse.
What runs is checked independently (marked_alive), not taken from tether's word.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.plugins.processes import Daemon, marked_alive, start_daemon, stop_daemon, wait_until

AGENT_TTL = 2.0


def kill_agent_leftovers(*agents: str) -> None:
    for p in psutil.process_iter():
        try:
            if p.environ().get("TETHER_AGENT") in agents:
                p.kill()
        except psutil.Error:
            continue


@dataclass
class Cluster:
    root: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    coordinator: Daemon | None = None
    agents: dict[str, Daemon] = field(default_factory=dict)
    retired: list[Daemon] = field(default_factory=list)
    names: set[str] = field(default_factory=set)

    @property
    def c(self) -> Daemon:
        assert self.coordinator is not None
        return self.coordinator

    def name(self, short: str) -> str:
        return f"{short}-{self.tag}"

    def start_coordinator(self, listen: str = "127.0.0.1:0") -> Daemon:
        self.coordinator = start_daemon(
            "coordinator", ["--listen", listen, "--state-dir", str(self.root / "coord"),
                            "--agent-ttl", str(AGENT_TTL)], self.root / "coord", "coordinator")
        return self.coordinator

    def start_agent(self, short: str) -> Daemon:
        name = self.name(short)
        self.names.add(name)
        state = self.root / short
        d = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", self.c.address,
                                   "--name", name, "--state-dir", str(state)], state, "agent")
        self.agents[short] = d
        return d

    def agent_states(self) -> dict[str, str]:
        return {a["name"]: a["state"] for a in self.c.json("agents")["agents"]}

    def wait_up(self, *shorts: str) -> None:
        want = {self.name(s) for s in shorts}
        wait_until(lambda: all(self.agent_states().get(n) == "up" for n in want), 20,
                   f"agents {sorted(want)} to be up")

    def spawn(self, session: str, short: str, argv: list[str], *opts: str) -> str:
        res = self.c.cli("spawn", "--session", session, "--agent", self.name(short), *opts,
                         "--", *argv)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def groups(self, session: str) -> dict[str, dict[str, Any]]:
        return {g["group_id"]: g for g in self.c.json("show", session)["groups"]}

    def close(self) -> None:
        for d in [*self.agents.values(), *self.retired]:
            stop_daemon(d)
        if self.coordinator is not None:
            stop_daemon(self.coordinator)
        kill_agent_leftovers(*self.names)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cl = Cluster(tmp_path)
    try:
        cl.start_coordinator()
        yield cl
    finally:
        cl.close()


def trap_loop(log: Path, label: str, after_term: float = 0.4) -> list[str]:
    """A process that appends `LABEL term T` on SIGTERM, works a little, appends `LABEL end T`."""
    script = (f"trap 'echo {label} term $(date +%s.%N) >> {log}; sleep {after_term}; "
              f"echo {label} end $(date +%s.%N) >> {log}; exit 0' TERM; "
              "while :; do sleep 0.05; done")
    return ["sh", "-c", script]


def read_events(log: Path) -> dict[tuple[str, str], float]:
    out = {}
    for line in log.read_text().splitlines():
        label, what, at = line.split()
        out[(label, what)] = float(at)
    return out


# ------------------------------------------------------------------ phases across agents


@pytest.mark.slow
def test_session_across_three_agents_stops_in_phases(cluster: Cluster, tmp_path: Path) -> None:
    for a in ("a1", "a2", "a3"):
        cluster.start_agent(a)
    cluster.wait_up("a1", "a2", "a3")
    log = tmp_path / "order.log"
    layout = [("a1", 0, "tunnel1"), ("a2", 0, "tunnel2"), ("a3", 1, "proxy"),
              ("a1", 2, "server1"), ("a2", 2, "server2"), ("a3", 2, "server3")]
    ids = {label: cluster.spawn("ph", agent, trap_loop(log, label), "--stop-order", str(order),
                                "--label", label, "--grace", "5")
           for agent, order, label in layout}
    shown = cluster.groups("ph")
    assert {g["agent"] for g in shown.values()} == {cluster.name(a) for a in ("a1", "a2", "a3")}
    assert all(g["state"] == "running" for g in shown.values())

    res = cluster.c.cli("stop", "ph", "-o", "json", timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["complete"] is True
    by_label = {g["label"]: g for g in report["groups"]}
    assert set(by_label) == set(ids), "every group has a record"
    for agent, _, label in layout:
        g = by_label[label]
        assert g["group_id"] == ids[label] and g["agent"] == cluster.name(agent)
        assert (g["reason"], g["exit_code"], g["survivors"]) == ("requested", 0, 0)
        assert marked_alive(ids[label]) == []

    ev = read_events(log)
    assert len(ev) == 2 * len(layout), ev
    phases: dict[int, list[str]] = {}
    for _, order, label in layout:
        phases.setdefault(order, []).append(label)
    orders = sorted(phases)
    for lower, higher in itertools.pairwise(orders):
        last_end = max(ev[(lab, "end")] for lab in phases[lower])
        first_term = min(ev[(lab, "term")] for lab in phases[higher])
        assert last_end < first_term, (
            f"stop_order {higher} started stopping at {first_term} before stop_order {lower} "
            f"had ended ({last_end})")
    # Within one phase the agents are asked at once, not one after the other.
    terms = [ev[(lab, "term")] for lab in phases[2]]
    assert max(terms) - min(terms) < 0.35, f"phase 2 was not fanned out concurrently: {terms}"

    shown = cluster.groups("ph")
    assert all(g["state"] == "stopped" and g["reason"] == "requested" for g in shown.values())
    assert cluster.c.json("show", "ph")["state"] == "stopped"


# ------------------------------------------------------------------ agent killed


@pytest.mark.slow
def test_killed_agent_is_unreachable_and_its_groups_say_so(cluster: Cluster) -> None:
    cluster.start_agent("a1")
    a2 = cluster.start_agent("a2")
    cluster.wait_up("a1", "a2")
    g1 = cluster.spawn("k", "a1", ["sleep", "300"], "--label", "on-a1")
    g2 = cluster.spawn("k", "a2", ["sleep", "300"], "--label", "on-a2")
    assert marked_alive(g1) and marked_alive(g2)

    a2.proc.kill()
    a2.proc.wait()
    wait_until(lambda: cluster.agent_states()[cluster.name("a2")] == "unreachable",
               AGENT_TTL + 5, "the killed agent to be reported unreachable")
    # Not before its heartbeats lapsed: by the coordinator's own record of the last one.
    (a2_row,) = [a for a in cluster.c.json("agents")["agents"] if a["name"] == cluster.name("a2")]
    assert a2_row["last_seen_seconds_ago"] >= AGENT_TTL - 0.5
    assert cluster.agent_states()[cluster.name("a1")] == "up"
    table = cluster.c.cli("agents").stdout
    assert "unreachable" in next(line for line in table.splitlines()
                                 if cluster.name("a2") in line)

    groups = cluster.groups("k")
    assert groups[g2]["state"] == "unreachable", "a group of a dead agent is not 'running'"
    assert groups[g1]["state"] == "running"
    show = cluster.c.cli("show", "k").stdout
    assert "unreachable" in next(line for line in show.splitlines() if g2 in line)
    # The dead agent's guardian ended its kill-policy group.
    wait_until(lambda: marked_alive(g2) == [], 15, "the guardian to end the orphaned group")

    # Spawning on the unreachable agent: exit 4, the message names it, nothing changes.
    before = cluster.c.json("sessions", "--all")["sessions"]
    res = cluster.c.cli("spawn", "--session", "k", "--agent", cluster.name("a2"), "--", "sleep",
                        "300")
    assert res.returncode == 4, res.stderr
    assert cluster.name("a2") in res.stderr and "unreachable" in res.stderr
    assert cluster.c.json("sessions", "--all")["sessions"] == before
    assert marked_alive(g1), "the healthy agent's group is untouched"

    # A stop meanwhile reports the dead agent's group instead of dropping it; it does not
    # finish until the agent is back.
    res = cluster.c.cli("stop", "k", "-o", "json", "--timeout", "4", timeout=60)
    assert res.returncode == 4, res.stderr
    report = json.loads(res.stdout)
    assert report["complete"] is False
    rep = {g["group_id"]: g for g in report["groups"]}
    assert set(rep) == {g1, g2}
    assert rep[g2]["state"] == "unreachable" and cluster.name("a2") in rep[g2]["error"]
    assert rep[g1]["reason"] == "requested" and marked_alive(g1) == []

    # The agent comes back (same name, same state dir): its group is recorded as lost,
    # the stop completes, and it is reported as not clean (exit 1).
    cluster.retired.append(a2)
    cluster.start_agent("a2")
    cluster.wait_up("a2")
    res = cluster.c.cli("stop", "k", "-o", "json", timeout=60)
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert report["complete"] is True
    rep = {g["group_id"]: g for g in report["groups"]}
    assert rep[g2]["reason"] == "lost" and rep[g1]["reason"] == "requested"
    assert cluster.c.json("show", "k")["state"] == "stopped"


# ------------------------------------------------------------------ coordinator killed


@pytest.mark.slow
def test_coordinator_sigkilled_during_stop_finishes_it_after_restart(cluster: Cluster) -> None:
    cluster.start_agent("a1")
    cluster.start_agent("a2")
    cluster.wait_up("a1", "a2")
    stubborn = cluster.spawn("crash", "a1", ["sh", "-c", "trap '' TERM; sleep 300 & wait"],
                             "--label", "stubborn", "--grace", "3")
    polite = cluster.spawn("crash", "a2", ["sleep", "300"], "--label", "polite", "--grace", "3")
    later = cluster.spawn("crash", "a2", ["sleep", "300"], "--label", "later", "--stop-order",
                          "1")
    bystander = cluster.spawn("other", "a1", ["sleep", "300"], "--label", "bystander")
    before = cluster.c.json("sessions", "--all")["sessions"]
    known = {s["session"]: sorted(g["group_id"] for g in s["groups"]) for s in before}
    assert known == {"crash": sorted([stubborn, polite, later]), "other": [bystander]}

    env = {**os.environ, "TETHER_COORDINATOR": cluster.c.address}
    stop = subprocess.Popen([sys.executable, "-m", "tether.coordinator.cli", "stop", "crash",
                             "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: cluster.c.json("show", "crash")["state"] == "stopping", 10,
                   "the stop to begin")
        time.sleep(0.5)
        assert marked_alive(stubborn), "the stop is still in flight when the coordinator dies"
        cluster.c.proc.kill()
        cluster.c.proc.wait()
        _, err = stop.communicate(timeout=30)
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    assert stop.returncode == 4, f"the waiting client learns the coordinator went away: {err}"
    assert "unreachable" in err

    address = cluster.c.address
    cluster.retired.append(cluster.c)
    cluster.start_coordinator(listen=address)
    assert cluster.c.address == address

    # Nothing acknowledged is lost: both sessions and every group are still there.
    after = cluster.c.json("sessions", "--all")["sessions"]
    assert {s["session"]: sorted(g["group_id"] for g in s["groups"]) for s in after} == known

    # The interrupted stop completes by itself after the restart.
    wait_until(lambda: cluster.c.json("show", "crash")["state"] == "stopped", 30,
               "the resumed stop to finish")
    groups = cluster.groups("crash")
    assert groups[stubborn]["reason"] == "forced_kill"
    assert groups[polite]["reason"] == "requested"
    assert groups[later]["reason"] == "requested"
    for gid in (stubborn, polite, later):
        assert groups[gid]["state"] == "stopped" and groups[gid]["survivors"] == 0
        assert marked_alive(gid) == []
    assert cluster.c.json("show", "crash")["stop_cause"] == "requested"

    # Asking again returns the records at once, clean; the other session runs on.
    res = cluster.c.cli("stop", "crash", "-o", "json")
    assert res.returncode == 0, res.stderr
    assert {g["group_id"] for g in json.loads(res.stdout)["groups"]} == {stubborn, polite, later}
    other = cluster.c.json("show", "other")
    assert other["state"] == "active" and other["groups"][0]["state"] == "running"
    assert marked_alive(bystander)


# ------------------------------------------------------------------ leases


@pytest.mark.slow
def test_lease_expiry_stops_the_session(cluster: Cluster) -> None:
    cluster.start_agent("a1")
    cluster.start_agent("a2")
    cluster.wait_up("a1", "a2")
    g1 = cluster.spawn("lease", "a1", ["sleep", "300"])
    g2 = cluster.spawn("lease", "a2", ["sh", "-c", "trap '' TERM; sleep 300"], "--grace", "0.5")
    res = cluster.c.cli("keepalive", "lease", "--ttl", "1.5")
    assert res.returncode == 0, res.stderr
    assert cluster.c.json("show", "lease")["state"] == "active"

    wait_until(lambda: cluster.c.json("show", "lease")["state"] == "stopped", 15,
               "the lapsed lease to stop the session")
    shown = cluster.c.json("show", "lease")
    assert shown["stop_cause"] == "lease_expired"
    reasons = {g["group_id"]: g["reason"] for g in shown["groups"]}
    assert reasons == {g1: "requested", g2: "forced_kill"}
    assert marked_alive(g1) == [] and marked_alive(g2) == []
    # A lapsed session cannot be kept alive any more; its name can be reused.
    res = cluster.c.cli("keepalive", "lease", "--ttl", "5")
    assert res.returncode == 1 and "stopped" in res.stderr
    stop = json.loads(cluster.c.cli("stop", "lease", "-o", "json").stdout)
    assert stop["stop_cause"] == "lease_expired" and stop["complete"] is True


@pytest.mark.slow
def test_keepalive_renewals_keep_the_session_alive(cluster: Cluster) -> None:
    cluster.start_agent("a1")
    cluster.wait_up("a1")
    gid = cluster.spawn("kept", "a1", ["sleep", "300"])
    t0 = time.monotonic()
    renewals = 0
    while time.monotonic() - t0 < 3.5:
        tick = time.monotonic()
        res = cluster.c.cli("keepalive", "kept", "--ttl", "1.5")
        assert res.returncode == 0, f"renewal {renewals} at {tick - t0:.1f} s: {res.stderr}"
        renewals += 1
        time.sleep(max(0.0, 0.5 - (time.monotonic() - tick)))
    assert renewals >= 4
    shown = cluster.c.json("show", "kept")
    assert shown["state"] == "active" and shown["stop_cause"] == ""
    assert marked_alive(gid), "renewed every 0.5 s, the 1.5 s lease never lapsed"
    # Then the owner goes away: the lease lapses and the session stops.
    wait_until(lambda: cluster.c.json("show", "kept")["state"] == "stopped", 15,
               "the session to stop once renewals end")
    assert cluster.c.json("show", "kept")["stop_cause"] == "lease_expired"
    assert marked_alive(gid) == []
