"""What the first hostile review of the trust work broke, each as the user would meet it.

Every test here failed before its fix: a nested cgroup escaping a stop, one agent name
on two live agents, a copied state directory, a refused spawn racing a stop, a stop
that met EMFILE, a --log on a hung file system, an agent gone for good, one
idempotency key sent to two agents, a FIFO where a state file belongs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.helpers import (
    as_json,
    gid,
    kill_leftovers,
    running,
    serve,
    spawn,
    tether,
    wait_for,
)
from tests.plugins.common import require_root
from tests.plugins.processes import (
    Daemon,
    marked_alive,
    pid_alive,
    start_daemon,
    stop_daemon,
)
from tether.signallers import cgroups

pytestmark = pytest.mark.slow


def coordinator(tmp: Path, *extra: str) -> Daemon:
    return start_daemon("coordinator", ["--listen", "127.0.0.1:0", "--state-dir",
                                        str(tmp / "coord"), *extra], tmp / "coord")


def agent(tmp: Path, coord: Daemon, name: str, state: str = "", *extra: str) -> Daemon:
    d = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", coord.address,
                               "--name", name, "--state-dir",
                               str(tmp / (state or f"agent-{name}")), *extra],
                     tmp / (state or f"agent-{name}"), name=f"agent-{name}")
    return d


def registered(c: Daemon, name: str) -> dict[str, object]:
    def find() -> dict[str, object] | None:
        for a in c.json("agents")["agents"]:
            if a["name"] == name and a["state"] == "up":
                return dict(a)
        return None
    found: dict[str, object] = wait_for(find, 60, f"agent {name} to register")
    return found


def test_a_process_that_moves_into_a_child_cgroup_still_dies_with_its_group(
        tmp_path: Path) -> None:
    require_root()
    mount = cgroups.find_cgroup2_mount()
    assert mount is not None
    name = f"nest-{os.getpid()}"
    script = ('c="$MOUNT$(sed -n "s/^0:://p" /proc/self/cgroup)"; mkdir "$c/inner" && '
              'echo $$ > "$c/inner/cgroup.procs" && exec env -i /bin/sleep 300')
    with running(serve(tmp_path, name)) as d:
        res = spawn(d, "s", ["sh", "-c", script], "--env", f"MOUNT={mount}", "-o", "json")
        pid = as_json(res)["pid"]
        wait_for(lambda: cgroups.own_cgroup(pid).endswith("/inner")
                 and "sleep" in Path(f"/proc/{pid}/cmdline").read_text(), 30,
                 "the program to move itself into a child cgroup and drop its marker")
        report = d.json("stop", "s", "--grace", "1")
        assert report["complete"], report
        assert not pid_alive(pid), "a process in a nested cgroup outlived a 'complete' stop"
    kill_leftovers(name)


def test_a_second_live_agent_cannot_take_a_name_over(tmp_path: Path) -> None:
    name = f"web-{os.getpid()}"
    c = coordinator(tmp_path)
    try:
        a = agent(tmp_path, c, name, "a")
        first = registered(c, name)
        pid = as_json(tether("spawn", "--session", "s", "--agent", name, "-o", "json", "--",
                             "sleep", "300", env={"TETHER_COORDINATOR": c.address}))["pid"]
        b = agent(tmp_path, c, name, "b")
        try:
            wait_for(lambda: "is held by another live agent" in b.log(), 60,
                     "the second agent's registration to be refused")
            assert "give this agent another --name" in b.log()
            (still,) = [x for x in c.json("agents")["agents"] if x["name"] == name]
            assert still["instance"] == first["instance"]
            assert c.json("show", "s")["groups"][0]["state"] == "running"
            report = c.json("stop", "s")
            assert report["complete"] and report["groups"][0]["survivors"] == 0
            assert not pid_alive(pid)
        finally:
            stop_daemon(b)
            stop_daemon(a)
    finally:
        stop_daemon(c)
    kill_leftovers(name)


def test_a_copied_state_directory_is_a_new_instance(tmp_path: Path) -> None:
    require_root()
    name = f"copy-{os.getpid()}"
    with running(serve(tmp_path, name, state=tmp_path / "a")) as a:
        first = gid(spawn(a, "s", ["sleep", "300"]))
        (pid,) = marked_alive(first)
        shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True,
                        ignore=shutil.ignore_patterns("*.log"))
        with running(serve(tmp_path, name, state=tmp_path / "b")) as b:
            # Its start-up orphan sweep ran before it printed "listening".
            assert pid_alive(pid), "the copy's start-up sweep killed the original's group"
            assert "was copied" in b.log()
            assert b.json("sessions", "--all")["sessions"] == [] or all(
                g["state"] != "running" for g in b.json("show", "s")["groups"])
        # The copy's shutdown left the original's tree and groups alone.
        assert pid_alive(pid)
        gid(spawn(a, "s2", ["true"]))
        assert a.json("stop", "s")["complete"]
        assert not pid_alive(pid)
    kill_leftovers(name)


def test_a_refused_spawn_racing_a_stop_of_its_new_session_leaves_a_sane_state(
        tmp_path: Path) -> None:
    """The agent answers a spawn only after the session's stop began; the spawn is refused
    (a key it knows for another request). Neither the stop nor a coordinator restart
    may trip over the session the refused spawn would have undone."""
    name = f"undo-{os.getpid()}"
    c = coordinator(tmp_path)
    a = agent(tmp_path, c, name)
    env = {"TETHER_COORDINATOR": c.address}
    try:
        registered(c, name)
        # A key the agent knows (a client spoke to it directly) and the coordinator does not.
        import grpc

        from tether.v1 import agent_pb2, agent_pb2_grpc, common_pb2

        with grpc.insecure_channel(a.address) as ch:
            agent_pb2_grpc.AgentServiceStub(ch).Spawn(agent_pb2.SpawnRequest(
                spec=common_pb2.GroupSpec(argv=["sleep", "1"], session_id="direct"),
                idempotency_key="k1"), timeout=30)
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            sp = cli_bg(env, "spawn", "--session", "x", "--agent", name,
                        "--idempotency-key", "k1", "--", "sleep", "300")
            wait_for(lambda: any(s["session"] == "x" for s in
                                 c.json("sessions", "--all")["sessions"]), 30,
                     "the spawn to create session x")
            st = cli_bg(env, "stop", "x", "-o", "json")
            wait_for(lambda: any(s["session"] == "x" and s["state"] == "stopping"
                                 for s in c.json("sessions", "--all")["sessions"]), 30,
                     "the stop to begin")
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        _, err = sp.communicate(timeout=60)
        # Whichever reaches the agent first wins: the refusal, or the stop's tombstone.
        assert sp.returncode != 0 and ("idempotency key" in err
                                       or "stopped before its spawn arrived" in err), err
        _, err = st.communicate(timeout=60)
        assert st.returncode == 0, err
        stop_daemon(c)
        c = start_daemon("coordinator", ["--listen", "127.0.0.1:0", "--state-dir",
                                         str(tmp_path / "coord")], tmp_path / "coord",
                         name="coord-2")
        states = {s["session"]: s["state"] for s in c.json("sessions", "--all")["sessions"]}
        assert states.get("x", "stopped") == "stopped", states
    finally:
        stop_daemon(a)
        stop_daemon(c)
    kill_leftovers(name)


def cli_bg(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tether.coordinator.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env={**os.environ, **env})


def test_a_stop_that_met_the_fd_limit_can_be_repeated_once_it_is_raised(
        tmp_path: Path) -> None:
    require_root()
    name = f"emfile-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        group = gid(spawn(d, "s", ["sleep", "300"]))
        (pid,) = marked_alive(group)
        d.json("show", "s")  # every channel the stop needs is open
        pid_d = d.proc.pid
        used = {int(x) for x in os.listdir(f"/proc/{pid_d}/fd")}
        lowest_free = min(set(range(len(used) + 1)) - used)
        hard = next(line.split()[4] for line in
                    Path(f"/proc/{pid_d}/limits").read_text().splitlines()
                    if line.startswith("Max open files"))
        subprocess.run(["prlimit", "--pid", str(pid_d), f"--nofile={lowest_free}:{hard}"],
                       check=True)
        try:
            first = d.cli("stop", "s", "--timeout", "20", "-o", "json")
        finally:
            subprocess.run(["prlimit", "--pid", str(pid_d), f"--nofile={hard}:{hard}"],
                           check=True)
        if first.returncode == 0 and as_json(first)["complete"]:
            assert not pid_alive(pid)  # the stop managed without a descriptor: fine too
        report = d.json("stop", "s", "--timeout", "30")
        assert report["complete"], report
        assert report["groups"][0]["survivors"] == 0
        assert not pid_alive(pid), "the group survived a repeated stop"
    kill_leftovers(name)


@pytest.fixture
def hung_mount(tmp_path: Path) -> Iterator[Path]:
    """A FUSE mount whose daemon never answers (an NFS server gone): every stat hangs."""
    require_root()
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = textwrap.dedent("""
        import ctypes, os, sys, time
        fd = os.open("/dev/fuse", os.O_RDWR)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
        if libc.mount(b"hang", sys.argv[1].encode(), b"fuse", 0, opts) != 0:
            print("mount failed", os.strerror(ctypes.get_errno()), flush=True)
            sys.exit(1)
        print("mounted", flush=True)
        time.sleep(3600)
    """)
    fuse = subprocess.Popen([sys.executable, "-c", daemon, str(mnt)], stdout=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    assert fuse.stdout is not None
    line = fuse.stdout.readline()
    assert "mounted" in line, line
    try:
        yield mnt
    finally:
        fuse.kill()  # the hung calls return ENOTCONN
        fuse.wait()
        fuse.stdout.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_log_on_a_hung_file_system_fails_the_start_and_blocks_nothing(
        tmp_path: Path, hung_mount: Path) -> None:
    name = f"hung-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        res = spawn(d, "s", ["sleep", "300"], "--start-timeout", "3", "--log",
                    str(hung_mount / "app.log"), check=False)
        assert res.returncode == 1, res.stderr
        assert "blocked" in res.stderr, res.stderr
        (g,) = d.json("show", "s")["groups"]
        assert g["state"] == "failed"
        assert d.json("stop", "s")["complete"]
        # More hung starts than the old 4-thread pool had: a healthy spawn still works.
        stuck = [cli_bg(d.env | {"TETHER_COORDINATOR": d.address}, "spawn", "--session",
                        f"h{n}", "--start-timeout", "3", "--log", str(hung_mount / f"{n}.log"),
                        "--", "true") for n in range(5)]
        for p in stuck:
            p.communicate(timeout=60)
            assert p.returncode == 1
        ok = spawn(d, "healthy", ["sleep", "300"], "--log", str(tmp_path / "ok.log"))
        assert d.json("show", "healthy")["groups"][0]["state"] == "running", ok.stdout
        assert d.json("stop", "healthy")["complete"]
    kill_leftovers(name)


def test_an_agent_gone_for_good_can_be_forgotten_and_its_sessions_stopped(
        tmp_path: Path) -> None:
    name = f"gone-{os.getpid()}"
    c = coordinator(tmp_path, "--agent-ttl", "2")
    a = agent(tmp_path, c, name)
    try:
        registered(c, name)
        spawn(c, "s", ["sleep", "300"], "--agent", name)
        a.proc.kill()  # its guardian ends the group; the agent never comes back
        a.proc.wait()
        wait_for(lambda: not [x for x in c.json("agents")["agents"]
                              if x["name"] == name and x["state"] == "up"], 60, "the agent to be down")
        blocked = c.cli("stop", "s", "--timeout", "3", "-o", "json")
        assert blocked.returncode != 0
        res = c.cli("forget-agent", name)
        assert res.returncode == 0, res.stderr
        assert "1 group" in res.stdout, res.stdout
        res = c.cli("stop", "s", "--timeout", "30", "-o", "json")
        # It ends; unclean, because nothing verified what ran on the vanished host.
        assert res.returncode == 1, res.stderr
        report = as_json(res)
        (g,) = report["groups"]
        assert g["state"] == "lost", report
        assert "forgotten" in json.dumps(report), report
        assert c.json("show", "s")["state"] == "stopped"
        assert name not in [x["name"] for x in c.json("agents")["agents"]]
        res = spawn(c, "s", ["true"], "--agent", name, check=False)
        assert res.returncode == 3 and name in res.stderr
        # Forgetting an unknown name says so.
        res = c.cli("forget-agent", name)
        assert res.returncode == 3 and name in res.stderr
    finally:
        stop_daemon(a)
        stop_daemon(c)
    kill_leftovers(name)


def test_forgetting_a_live_agent_is_refused_without_force(tmp_path: Path) -> None:
    name = f"live-{os.getpid()}"
    c = coordinator(tmp_path)
    a = agent(tmp_path, c, name)
    try:
        registered(c, name)
        res = c.cli("forget-agent", name)
        assert res.returncode != 0 and "is up" in res.stderr and "force" in res.stderr
        assert [x for x in c.json("agents")["agents"] if x["name"] == name]
    finally:
        stop_daemon(a)
        stop_daemon(c)


def test_one_idempotency_key_sent_to_two_agents_starts_one_group(tmp_path: Path) -> None:
    tag = os.getpid()
    c = coordinator(tmp_path)
    a1 = agent(tmp_path, c, f"k1-{tag}")
    a2 = agent(tmp_path, c, f"k2-{tag}")
    try:
        registered(c, f"k1-{tag}")
        registered(c, f"k2-{tag}")
        first = spawn(c, "s", ["sleep", "300"], "--agent", f"k1-{tag}",
                      "--idempotency-key", "deploy-42")
        again = spawn(c, "s", ["sleep", "300"], "--agent", f"k1-{tag}",
                      "--idempotency-key", "deploy-42")
        assert gid(again) == gid(first)
        other = spawn(c, "s", ["sleep", "300"], "--agent", f"k2-{tag}",
                      "--idempotency-key", "deploy-42", check=False)
        assert other.returncode == 2 and "deploy-42" in other.stderr, other.stderr
        assert "same agent" in other.stderr
        assert [g["group_id"] for g in c.json("show", "s")["groups"]] == [gid(first)]
        assert c.json("stop", "s")["complete"]
    finally:
        stop_daemon(a1)
        stop_daemon(a2)
        stop_daemon(c)
    kill_leftovers(f"k1-{tag}", f"k2-{tag}")


def test_concurrent_retries_of_one_key_start_one_group(tmp_path: Path) -> None:
    name = f"conc-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        env = {"TETHER_COORDINATOR": d.address}
        procs = [cli_bg(env, "spawn", "--session", "s", "--idempotency-key", "same", "--",
                        "sleep", "300") for _ in range(4)]
        ids = set()
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            ids.add(out.strip().splitlines()[-1])
        assert len(ids) == 1
        assert len(d.json("show", "s")["groups"]) == 1
        assert d.json("stop", "s")["complete"]
    kill_leftovers(name)


@pytest.mark.parametrize("victim", ["agent/agent-{}.instance", "agent/agent-{}.lock",
                                    "agent/agent-{}.sqlite3", "coordinator.sqlite3",
                                    "coordinator.lock", "audit.jsonl"])
def test_a_fifo_where_a_state_file_belongs_is_named_not_waited_on(
        tmp_path: Path, victim: str) -> None:
    name = f"fifo-{os.getpid()}"
    state = tmp_path / "st"
    (state / "agent").mkdir(mode=0o700, parents=True)
    state.chmod(0o700)
    path = state / victim.format(name)
    os.mkfifo(path, 0o600)
    res = tether("serve", "--listen", "127.0.0.1:0", "--state-dir", str(state),
                 "--agent-name", name, timeout=60)
    assert res.returncode != 0
    assert str(path) in res.stderr and "FIFO" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert path.exists()  # nothing of the operator's was removed
