"""Issue 12.9, 12.10, 12.11: file descriptors, a full disk, a corrupted state file.

Acknowledged means durable; a limit is reported as a limit (RESOURCE_EXHAUSTED, a clear
message), never as a crash of the program; a file that cannot be read is named with
what to do, and never turns a keep group into a kill.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.adversarial.helpers import (
    gid,
    kill_leftovers,
    metric,
    processes_of,
    running,
    serve,
    spawn,
    tether,
    trees,
    wait_for,
)
from tests.plugins.common import require, require_root
from tests.plugins.processes import free_port, marked_alive, pid_alive, stop_daemon
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc

pytestmark = pytest.mark.slow


def info(address: str) -> apb.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        return agrpc.AgentServiceStub(channel).Info(apb.InfoRequest(), timeout=10)


def test_the_fd_limit_is_raised_reported_and_refused_before_it_is_reached(
        tmp_path: Path) -> None:
    require(shutil.which("prlimit") is not None, "needs prlimit (util-linux)")
    name = f"fds-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        first = info(d.address)
        hard = int(subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True,
                                  text=True).stdout.strip() or 0)
        assert first.fd_limit >= min(hard, 1 << 20) > 0, "the soft limit is raised to the hard"
        assert first.groups_left > 100
        # An operator (or a container runtime) lowers the limit under the running agent.
        low = first.fds_open + 64 + 4 * 20
        subprocess.run(["prlimit", f"--pid={d.proc.pid}", f"--nofile={low}:{low}"], check=True)
        assert info(d.address).fd_limit == low
        started, refused = [], None
        for i in range(200):
            res = spawn(d, "fds", ["sleep", "300"], "--label", f"n{i}", check=False)
            if res.returncode != 0:
                refused = res
                break
            started.append(gid(res))
        assert refused is not None, "the agent never said it was at its limit"
        assert refused.returncode == 1, refused.stderr
        assert "file descriptors" in refused.stderr and str(low) in refused.stderr
        assert "Too many open files" not in refused.stderr and "immediate_crash" not in \
            refused.stderr
        assert started, "some groups fit before the limit"
        assert info(d.address).groups_left == 0
        # Everything that did start is whole, and stops cleanly.
        assert all(marked_alive(g) for g in started)
        report = d.json("stop", "fds")
        assert report["complete"] and all(g["survivors"] == 0 for g in report["groups"])
    kill_leftovers(name)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_root()
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_never_acknowledges_what_it_could_not_record(tmp_path: Path,
                                                                  small_disk: Path) -> None:
    name = f"full-{os.getpid()}"
    mport = free_port()
    d = serve(tmp_path, name, "--metrics-listen", f"127.0.0.1:{mport}", state=small_disk / "st")
    with running(d):
        kept = gid(spawn(d, "k", ["sh", "-c", "sleep 300 & sleep 300"], "--orphan-policy",
                         "keep"))
        kept_pids = sorted(wait_for(lambda: len(marked_alive(kept)) == 3 and marked_alive(kept),
                                    30, "the kept tree to fork"))
        filler = fill(small_disk)
        res = spawn(d, "k", ["sleep", "300"], "--label", "late", check=False)
        assert res.returncode != 0, "a spawn was acknowledged on a full disk"
        assert "state" in res.stderr and ("full" in res.stderr or "disk" in res.stderr), \
            res.stderr
        late = [p for p in processes_of(name) if p.pid not in kept_pids]
        assert late == [], "a spawn that could not be recorded left a process running"
        assert metric(f"127.0.0.1:{mport}", "tether_state_write_errors_total") >= 1
        # Space comes back: writes resume, nothing acknowledged was lost.
        filler.unlink()
        again = gid(spawn(d, "k", ["sleep", "300"], "--label", "again"))
        assert marked_alive(again)
        # SIGKILL: the guardian must leave the keep group alone; a restart re-adopts it.
        d.proc.kill()
        d.proc.wait()
        wait_for(lambda: not marked_alive(again), 30, "the guardian to end the kill group")
        assert sorted(marked_alive(kept)) == kept_pids
        d2 = serve(tmp_path, name, state=small_disk / "st", port=d.address.rsplit(":", 1)[1])
        with running(d2):
            shown = {g["group_id"]: g for g in d2.json("show", "k")["groups"]}
            assert shown[kept]["state"] == "running", shown[kept]
            # `again` was a kill group: the guardian ended it, so its record says lost.
            assert shown[again]["reason"] == "lost"
            stopped = d2.cli("stop", "k", "-o", "json")
            assert '"complete": true' in stopped.stdout, stopped.stderr
            assert not marked_alive(kept)
    kill_leftovers(name)


def test_a_corrupted_agent_state_file_is_named_and_leaves_nothing_behind(
        tmp_path: Path) -> None:
    require_root()
    name = f"corrupt-{os.getpid()}"
    state = tmp_path / "st"
    with running(serve(tmp_path, name, state=state)) as d:
        gid(spawn(d, "c", ["sleep", "300"]))
        assert d.json("stop", "c")["complete"]
    db = state / "agent" / f"agent-{name}.sqlite3"
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database\n" * 100)
    res = tether("serve", "--listen", "127.0.0.1:0", "--state-dir", str(state),
                 "--agent-name", name)
    assert res.returncode == 2, res.stderr
    assert str(db) in res.stderr and "move it aside" in res.stderr
    assert "Traceback" not in res.stderr
    assert trees(name) == [], "a refused start left its cgroup tree behind"
    kill_leftovers(name)


def test_the_guardian_never_kills_keep_groups_because_a_file_could_not_be_read(
        tmp_path: Path) -> None:
    name = f"guard-{os.getpid()}"
    state = tmp_path / "st"
    d = serve(tmp_path, name, state=state)
    try:
        keep = gid(spawn(d, "g", ["sh", "-c", "sleep 300 & sleep 300"], "--orphan-policy",
                         "keep"))
        kill = gid(spawn(d, "g", ["sleep", "300"]))
        keep_pids = sorted(marked_alive(keep))
        db = state / "agent" / f"agent-{name}.sqlite3"
        with open(db, "r+b") as f:  # corrupt it under the running agent
            f.write(b"garbage" * 200)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        wait_for(lambda: not marked_alive(kill), 30, "the guardian to end the kill group")
        assert sorted(marked_alive(keep)) == keep_pids
        assert all(pid_alive(p) for p in keep_pids)
    finally:
        stop_daemon(d)
        kill_leftovers(name)
