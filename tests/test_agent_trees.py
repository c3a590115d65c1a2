"""Every hostile tree from the agent issue, stopped with a 1 s grace, ends with zero
live members and the right exit reason. Real processes, real signals; what is
alive is checked independently (the TETHER_GROUP marker), not from tether's report.

Each tree runs under cgroup and subreaper containment; trees that escape with
setsid *and* keep the marker are also run under pgid where pgid can hold them.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from tests.plugins.common import require_root
from tests.plugins.processes import async_wait_until, marked_alive
from tether.agent.authority import Authority
from tether.core.model import (
    ExitReason,
    GroupSpec,
    GroupState,
    GroupView,
    StopPolicy,
)

PY = sys.executable
GRACE = StopPolicy(grace=1.0)


def py(code: str) -> tuple[str, ...]:
    return (PY, "-c", textwrap.dedent(code))


def nested_shells(depth: int, inner: str) -> tuple[str, ...]:
    cmd = inner
    for _ in range(depth - 1):
        cmd = shlex.join(["sh", "-c", cmd + "; true"])
    return ("sh", "-c", cmd + "; true")


TREES: dict[str, tuple[tuple[str, ...], ExitReason, int]] = {
    # name: (argv, expected reason, minimum members before the stop)
    "cooperative": (("sleep", "100"), ExitReason.REQUESTED, 1),
    "ignores_term": (("sh", "-c", "trap '' TERM; sleep 100"), ExitReason.FORCED_KILL, 2),
    "shell_with_background_children": (
        ("sh", "-c", "sleep 100 & sleep 100 & wait"), ExitReason.REQUESTED, 3),
    "setsid_escapee": (("sh", "-c", "setsid sleep 100 & sleep 100"), ExitReason.REQUESTED, 3),
    "double_fork_daemon_leader_exits_0": (
        ("sh", "-c", "(setsid sh -c 'sleep 100; true' &); exit 0"), ExitReason.REQUESTED, 2),
    "own_pgroup_child_ignores_term": (
        ("sh", "-c", shlex.join(py("""
            import os, signal, time
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(100)
        """)) + " & wait"), ExitReason.FORCED_KILL, 2),
    "term_handler_child_stopped_itself": (
        ("sh", "-c", shlex.join(py("""
            import os, signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(100)
        """)) + " & wait"), ExitReason.REQUESTED, 2),
    "forks_on_every_term_some_setsid": (
        py("""
            import os, signal, subprocess, time
            def again(*_):
                subprocess.Popen(["sleep", "100"])
                subprocess.Popen(["setsid", "sleep", "100"])
                subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 100"], start_new_session=True)
            signal.signal(signal.SIGTERM, again)
            again()
            while True:
                time.sleep(0.01)
                again()
        """), ExitReason.FORCED_KILL, 3),
    "parent_never_reaps": (
        py("""
            import os, time
            for _ in range(3):
                if os.fork() == 0:
                    os._exit(0)
            time.sleep(100)
        """), ExitReason.REQUESTED, 1),
    "escapee_keeps_stdout_open_leader_exits": (
        ("sh", "-c", "setsid sh -c 'echo escapee; sleep 100; true' & exit 0"),
        ExitReason.REQUESTED, 1),
    "five_nested_shells": (nested_shells(5, "sleep 100"), ExitReason.REQUESTED, 5),
}

# Trees whose point is a process that catches or ignores SIGTERM: the test waits until
# that disposition is in place, or it would race the interpreter's start-up.
CATCHES_TERM = {"own_pgroup_child_ignores_term", "forks_on_every_term_some_setsid",
                "term_handler_child_stopped_itself"}


def term_disposition_set(pids: list[int]) -> bool:
    bit = 1 << (15 - 1)
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if "python" in fields.get("Name", "") and (
                int(fields.get("SigIgn", "0"), 16) & bit or int(fields.get("SigCgt", "0"), 16) & bit):
            return True
    return False


async def settle(tree: str, gid: str, min_members: int) -> None:
    await async_wait_until(lambda: len(marked_alive(gid)) >= min_members, 10,
                           f"{tree} to have {min_members} live members")
    if tree in CATCHES_TERM:
        await async_wait_until(lambda: term_disposition_set(marked_alive(gid)), 10,
                               f"{tree} to catch or ignore SIGTERM")
    if tree == "term_handler_child_stopped_itself":
        import psutil

        await async_wait_until(
            lambda: any(psutil.Process(p).status() == psutil.STATUS_STOPPED
                        for p in marked_alive(gid)), 10, "the child to SIGSTOP itself")


ESCAPES_PGID = {"setsid_escapee", "double_fork_daemon_leader_exits_0",
                "forks_on_every_term_some_setsid", "escapee_keeps_stdout_open_leader_exits"}


async def spawn(authority: Authority, argv: tuple[str, ...], tmp_path: Path,
                **kw: object) -> GroupView:
    spec = GroupSpec(argv=argv, stop=GRACE, log_path=str(tmp_path / "out.log"), **kw)  # type: ignore[arg-type]
    view = await authority.spawn(spec)
    assert view.state is GroupState.RUNNING, view.exit
    return view


@pytest.mark.parametrize("authority", ["cgroup", "subreaper"], indirect=True)
@pytest.mark.parametrize("tree", sorted(TREES))
async def test_tree_stops_with_nothing_left(authority: Authority, tree: str,
                                            tmp_path: Path) -> None:
    if authority.signallers.get("local").containment.value == "cgroup":
        require_root()
    argv, reason, min_members = TREES[tree]
    view = await spawn(authority, argv, tmp_path)
    gid = view.group_id
    await settle(tree, gid, min_members)

    stopped = await authority.stop(gid)

    assert stopped.state is GroupState.STOPPED
    assert stopped.exit is not None
    assert stopped.exit.reason is reason, stopped.exit
    assert stopped.exit.survivors == 0
    assert marked_alive(gid) == [], f"{tree}: members survived the stop"


@pytest.mark.parametrize("authority", ["pgid"], indirect=True)
@pytest.mark.parametrize("tree", sorted(set(TREES) - ESCAPES_PGID))
async def test_tree_stops_under_pgid(authority: Authority, tree: str, tmp_path: Path) -> None:
    argv, reason, min_members = TREES[tree]
    view = await spawn(authority, argv, tmp_path)
    await settle(tree, view.group_id, min_members)
    stopped = await authority.stop(view.group_id)
    assert stopped.exit is not None and stopped.exit.reason is reason, stopped.exit
    assert marked_alive(view.group_id) == []


async def test_leader_exit_with_live_descendants_leaves_group_running_detached(
        authority: Authority, tmp_path: Path) -> None:
    view = await spawn(authority, ("sh", "-c", "setsid sleep 100 & exit 0"), tmp_path)
    await async_wait_until(lambda: authority.get(view.group_id).detached, 10, "detached")
    current = authority.get(view.group_id)
    assert current.state is GroupState.RUNNING
    assert len(marked_alive(view.group_id)) == 1
    stopped = await authority.stop(view.group_id)
    assert stopped.exit is not None
    assert stopped.exit.reason is ExitReason.REQUESTED
    assert marked_alive(view.group_id) == []


async def test_natural_exit_is_detected_with_leader_code(authority: Authority,
                                                         tmp_path: Path) -> None:
    events = []

    async def collect() -> None:
        async for ev in authority.watch(lambda e: True):
            events.append(ev)
            if ev.kind == "exit":
                return

    watcher = asyncio.ensure_future(collect())
    await asyncio.sleep(0)
    view = await spawn(authority, ("sh", "-c", "sleep 0.1; exit 7"), tmp_path)
    await asyncio.wait_for(watcher, 10)
    final = authority.get(view.group_id)
    assert final.state is GroupState.EXITED
    assert final.exit is not None
    assert final.exit.reason is ExitReason.NATURAL
    assert final.exit.exit_code == 7
    assert [e.group.state for e in events][-1] is GroupState.EXITED


async def test_external_signal_is_recorded(authority: Authority, tmp_path: Path) -> None:
    import os
    import signal

    view = await spawn(authority, ("sleep", "100"), tmp_path)
    os.kill(view.leader_pid, signal.SIGKILL)  # nobody in tether sent this
    await asyncio.wait_for(authority.find(view.group_id).ended.wait(), 10)
    final = authority.get(view.group_id)
    assert final.exit is not None
    assert final.exit.reason is ExitReason.EXTERNAL_SIGNAL
    assert final.exit.signal == signal.SIGKILL
