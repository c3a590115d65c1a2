"""Hosts with their own addresses: a coordinator and two agents, each in its own network
namespace, joined by veth pairs to a bridge in a hub namespace. One agent's link goes
down during a session stop: the stop reports that agent's groups as unreachable, keeps
retrying, and completes once the link is back.

Every namespace, link and address is made by the test and removed by it; traffic stays
on 10.231.X.0/24 inside those namespaces. The namespaces share the host's PID namespace,
so marked_alive() still sees every process from here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.plugins.common import require_binary, require_root
from tests.plugins.processes import marked_alive, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

AGENT_TTL = 2.0
GRACE = 1.0


def run(*args: str) -> None:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {res.returncode}: {res.stderr.strip()}")


@dataclass
class NsDaemon:
    name: str
    ns: str
    proc: subprocess.Popen[str]
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Netlab:
    """A hub namespace with bridge br0; one namespace per host, each with eth0 on the bridge."""

    ip: str
    root: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: int = field(default_factory=lambda: 1 + secrets.randbelow(250))
    namespaces: list[str] = field(default_factory=list)
    hosts: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # host -> ns, addr, port
    daemons: list[NsDaemon] = field(default_factory=list)
    agent_names: set[str] = field(default_factory=set)
    coordinator: NsDaemon | None = None

    @property
    def hub(self) -> str:
        return f"tt-hub-{self.tag}"

    def _netns(self, name: str) -> str:
        run(self.ip, "netns", "add", name)
        self.namespaces.append(name)
        run(self.ip, "-n", name, "link", "set", "lo", "up")
        return name

    def setup_hub(self) -> None:
        self._netns(self.hub)
        run(self.ip, "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run(self.ip, "-n", self.hub, "link", "set", "br0", "up")

    def add_host(self, host: str) -> str:
        """A namespace for `host` with eth0 = 10.231.SUBNET.N/24, its peer on the hub's br0."""
        ns = self._netns(f"tt-{host}-{self.tag}")
        port = f"p-{host}"
        addr = f"10.231.{self.subnet}.{len(self.hosts) + 1}"
        run(self.ip, "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        run(self.ip, "-n", self.hub, "link", "set", port, "master", "br0")
        run(self.ip, "-n", self.hub, "link", "set", port, "up")
        run(self.ip, "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        run(self.ip, "-n", ns, "link", "set", "eth0", "up")
        self.hosts[host] = (ns, addr, port)
        return addr

    def link(self, host: str, state: str) -> None:
        """Unplug (down) or replug (up) a host's cable at the hub."""
        _, _, port = self.hosts[host]
        run(self.ip, "-n", self.hub, "link", "set", port, state)

    def start(self, host: str, kind: str, *args: str, name: str = "") -> NsDaemon:
        ns, addr, _ = self.hosts[host]
        log_path = self.root / f"{host}.log"
        with open(log_path, "a") as log:
            proc = subprocess.Popen(
                [self.ip, "netns", "exec", ns, sys.executable, "-m", "tether.coordinator.cli",
                 kind, "--listen", f"{addr}:0", "--insecure", *args],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                start_new_session=True)
        d = NsDaemon(name or host, ns, proc, "", log_path)
        self.daemons.append(d)
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "listening on" in line or not line:
                break
        proc.stdout.close()
        if "listening on" not in line:
            raise AssertionError(f"tether {kind} in {ns} did not start: {d.log()}")
        d.address = line.split("listening on ", 1)[1].split()[0]
        return d

    def start_coordinator(self) -> NsDaemon:
        self.coordinator = self.start(
            "coord", "coordinator", "--state-dir", str(self.root / "coord"), "--agent-ttl",
            str(AGENT_TTL))
        return self.coordinator

    def start_agent(self, host: str) -> NsDaemon:
        assert self.coordinator is not None
        name = f"{host}-{self.tag}"
        self.agent_names.add(name)
        return self.start(host, "agent", "--coordinator", self.coordinator.address, "--name", name,
                          "--state-dir", str(self.root / host), name=name)

    def cli_popen(self, *args: str) -> subprocess.Popen[str]:
        """Run the CLI on the coordinator's host (its namespace) without waiting."""
        assert self.coordinator is not None
        ns = self.hosts["coord"][0]
        return subprocess.Popen(
            [self.ip, "netns", "exec", ns, sys.executable, "-m", "tether.coordinator.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
            env={**os.environ, "TETHER_COORDINATOR": self.coordinator.address})

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        p = self.cli_popen(*args)
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def json(self, *args: str) -> Any:
        res = self.cli(*args, "-o", "json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def agent_states(self) -> dict[str, str]:
        return {a["name"]: a["state"] for a in self.json("agents")["agents"]}

    def close(self) -> None:
        for d in reversed(self.daemons):
            if d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        for d in reversed(self.daemons):
            try:
                d.proc.wait(30)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
        for p in psutil.process_iter():
            try:
                if p.environ().get("TETHER_AGENT") in self.agent_names:
                    p.kill()
            except psutil.Error:
                continue
        for ns in reversed(self.namespaces):
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def netlab(tmp_path: Path) -> Iterator[Netlab]:
    require_root()
    ip = require_binary("ip", "iproute2")
    lab = Netlab(ip, tmp_path)
    try:
        lab.setup_hub()
        for host in ("coord", "a1", "a2"):
            lab.add_host(host)
        yield lab
    finally:
        lab.close()
        left = subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout
        assert lab.tag not in left, f"namespaces left behind: {left}"


def trap_loop(log: Path, label: str) -> list[str]:
    script = (f"trap 'echo {label} term $(date +%s.%N) >> {log}; exit 0' TERM; "
              "while :; do sleep 0.05; done")
    return ["sh", "-c", script]


def test_agent_cut_off_during_stop_is_reported_retried_and_finished(
        netlab: Netlab, tmp_path: Path) -> None:
    coord = netlab.start_coordinator()
    a1, a2 = netlab.start_agent("a1"), netlab.start_agent("a2")
    for d in (coord, a1, a2):
        # `ip netns exec` execs the daemon itself: signals from here reach it.
        assert "tether.coordinator.cli" in " ".join(psutil.Process(d.proc.pid).cmdline())
        assert d.address.startswith(f"10.231.{netlab.subnet}.")
    wait_until(lambda: netlab.agent_states() == {a1.name: "up", a2.name: "up"}, 30,
               "both agents to register over their links")
    agents = {a["name"]: a["address"] for a in netlab.json("agents")["agents"]}
    assert agents == {a1.name: a1.address, a2.name: a2.address}

    log = tmp_path / "terms.log"
    layout = [(a1, 0, "a1-early"), (a2, 0, "a2-early"), (a2, 1, "a2-late"), (a1, 1, "a1-late")]
    ids: dict[str, str] = {}
    for agent, order, label in layout:
        res = netlab.cli("spawn", "--session", "part", "--agent", agent.name, "--stop-order",
                         str(order), "--label", label, "--grace", str(GRACE), "--",
                         *trap_loop(log, label))
        assert res.returncode == 0, res.stderr
        ids[label] = res.stdout.strip()
    assert all(marked_alive(g) for g in ids.values())
    on_a2 = {ids["a2-early"], ids["a2-late"]}

    netlab.link("a2", "down")
    stop = netlab.cli_popen("stop", "part", "-o", "json")
    try:
        # While a2 is cut off, a bounded stop answers with what it has so far: a2's groups
        # are there, marked unreachable with the reason, not dropped.
        report: dict[str, Any] = {}

        def partial_report_names_a2() -> bool:
            nonlocal report
            res = netlab.cli("stop", "part", "-o", "json", "--timeout", "3")
            report = json.loads(res.stdout)
            assert report["complete"] is False
            if not any(g.get("error") for g in report["groups"]):
                # The first call to a2 has not timed out yet: not finished, and it says so.
                assert res.returncode == 1 and "did not finish" in res.stderr, res.stderr
                return False
            assert res.returncode == 4, (res.returncode, res.stderr)
            assert "did not answer" in res.stderr
            errors = {g["group_id"] for g in report["groups"] if g.get("error")}
            assert errors <= on_a2, f"only the cut-off agent's groups have errors: {report}"
            return ids["a2-early"] in errors

        wait_until(partial_report_names_a2, 40, "the stop to report a2's groups")
        assert report["complete"] is False
        by_id = {g["group_id"]: g for g in report["groups"]}
        assert set(by_id) == set(ids.values()), "every group is in the report"
        early = by_id[ids["a2-early"]]
        assert early["state"] == "unreachable" and early["reason"] is None
        assert a2.name in early["error"] and "unreachable" in early["error"]
        # a2's phase-1 group has not been asked yet, but it is not shown as running either.
        assert by_id[ids["a2-late"]]["state"] == "unreachable"
        assert by_id[ids["a2-late"]]["reason"] is None
        assert by_id[ids["a1-early"]]["reason"] == "requested", "a1 answered for its phase-0 group"
        assert marked_alive(ids["a1-early"]) == []
        # Phase 1 waits for phase 0, which waits for a2: a1's late group still runs.
        assert marked_alive(ids["a1-late"]), "stop_order 1 must not start before 0 has ended"
        assert stop.poll() is None, "the stop does not finish while a group has no record"

        assert netlab.agent_states()[a2.name] == "unreachable"
        assert netlab.agent_states()[a1.name] == "up"
        shown = netlab.json("show", "part")
        assert shown["state"] == "stopping"
        states = {g["group_id"]: g["state"] for g in shown["groups"]}
        assert {states[g] for g in on_a2} == {"unreachable"}
        # Cut off is not dead: a2 and its processes are still there, waiting.
        assert a2.proc.poll() is None and all(marked_alive(g) for g in on_a2)

        netlab.link("a2", "up")
        out, err = stop.communicate(timeout=120)
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    assert stop.returncode == 0, f"the stop completes once the link is back: {err}\n{out}"
    final = json.loads(out)
    assert final["complete"] is True
    by_label = {g["label"]: g for g in final["groups"]}
    assert set(by_label) == {label for _, _, label in layout}
    for agent, _, label in layout:
        g = by_label[label]
        assert g["group_id"] == ids[label] and g["agent"] == agent.name
        assert (g["reason"], g["exit_code"], g["survivors"]) == ("requested", 0, 0), g
        assert "error" not in g
        assert marked_alive(ids[label]) == []
    terms = {line.split()[0]: float(line.split()[2]) for line in log.read_text().splitlines()}
    assert max(terms["a1-early"], terms["a2-early"]) < min(terms["a1-late"], terms["a2-late"])
    assert netlab.json("show", "part")["state"] == "stopped"
    wait_until(lambda: netlab.agent_states().get(a2.name) == "up", 30,
               "a2 to be up again once its heartbeats get through")


def test_a_client_cut_off_from_the_coordinator_loses_its_window_like_a_lost_stream(
        netlab: Netlab) -> None:
    """No FIN, no RST: the client's cable is pulled. Its renewals stop arriving, the
    coordinator counts the stream as lost, waits out the grace, and stops the session
    (cause lease_lost); the client, unable to come back within the grace, says so."""
    from tests.test_lease import WindowClient

    coord = netlab.start_coordinator()
    a1 = netlab.start_agent("a1")
    wait_until(lambda: netlab.agent_states() == {a1.name: "up"}, 30, "the agent to register")
    # The editor runs on host a2 (its own namespace and address; no agent there).
    client = WindowClient(coord.address, "cut", 3.0, n=2,
                          prefix=[netlab.ip, "netns", "exec", netlab.hosts["a2"][0]])
    try:
        ids = client.first["ids"]
        assert all(marked_alive(g) for g in ids)
        assert netlab.json("show", "cut")["lease_held"] is True
        assert client.proc.stdin is not None
        client.proc.stdin.write("lost\n")  # it waits until its window says the lease is lost
        client.proc.stdin.flush()
        netlab.link("a2", "down")
        report = netlab.json("wait", "cut", "--timeout", "120")
        assert report["complete"] and report["stop_cause"] == "lease_lost", report
        assert all(g["survivors"] == 0 for g in report["groups"])
        assert all(marked_alive(g) == [] for g in ids)
        assert "no lease renewal within" in coord.log()
        assert client.proc.stdout is not None
        lost = json.loads(client.proc.stdout.readline())
        assert "could not be reached again" in lost["lost"], lost
    finally:
        client.close()
        netlab.link("a2", "up")
