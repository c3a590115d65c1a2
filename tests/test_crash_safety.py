"""The promise holds when tether itself dies: guardian, re-adoption, ordered shutdown, orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.plugins.processes import (
    Daemon,
    marked_alive,
    pid_alive,
    start_daemon,
    stop_daemon,
    wait_until,
)

HOSTILE = [
    # setsid escapees and a double-fork daemon whose leader exits at once
    ["sh", "-c", "setsid sleep 300 & setsid sh -c 'trap \"\" TERM; sleep 300' & sleep 300"],
    ["sh", "-c", "(setsid sh -c 'sleep 300; true' &); exit 0"],
    ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"],
]


def serve_on(tmp_path: Path, port: str = "0", *extra: str) -> Daemon:
    return start_daemon("serve", ["--listen", f"127.0.0.1:{port}", "--state-dir",
                                  str(tmp_path / "state"), "--agent-name",
                                  f"crash-{tmp_path.name[-10:]}", *extra], tmp_path)


def instance_marker(tmp_path: Path) -> str:
    """The TETHER_AGENT value of serve's agent in this state directory (kept across
    restarts: the same state directory is the same agent instance)."""
    d = serve_on(tmp_path)
    try:
        return str(d.json("agents")["agents"][0]["instance"])
    finally:
        stop_daemon(d)


def spawn(d: Daemon, session: str, argv: list[str], *opts: str) -> str:
    res = d.cli("spawn", "--session", session, "--grace", "1", *opts, "--", *argv, check=True)
    return res.stdout.strip()


@pytest.mark.slow
def test_serve_sigkilled_leaves_nothing_and_keep_group_is_readopted(tmp_path: Path) -> None:
    d = serve_on(tmp_path)
    try:
        killed = [spawn(d, "work", argv) for argv in HOSTILE]
        kept = spawn(d, "work", ["sh", "-c", "sleep 300 & sleep 300"], "--orphan-policy", "keep",
                     "--label", "kept")
        wait_until(lambda: all(marked_alive(g) for g in killed), 10, "trees to start")
        kept_pids = marked_alive(kept)
        assert len(kept_pids) == 3

        d.proc.kill()  # SIGKILL: no shutdown code runs in serve
        d.proc.wait()

        wait_until(lambda: not any(marked_alive(g) for g in killed), 10,
                   "the guardian to end every kill-policy tree")
        assert sorted(marked_alive(kept)) == sorted(kept_pids), "keep group must survive"

        port = d.address.rsplit(":", 1)[1]
        d2 = serve_on(tmp_path, port)
        try:
            show = d2.json("show", "work")
            states = {g["group_id"]: g for g in show["groups"]}
            assert states[kept]["state"] == "running", "keep group must be re-adopted"
            for g in killed:
                assert states[g]["state"] == "exited"
                assert states[g]["reason"] == "lost"
            res = d2.cli("stop", "work", "-o", "json")
            assert res.returncode == 1  # lost groups make the session not clean
            assert marked_alive(kept) == [], "the re-adopted group is stopped for real"
        finally:
            stop_daemon(d2)
    finally:
        stop_daemon(d)
        for pid in marked_alive(agent=f"crash-{tmp_path.name[-10:]}"):
            os.kill(pid, signal.SIGKILL)


def test_a_readopted_on_failure_group_that_ends_is_recorded_unknown_and_restarted(
        tmp_path: Path) -> None:
    """A re-adopted leader is not the new agent's child: its exit status cannot be read.
    Unknown is not clean: the run is recorded ``unknown`` and on-failure restarts it."""
    go, second = tmp_path / "go", tmp_path / "second-run"
    program = (f"if [ -e {second} ]; then exec sleep 300; fi; touch {second}; "
               f"while [ ! -e {go} ]; do sleep 0.05; done; exit 1")
    d = serve_on(tmp_path)
    gid = ""
    try:
        gid = spawn(d, "svc", ["sh", "-c", program], "--orphan-policy", "keep",
                    "--restart", "on-failure")
        stop_daemon(d)  # keep groups survive the agent
        d2 = serve_on(tmp_path)
        try:
            assert d2.json("show", "svc")["groups"][0]["state"] == "running"
            go.touch()  # the re-adopted run now fails
            wait_until(lambda: d2.json("show", "svc")["groups"][0].get("restarts"), 30,
                       "the re-adopted group to be restarted")
            group = d2.json("show", "svc")["groups"][0]
            assert group["state"] in ("running", "restarting"), group
            assert group["runs"][0]["reason"] == "unknown", group
        finally:
            d2.cli("stop", "svc")
            stop_daemon(d2)
    finally:
        stop_daemon(d)
        for pid in marked_alive(gid) if gid else []:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_shutdown_signal_stops_every_kill_group_before_exit(tmp_path: Path, sig: int) -> None:
    d = serve_on(tmp_path)
    try:
        groups = [spawn(d, "s", argv) for argv in HOSTILE]
        kept = spawn(d, "s", ["sleep", "300"], "--orphan-policy", "keep")
        wait_until(lambda: all(marked_alive(g) for g in groups), 10, "trees to start")
        d.signal(sig)
        assert d.wait(30) == 0
        for g in groups:
            assert marked_alive(g) == [], f"{g} outlived `tether serve` after {sig}"
        assert marked_alive(kept), "keep groups are left for re-adoption"
        assert "shutdown requested" in d.log()
    finally:
        stop_daemon(d)
        for pid in marked_alive(kept):
            os.kill(pid, signal.SIGKILL)


def metric(address: str, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
        if labels and line.startswith(name + "{") and all(
                part in line for part in labels.split(",")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in metrics")


def test_marked_process_without_group_is_counted_listed_and_reaped(tmp_path: Path) -> None:
    from tests.plugins.processes import free_port

    mport = free_port()
    agent = f"crash-{tmp_path.name[-10:]}"
    marker = instance_marker(tmp_path)
    d = serve_on(tmp_path, "0", "--metrics-listen", f"127.0.0.1:{mport}")
    stray = subprocess.Popen(["sleep", "300"], start_new_session=True,
                             env={"TETHER_GROUP": "g-deadbeef", "TETHER_AGENT": marker,
                                  "PATH": os.environ["PATH"]})
    try:
        listed = d.json("orphans")
        (orphan,) = [o for o in listed["orphans"] if o["pid"] == stray.pid]
        assert orphan["former_group"] == "g-deadbeef"
        assert "sleep 300" in orphan["command"]
        assert orphan["found_by"] == "marker"
        assert orphan["agent"] == agent
        m = f"127.0.0.1:{mport}"
        assert metric(m, "tether_orphans") == 1
        assert metric(m, "tether_orphans_detected_total") >= 1

        swept = d.json("orphans", "--sweep")
        assert [o["reaped"] for o in swept["orphans"] if o["pid"] == stray.pid] == [True]
        assert stray.wait(5) == -signal.SIGKILL
        assert metric(m, "tether_orphans") == 0
        assert metric(m, "tether_orphans_reaped_total") >= 1
    finally:
        stop_daemon(d)
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_orphan_left_by_an_earlier_agent_is_reaped_at_startup(tmp_path: Path) -> None:
    marker = instance_marker(tmp_path)  # an earlier run of this agent (same state directory)
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                             start_new_session=True,
                             env={"TETHER_GROUP": "g-0ld", "TETHER_AGENT": marker})
    try:
        d = serve_on(tmp_path)
        try:
            assert stray.wait(10) == -signal.SIGKILL
            assert "orphan pid" in d.log()
        finally:
            stop_daemon(d)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_guardian_is_restarted_when_it_dies(tmp_path: Path) -> None:
    import psutil

    d = serve_on(tmp_path)
    try:
        def guardians() -> list[psutil.Process]:
            found = []
            for c in psutil.Process(d.proc.pid).children():
                try:  # a killed guardian is a zombie until the agent reaps it
                    if c.status() != psutil.STATUS_ZOMBIE \
                            and "tether.agent.guardian" in " ".join(c.cmdline()):
                        found.append(c)
                except psutil.Error:
                    continue
            return found

        wait_until(lambda: len(guardians()) == 1, 10, "a guardian")
        first = guardians()[0]
        first.kill()
        def replaced() -> bool:
            now = guardians()  # one look: the list may change between two
            return len(now) == 1 and now[0].pid != first.pid

        wait_until(replaced, 10, "a new guardian")
        g = spawn(d, "s", ["sleep", "300"])
        d.proc.kill()
        d.proc.wait()
        wait_until(lambda: marked_alive(g) == [], 10, "the new guardian to do its job")
    finally:
        stop_daemon(d)


def test_double_sigint_escalates(tmp_path: Path) -> None:
    d = serve_on(tmp_path)
    try:
        g = spawn(d, "s", ["sh", "-c", "trap '' TERM INT; sleep 300"], "--grace", "60")
        wait_until(lambda: len(marked_alive(g)) == 2, 10, "the tree")
        d.signal(signal.SIGINT)
        wait_until(lambda: "shutdown 2/5" in d.log(), 10, "the stop to begin")
        d.signal(signal.SIGINT)
        # The grace is 60 s: exiting within 30 s means the second SIGINT escalated.
        assert d.wait(30) == 0
        assert marked_alive(g) == []
        assert "escalating" in d.log()
    finally:
        stop_daemon(d)
        assert not any(pid_alive(p) for p in marked_alive(g))


async def test_orphan_sweeps_never_kill_groups_spawned_while_they_scan(tmp_path: Path) -> None:
    """Regression: a sweep that snapshotted the live groups before a spawn killed the
    new group (and removed its cgroup), leaving it `running` forever."""
    import asyncio

    from tests.plugins.processes import make_authority
    from tether.agent.orphans import OrphanReaper
    from tether.core.model import GroupSpec

    name = f"race-{tmp_path.name[-8:]}"
    authority, signallers = await make_authority(name)
    local = signallers.get("local")
    reaper = OrphanReaper(authority.marker, local.tree,
                          lambda: {g.group_id for g in authority.groups() if not g.state.ended})
    spawned: list[str] = []
    try:
        async def spawn_many() -> None:
            for i in range(60):
                view = await authority.spawn(GroupSpec(argv=("sleep", "300")))
                spawned.append(view.group_id)
                await asyncio.sleep(0.001 * (i % 7))  # as RPC-driven spawns yield

        async def sweep_forever() -> None:
            while True:
                await reaper.sweep(kill=True)

        sweeper = asyncio.ensure_future(sweep_forever())
        await spawn_many()
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await reaper.sweep(kill=True)
        dead = [g for g in spawned if not marked_alive(g)]
        assert dead == [], f"sweeps killed live groups: {dead}"
        assert all(authority.get(g).state.value == "running" for g in spawned)
    finally:
        await authority.stop_all()
        await authority.shutdown()
        await signallers.aclose()


def test_a_keep_groups_stdin_reads_end_of_file_once_its_agent_died(tmp_path: Path) -> None:
    """The guardian holds a keep group's output pipes, never its stdin (README): once the
    agent is gone nothing can write it, and the program reads end-of-file."""
    d = serve_on(tmp_path)
    log = tmp_path / "eof.log"
    try:
        spawn(d, "eof", ["sh", "-c", "echo ready; cat >/dev/null; echo stdin-eof; "
                         "exec sleep 300"], "--orphan-policy", "keep", "--log", str(log),
              "--stdin", "pipe")
        wait_until(lambda: log.exists() and b"ready" in log.read_bytes(), 10, "it to start")
        d.proc.kill()
        d.proc.wait()
        wait_until(lambda: b"stdin-eof" in log.read_bytes(), 20,
                   "the keep group to read end-of-file after its agent died")
    finally:
        stop_daemon(d)
        for pid in marked_alive(agent=f"crash-{tmp_path.name[-10:]}"):
            os.kill(pid, signal.SIGKILL)


def test_a_keep_groups_output_outlives_its_agent(tmp_path: Path) -> None:
    """A keep group writes to pipes the agent reads. When the agent dies its guardian
    holds them (a pipe without a reader would kill the program at its next write with
    SIGPIPE) and appends what comes to the group's --log until it ends; a new agent
    re-adopts the group and says its output is not captured any more."""
    d = serve_on(tmp_path)
    log = tmp_path / "kept.log"
    ticks = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.02; done"

    def lines() -> int:
        return len(log.read_bytes().splitlines()) if log.exists() else 0

    try:
        kept = spawn(d, "work", ["sh", "-c", ticks], "--orphan-policy", "keep", "--log",
                     str(log), "--stdin", "pipe")
        wait_until(lambda: lines() >= 3, 10, "the group to write")
        leader = d.json("show", "work")["groups"][0]["pid"]
        d.proc.kill()
        d.proc.wait()
        at_kill = lines()
        wait_until(lambda: lines() >= at_kill + 30, 20,
                   "the keep group to go on writing after its agent died")
        assert pid_alive(leader), "it was neither killed nor broken by SIGPIPE"
        text = log.read_text()
        assert all(f"tick {i}\n" in text for i in range(at_kill + 20)), "no line was lost"

        port = d.address.rsplit(":", 1)[1]
        d2 = serve_on(tmp_path, port)
        try:
            assert d2.json("show", "work")["groups"][0]["state"] == "running"
            res = d2.cli("logs", "work", "--group", kept)
            assert res.returncode == 0, res.stderr
            assert "not captured" in res.stderr and "re-adopted" in res.stderr
            d2.cli("stop", "work", check=True)
            assert marked_alive(kept) == []
        finally:
            stop_daemon(d2)
    finally:
        stop_daemon(d)
        for pid in marked_alive(agent=f"crash-{tmp_path.name[-10:]}"):
            os.kill(pid, signal.SIGKILL)
