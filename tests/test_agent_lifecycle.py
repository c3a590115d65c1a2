"""Start failures, stop semantics and safety of the agent's authority (real processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import psutil
import pytest

from tests.plugins.common import require_root
from tests.plugins.processes import (
    async_wait_until,
    catches,
    free_port,
    marked_alive,
    pid_alive,
)
from tether.agent.authority import Authority
from tether.core.errors import AdoptRefused, GroupNotFound, InvalidSpec
from tether.core.model import (
    ExitReason,
    FailureClass,
    GroupSpec,
    GroupState,
    Probe,
    StopPolicy,
    parse_signal,
)

GRACE = StopPolicy(grace=1.0)


async def failed(authority: Authority, spec: GroupSpec) -> FailureClass:
    view = await authority.spawn(spec)
    assert view.state is GroupState.FAILED, view
    assert view.exit is not None
    assert view.exit.reason is ExitReason.START_FAILED
    assert view.exit.failure is not None
    assert view.exit.message
    await async_wait_until(lambda: marked_alive(view.group_id) == [], 10,
                           "a failed start to leave nothing running")
    return view.exit.failure


# ------------------------------------------------------------------ start failures


async def test_command_not_found(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(argv=("no-such-command-xyz",)))
    assert view.exit is not None
    assert view.exit.failure is FailureClass.COMMAND_NOT_FOUND
    assert "no-such-command-xyz" in view.exit.message
    assert "PATH" in view.exit.message


async def test_permission_denied(authority: Authority, tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nsleep 100\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    if os.geteuid() == 0:
        # root may execute anything with an x bit; with none, exec is still refused.
        assert not os.access(script, os.X_OK)
    assert await failed(authority, GroupSpec(argv=(str(script),))) is \
        FailureClass.PERMISSION_DENIED


async def test_cwd_missing(authority: Authority, tmp_path: Path) -> None:
    missing = str(tmp_path / "gone")
    view = await authority.spawn(GroupSpec(argv=("sleep", "1"), cwd=missing))
    assert view.exit is not None
    assert view.exit.failure is FailureClass.CWD_MISSING
    assert missing in view.exit.message


async def test_port_in_use(authority: Authority) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        spec = GroupSpec(argv=("sleep", "100"), ready=Probe.parse(f"tcp:{port}"))
        view = await authority.spawn(spec)
    assert view.exit is not None
    assert view.exit.failure is FailureClass.PORT_IN_USE
    assert str(port) in view.exit.message
    assert view.leader_pid == 0, "nothing may be started when the port is taken"


async def test_immediate_crash(authority: Authority) -> None:
    spec = GroupSpec(argv=("sh", "-c", "exit 3"), ready=Probe.parse(f"tcp:{free_port()}"))
    view = await authority.spawn(spec)
    assert view.exit is not None
    assert view.exit.failure is FailureClass.IMMEDIATE_CRASH
    assert view.exit.exit_code == 3


async def test_readiness_timeout(authority: Authority) -> None:
    spec = GroupSpec(argv=("sleep", "100"), ready=Probe.parse(f"tcp:{free_port()}"),
                     start_timeout=0.5)
    assert await failed(authority, spec) is FailureClass.READINESS_TIMEOUT


async def test_readiness_failed_http_500(authority: Authority, tmp_path: Path) -> None:
    port = free_port()
    server = tmp_path / "srv.py"
    server.write_text(
        "import http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(500); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    spec = GroupSpec(argv=(sys.executable, str(server)),
                     ready=Probe.parse(f"http:http://127.0.0.1:{port}/health"), start_timeout=2)
    assert await failed(authority, spec) is FailureClass.READINESS_FAILED


async def test_readiness_http_and_log_and_exec_pass(authority: Authority, tmp_path: Path) -> None:
    port = free_port()
    http = GroupSpec(argv=(sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)),
                     cwd=str(tmp_path), ready=Probe.parse(f"http:http://127.0.0.1:{port}/"))
    log = GroupSpec(argv=("sh", "-c", "sleep 0.2; echo server is READY; sleep 100"),
                    log_path=str(tmp_path / "log"), ready=Probe.parse("log:is READY"))
    exe = GroupSpec(argv=("sleep", "100"), ready=Probe.parse("exec:true"))
    for spec in (http, log, exe):
        view = await authority.spawn(spec)
        assert view.state is GroupState.RUNNING, view.exit
        await authority.stop(view.group_id)


async def test_exec_probe_tree_killed_at_its_timeout(authority: Authority) -> None:
    spec = GroupSpec(argv=("sleep", "100"),
                     ready=Probe.parse("exec:sh -c 'sleep 100 & sleep 100'", timeout=0.3),
                     start_timeout=1.0)
    view = await authority.spawn(spec)
    assert view.exit is not None
    assert view.exit.failure is FailureClass.READINESS_TIMEOUT
    assert marked_alive(prefix=view.group_id) == [], "probe trees must be killed"


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: GroupSpec(argv=()), "argv"),
        (lambda: GroupSpec(argv=("",)), "argv"),
        (lambda: parse_signal("SIGNOPE"), "signal"),
        (lambda: Probe.parse("carrier-pigeon:1"), "ready"),
        (lambda: Probe.parse("tcp:99999"), "ready"),
        (lambda: GroupSpec(argv=("x",), env=MappingProxyType({"BIG": "x" * 200_000})), "env"),
        (lambda: GroupSpec(argv=("x",), cwd="relative/dir"), "cwd"),
        (lambda: GroupSpec(argv=("x",), ready=Probe.parse("log:ok")), "ready"),
        (lambda: StopPolicy(grace=-1), "grace"),
    ],
)
def test_invalid_spec_is_refused_with_the_field_named(make: object, field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        make()  # type: ignore[operator]
    assert info.value.field == field
    assert str(info.value)


async def test_unknown_group(authority: Authority) -> None:
    with pytest.raises(GroupNotFound, match="g-nope"):
        await authority.stop("g-nope")


# ------------------------------------------------------------------ stop semantics


async def test_stop_during_start_abandons_start_and_kills_probes(authority: Authority) -> None:
    spec = GroupSpec(argv=("sleep", "100"), stop=GRACE,
                     ready=Probe.parse("exec:sh -c 'sleep 100'", timeout=30), start_timeout=30)
    spawn = asyncio.ensure_future(authority.spawn(spec))
    await async_wait_until(lambda: authority.views(), 10, "the group to be registered")
    (group,) = authority.views()
    await async_wait_until(lambda: marked_alive(prefix=group.group_id + ".probe"), 10,
                           "the exec probe to run")
    assert authority.get(group.group_id).state is GroupState.STARTING
    stopped = await authority.stop(group.group_id)
    view = await asyncio.wait_for(spawn, 10)
    assert stopped.state is GroupState.STOPPED
    assert view.state is GroupState.STOPPED
    assert stopped.exit is not None
    assert stopped.exit.survivors == 0
    assert marked_alive(prefix=group.group_id) == [], "group and probe trees must be gone"


async def test_double_and_concurrent_stops_share_one_run(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(argv=("sh", "-c", "trap '' TERM; sleep 100"),
                                           stop=GRACE))
    await async_wait_until(lambda: len(marked_alive(view.group_id)) == 2, 10,
                           "the shell to trap TERM and start sleep")
    a, b = await asyncio.gather(authority.stop(view.group_id), authority.stop(view.group_id))
    assert a.exit is b.exit, "concurrent stops must share one run and one record"
    again = await authority.stop(view.group_id)
    assert again.exit is a.exit
    assert a.exit is not None
    assert a.exit.reason is ExitReason.FORCED_KILL


async def test_stop_durations_in_a_batch_are_each_groups_own(authority: Authority) -> None:
    """One batch, one grace clock: the group that ignores TERM is killed at the grace and its
    record says so; the cooperative one's record says it ended well before the grace, not
    when the batch finished."""
    stubborn = await authority.spawn(GroupSpec(argv=("sh", "-c", "trap '' TERM; sleep 100"),
                                               stop=GRACE))
    polite = await authority.spawn(GroupSpec(argv=("sleep", "100"), stop=GRACE))
    await async_wait_until(lambda: len(marked_alive(stubborn.group_id)) == 2, 10,
                           "the shell to trap TERM and start sleep")
    views = {v.group_id: v for v in await authority.stop_many(
        [(stubborn.group_id, None), (polite.group_id, None)])}
    hard, soft = views[stubborn.group_id].exit, views[polite.group_id].exit
    assert hard is not None and soft is not None
    assert hard.reason is ExitReason.FORCED_KILL and soft.reason is ExitReason.REQUESTED
    assert GRACE.grace <= hard.stop_duration < GRACE.grace + 5
    assert 0 <= soft.stop_duration < GRACE.grace
    assert marked_alive(stubborn.group_id) == [] and marked_alive(polite.group_id) == []


async def test_stop_racing_a_natural_exit(authority: Authority) -> None:
    for delay in ("0", "0.001", "0.005", "0.02"):
        view = await authority.spawn(GroupSpec(argv=("sleep", delay), stop=GRACE))
        stopped = await authority.stop(view.group_id)
        assert stopped.state.ended
        assert stopped.exit is not None
        assert stopped.exit.survivors == 0
        assert stopped.exit.reason in (ExitReason.NATURAL, ExitReason.REQUESTED)


async def test_signal_reaches_every_member_and_ended_group_is_already_gone(
        authority: Authority, tmp_path: Path) -> None:
    out = tmp_path / "got"
    script = f"trap 'echo $$ >> {out}' USR1; while :; do sleep 0.05; done"
    view = await authority.spawn(GroupSpec(
        argv=("sh", "-c", f"sh -c \"{script}\" & setsid sh -c \"{script}\" & {script}"),
        stop=GRACE))
    await async_wait_until(
        lambda: sum(catches(p, signal.SIGUSR1) for p in marked_alive(view.group_id)) == 3, 10,
        "three shells to install their USR1 trap")
    result = await authority.signal(view.group_id, signal.SIGUSR1)
    assert result.members_signalled >= 3
    assert not result.already_gone
    await async_wait_until(lambda: out.exists() and len(out.read_text().split()) == 3, 10,
                           "three shells to trap USR1")
    await authority.stop(view.group_id)
    again = await authority.signal(view.group_id, signal.SIGUSR1)
    assert again.already_gone
    assert again.members_signalled == 0


async def test_ended_groups_reused_pid_is_never_signalled(authority: Authority) -> None:
    require_root()  # to steer the next PID through /proc/sys/kernel/ns_last_pid
    view = await authority.spawn(GroupSpec(argv=("sleep", "100"), stop=GRACE))
    pid = view.leader_pid
    await authority.stop(view.group_id)
    await async_wait_until(lambda: not psutil.pid_exists(pid), 10, "the pid to be free")
    unrelated = None
    for _ in range(50):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        p = subprocess.Popen(["sleep", "100"], start_new_session=True)  # noqa: ASYNC220
        if p.pid == pid:
            unrelated = p
            break
        p.kill()
        p.wait()
    if unrelated is None:
        pytest.fail(f"could not get pid {pid} reused (other processes kept forking)")
    try:
        res = await authority.signal(view.group_id, signal.SIGKILL)
        again = await authority.stop(view.group_id)
        assert res.already_gone
        assert again.state is GroupState.STOPPED
        assert pid_alive(unrelated.pid), "an unrelated process with a reused pid was signalled"
    finally:
        unrelated.kill()
        unrelated.wait()


# ------------------------------------------------------------------ adopt


async def test_adopt_checks_start_time_and_then_owns_the_tree(authority: Authority) -> None:
    p = subprocess.Popen(  # noqa: ASYNC220
        ["sh", "-c", "sleep 100 & sleep 100 & wait"], start_new_session=True)
    try:
        await async_wait_until(lambda: len(psutil.Process(p.pid).children()) == 2, 10, "tree")
        ctime = psutil.Process(p.pid).create_time()
        with pytest.raises(AdoptRefused, match="reused"):
            await authority.adopt(p.pid, ctime - 100, GroupSpec(argv=("adopted",), stop=GRACE))
        with pytest.raises(AdoptRefused, match="no such process"):
            await authority.adopt(2**22 + 1, None, GroupSpec(argv=("adopted",)))
        children = [c.pid for c in psutil.Process(p.pid).children()]
        view = await authority.adopt(p.pid, ctime, GroupSpec(argv=("adopted",), stop=GRACE))
        assert view.state is GroupState.RUNNING
        stopped = await authority.stop(view.group_id)
        assert stopped.exit is not None
        assert stopped.exit.survivors == 0
        assert not any(pid_alive(c) for c in [p.pid, *children])
    finally:
        p.kill()
        p.wait()
