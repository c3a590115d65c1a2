"""How a group's leader is started under cgroup containment (signallers/launch.py).

The agent starts the leader through a gated ``/bin/sh`` (vfork instead of fork),
moves it into its cgroup, then lets it exec the program. What the user sees must
not change: the program runs with exactly its argv, environment, cwd and stdin,
inside its cgroup from its first instruction, and exec errors are classified as
a direct exec would classify them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import threading
from pathlib import Path
from types import MappingProxyType

import pytest

from tests.plugins.common import require_root
from tests.plugins.processes import async_wait_until, marked_alive
from tether.agent.authority import Authority
from tether.core.model import (
    AGENT_ENV,
    MARKER_ENV,
    Containment,
    FailureClass,
    GroupSpec,
    GroupState,
    Limits,
    new_group_id,
)
from tether.signallers.base import LaunchSpec
from tether.signallers.local import LAUNCH_THREADS, LocalSignaller

pytestmark = pytest.mark.parametrize("authority", ["cgroup"], indirect=True)


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.split("=", 1) for e in raw.decode().split("\0") if e)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


async def test_program_sees_exactly_its_argv_env_cwd_and_stdin(authority: Authority,
                                                                tmp_path: Path) -> None:
    view = await authority.spawn(GroupSpec(argv=("sleep", "1000"), cwd=str(tmp_path),
                                           env=MappingProxyType({"ONLY": "this"})))
    assert view.state is GroupState.RUNNING and view.containment is Containment.CGROUP
    pid = view.leader_pid
    await async_wait_until(lambda: cmdline(pid) == ["sleep", "1000"], 5,
                           "the leader to exec the program (argv[0] as given)")
    # No PWD or PATH from a shell in between: only the spec's variables and the markers.
    assert environ(pid) == {"ONLY": "this", MARKER_ENV: view.group_id, AGENT_ENV: authority.name}
    assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert Path(view.cgroup, "cgroup.procs").read_text().split() == [str(pid)]


async def test_first_instruction_already_runs_in_the_groups_cgroup(authority: Authority,
                                                                  tmp_path: Path) -> None:
    seen = tmp_path / "cgroup-at-start"
    view = await authority.spawn(GroupSpec(argv=(
        "/bin/sh", "-c", f"cat /proc/self/cgroup > {seen}.tmp; mv {seen}.tmp {seen}; exec sleep 1000")))
    await async_wait_until(seen.exists, 5, "the program to record its cgroup")
    unified = [line[3:] for line in seen.read_text().splitlines() if line.startswith("0::")]
    # The program's very first child already lived in the group's cgroup: nothing it
    # starts can land outside it.
    assert unified and view.cgroup.endswith(unified[0]), seen.read_text()


async def test_a_file_without_a_shebang_fails_as_exec_would(authority: Authority,
                                                           tmp_path: Path) -> None:
    script = tmp_path / "no-shebang"
    script.write_text("echo this must not run under a shell\n")
    script.chmod(stat.S_IRWXU)
    view = await authority.spawn(GroupSpec(argv=(str(script),)))
    assert view.state is GroupState.FAILED
    assert view.exit is not None and view.exit.failure is FailureClass.PERMISSION_DENIED
    assert "exec format error" in view.exit.message


async def test_a_missing_interpreter_is_command_not_found(authority: Authority,
                                                          tmp_path: Path) -> None:
    script = tmp_path / "bad-interpreter"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(stat.S_IRWXU)
    view = await authority.spawn(GroupSpec(argv=(str(script),)))
    assert view.state is GroupState.FAILED
    assert view.exit is not None and view.exit.failure is FailureClass.COMMAND_NOT_FOUND


async def test_path_search_uses_the_specs_path(authority: Authority, tmp_path: Path) -> None:
    prog = tmp_path / "tether-only-here"
    prog.write_text("#!/bin/sh\nexec /bin/sleep 1000\n")
    prog.chmod(stat.S_IRWXU)
    found = await authority.spawn(GroupSpec(argv=("tether-only-here",),
                                            env=MappingProxyType({"PATH": str(tmp_path)})))
    assert found.state is GroupState.RUNNING
    await async_wait_until(lambda: cmdline(found.leader_pid) == ["/bin/sleep", "1000"], 5,
                           "the script to run")
    # Without PATH in the spec, the search is Python's default (/bin:/usr/bin), as a direct
    # exec would do: a program only in the spec's PATH is not found.
    missing = await authority.spawn(GroupSpec(argv=("tether-only-here",)))
    assert missing.exit is not None and missing.exit.failure is FailureClass.COMMAND_NOT_FOUND
    # A relative path runs from the spec's cwd.
    rel = await authority.spawn(GroupSpec(argv=("./tether-only-here",), cwd=str(tmp_path)))
    assert rel.state is GroupState.RUNNING


async def test_a_start_cancelled_mid_launch_takes_its_launch_with_it(
        authority: Authority) -> None:
    """A start task cancelled while its launch waits (a shutdown cancelling stragglers):
    the launch used to go on and start a program that was nobody's group."""
    local = authority.signallers.get("local")
    assert isinstance(local, LocalSignaller)
    gate = threading.Event()
    busy = [local._pool.submit(gate.wait) for _ in range(LAUNCH_THREADS)]  # launches queue
    gid = ""
    try:
        spawning = asyncio.ensure_future(authority.spawn(GroupSpec(argv=("sleep", "300"))))
        await async_wait_until(lambda: local._launching == 1, 10, "the launch to be queued")
        (g,) = [g for g in authority.lc.table if g.state is GroupState.STARTING]
        gid = g.group_id
        assert g.start_task is not None
        g.start_task.cancel()
        await asyncio.gather(g.start_task, spawning, return_exceptions=True)
        gate.set()
        await async_wait_until(lambda: local._launching == 0, 10, "the launch to finish")
        assert marked_alive(gid) == [], "a cancelled start left its program running"
    finally:
        gate.set()
        for f in busy:
            f.result(10)
        for pid in marked_alive(gid) if gid else []:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("limited", [False, True])
async def test_a_spawn_cancelled_mid_launch_leaves_nothing_running(
        authority: Authority, limited: bool) -> None:
    """A probe cancelled at its group's start timeout can be mid-launch: the launch thread
    still starts the program, and it must not outlive the cancel (nor its cgroups)."""
    local = authority.signallers.get("local")
    assert isinstance(local, LocalSignaller)
    gid = new_group_id()
    spec = LaunchSpec(gid, ("sleep", "300"), {MARKER_ENV: gid, AGENT_ENV: authority.name},
                      limits=Limits(pids=10) if limited else Limits())
    task = asyncio.ensure_future(local.spawn(spec))
    await asyncio.sleep(0)  # it is now waiting for the launch thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await async_wait_until(lambda: local._launching == 0, 10, "the launch thread to finish")
    assert marked_alive(gid) == []
    assert local.tree is not None and not (local.tree.base / "kill" / gid).exists()
    if limited and local.limiter is not None and local.limiter.how("pids") == "v1":
        assert not (local.limiter.v1_base["pids"] / local.tree.name / gid).exists()
