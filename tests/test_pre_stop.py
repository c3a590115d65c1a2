"""--pre-stop: a companion resource is closed before the group's stop signal, inside its
grace; a hook that runs long, fails, hangs, or leaves a daemon behind is dealt with and
its outcome is in the record."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.docker_engine import DockerEngine
from tests.plugins.processes import (
    Daemon,
    async_wait_until,
    free_port,
    make_authority,
    marked_alive,
    start_daemon,
    stop_daemon,
)
from tests.plugins.sshd import SSHServer
from tests.test_metrics import scrape, value
from tether.agent.authority import Authority
from tether.client.spec import build_spec
from tether.core.errors import InvalidSpec
from tether.core.model import ExitReason, GroupState, PreStopResult, StopPolicy
from tether.signallers.base import SignallerContext
from tether.signallers.local import LocalSignaller
from tether.signallers.registry import Signallers

#: Exits 0 on TERM, after noting whether the hook's file was there by then.
SERVER = ["sh", "-c", 'trap \'test -f "$MARK" && echo after-hook > "$OUT" || echo '
          'before-hook > "$OUT"; exit 0\' TERM; while :; do sleep 0.05; done']


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[Authority]:
    a, signallers = await make_authority(f"pre-{os.getpid()}-{tmp_path.name[-6:]}")
    try:
        yield a
    finally:
        await a.stop_all()
        await a.shutdown()
        await signallers.aclose()


def hook_alive(group_id: str) -> list[int]:
    return marked_alive(f"{group_id}.prestop")


async def test_the_hook_runs_before_the_stop_signal(auth: Authority, tmp_path: Path) -> None:
    mark, out = tmp_path / "tunnel-closed", tmp_path / "order"
    view = await auth.spawn(build_spec(
        SERVER, env={"MARK": str(mark), "OUT": str(out)}, grace=5,
        pre_stop=f"exec:sh -c 'echo closing; touch {mark}'", log=str(tmp_path / "log")))
    stopped = await auth.stop(view.group_id)
    rec = stopped.exit
    assert rec is not None and rec.reason is ExitReason.REQUESTED, rec
    assert out.read_text().strip() == "after-hook"
    assert rec.pre_stop is not None and rec.pre_stop.result is PreStopResult.OK
    assert rec.pre_stop.exit_code == 0
    assert "closing" in (tmp_path / "log").read_text(), "the hook's output joins the group's log"


async def test_a_hook_longer_than_the_grace_is_killed_at_the_grace(auth: Authority) -> None:
    view = await auth.spawn(build_spec(["sleep", "300"], grace=1,
                                       pre_stop="exec:sh -c 'sleep 300 & sleep 300'"))
    stopped = await auth.stop(view.group_id)
    rec = stopped.exit
    assert rec is not None and rec.pre_stop is not None
    assert rec.pre_stop.result is PreStopResult.TIMEOUT
    assert "the end of the grace" in rec.pre_stop.detail
    assert hook_alive(view.group_id) == [], "the hook's whole tree is gone"
    assert marked_alive(view.group_id) == [] and rec.clean


async def test_a_failing_hook_is_recorded_and_the_stop_goes_on(auth: Authority) -> None:
    view = await auth.spawn(build_spec(["sleep", "300"], pre_stop="exec:sh -c 'exit 3'"))
    rec = (await auth.stop(view.group_id)).exit
    assert rec is not None and rec.reason is ExitReason.REQUESTED and rec.clean
    assert rec.pre_stop is not None and rec.pre_stop.result is PreStopResult.FAILED
    assert rec.pre_stop.exit_code == 3 and "exit code 3" in rec.pre_stop.detail


async def test_a_hanging_hook_is_killed_at_its_own_timeout(auth: Authority) -> None:
    view = await auth.spawn(build_spec(
        ["sleep", "300"], grace=30,
        pre_stop="exec:sh -c 'trap \"\" TERM; sleep 300'", pre_stop_timeout=0.5))
    rec = (await auth.stop(view.group_id)).exit
    assert rec is not None and rec.pre_stop is not None
    assert rec.pre_stop.result is PreStopResult.TIMEOUT
    assert "its timeout" in rec.pre_stop.detail
    assert rec.reason is ExitReason.REQUESTED, "the group still had its grace after the hook"
    assert hook_alive(view.group_id) == []


async def test_a_daemon_the_hook_leaves_behind_is_killed(auth: Authority,
                                                         tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    view = await auth.spawn(build_spec(
        ["sleep", "300"],
        pre_stop=f"exec:sh -c 'setsid sh -c \"echo \\$\\$ > {pidfile}; exec sleep 300\" & "
                 f"while [ ! -s {pidfile} ]; do sleep 0.01; done'"))
    rec = (await auth.stop(view.group_id)).exit
    assert rec is not None and rec.pre_stop is not None
    assert rec.pre_stop.result is PreStopResult.OK
    assert rec.pre_stop.leftovers == 1 and "killed with its tree" in rec.pre_stop.detail
    daemon = int(pidfile.read_text())
    assert hook_alive(view.group_id) == []
    with pytest.raises(ProcessLookupError):
        os.kill(daemon, 0)


async def test_a_hook_on_a_group_that_is_already_gone_does_not_run(auth: Authority,
                                                                   tmp_path: Path) -> None:
    mark = tmp_path / "ran"
    view = await auth.spawn(build_spec(["true"], pre_stop=f"exec:touch {mark}"))
    await auth.find(view.group_id).ended.wait()
    rec = (await auth.stop(view.group_id)).exit
    assert rec is not None and rec.reason is ExitReason.NATURAL and rec.pre_stop is None
    # Its members gone but the exit not yet recorded: the stop says so and runs nothing.
    view = await auth.spawn(build_spec(["sleep", "300"], pre_stop=f"exec:touch {mark}"))
    g = auth.find(view.group_id)
    assert g.handle is not None
    await g.handle.kill()
    rec = (await auth.stop(view.group_id)).exit
    assert rec is not None
    if rec.pre_stop is not None:  # the watcher may have recorded the exit first
        assert rec.pre_stop.result is PreStopResult.SKIPPED
    assert not mark.exists()


async def test_a_hook_that_cannot_start_is_an_error_not_a_stuck_stop(auth: Authority) -> None:
    view = await auth.spawn(build_spec(["sleep", "300"], pre_stop="exec:no-such-hook-xyz"))
    rec = (await auth.stop(view.group_id)).exit
    assert rec is not None and rec.clean
    assert rec.pre_stop is not None and rec.pre_stop.result is PreStopResult.ERROR
    assert "no-such-hook-xyz" in rec.pre_stop.detail


async def test_a_stop_with_no_grace_left_runs_no_hook(auth: Authority) -> None:
    view = await auth.spawn(build_spec(["sleep", "300"], pre_stop="exec:true"))
    assert view.state is GroupState.RUNNING
    rec = (await auth.stop(view.group_id, StopPolicy(signal.SIGTERM, 0.0))).exit
    assert rec is not None and rec.pre_stop is not None
    assert rec.pre_stop.result is PreStopResult.TIMEOUT and "no time was left" in \
        rec.pre_stop.detail


async def test_a_keep_groups_hook_is_still_a_kill_tree(auth: Authority) -> None:
    """A hook must never outlive an agent that dies during it, even for a group that
    would: it lives under the tree's kill/ whatever the group's orphan policy."""
    view = await auth.spawn(build_spec(["sleep", "300"], orphan_policy="keep", grace=10,
                                       pre_stop="exec:sleep 300", pre_stop_timeout=1))
    stop = asyncio.ensure_future(auth.stop(view.group_id))
    await async_wait_until(lambda: hook_alive(view.group_id) != [], 10, "the hook to run")
    if view.containment.value == "cgroup":
        (pid,) = hook_alive(view.group_id)
        assert f"/kill/{view.group_id}.prestop" in Path(f"/proc/{pid}/cgroup").read_text()
        assert "/keep/" in Path(view.cgroup).as_posix()
    stopped = await stop
    assert stopped.exit is not None and stopped.exit.pre_stop is not None


@pytest.mark.parametrize(("text", "says"), [
    ("sh -c true", "is not understood"),
    ("http://x", "is not understood"),
    ("exec:", "has no command"),
    ("exec:'unclosed", "No closing quotation"),
    ("exec:a\0b", "NUL"),
])
def test_bad_hooks_are_refused(text: str, says: str) -> None:
    with pytest.raises(InvalidSpec, match=says):
        build_spec(["true"], pre_stop=text)
    with pytest.raises(InvalidSpec, match="needs a pre-stop hook"):
        build_spec(["true"], pre_stop_timeout=1)


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    mport = free_port()
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                               "--agent-name", f"pre-{tmp_path.name[-10:]}",
                               "--metrics-listen", f"127.0.0.1:{mport}"], tmp_path)
    try:
        yield d, f"127.0.0.1:{mport}"
    finally:
        stop_daemon(d)


def test_cli_pre_stop_in_stop_order_show_and_metrics(srv: tuple[Daemon, str],
                                                     tmp_path: Path) -> None:
    d, metrics = srv
    order = tmp_path / "order"
    d.cli("spawn", "--session", "dev", "--label", "tunnel", "--stop-order", "0",
          "--pre-stop", f"exec:sh -c 'echo tunnel-hook >> {order}'", "--", "sleep", "60",
          check=True)
    d.cli("spawn", "--session", "dev", "--label", "server", "--stop-order", "1",
          "--pre-stop", f"exec:sh -c 'echo server-hook >> {order}; exit 4'",
          "--pre-stop-timeout", "5", "--", "sleep", "60", check=True)
    report = d.json("stop", "dev")
    hooks = {g["label"]: g["pre_stop"] for g in report["groups"]}
    assert hooks["tunnel"]["result"] == "ok" and hooks["server"]["result"] == "failed"
    assert hooks["server"]["exit_code"] == 4
    assert order.read_text().split() == ["tunnel-hook", "server-hook"], "stop_order first"
    assert "pre-stop: failed" in d.cli("show", "dev", check=True).stdout
    text = scrape(metrics)
    assert value(text, "tether_pre_stop_hooks_total", result="ok") == 1
    assert value(text, "tether_pre_stop_hooks_total", result="failed") == 1
    file = tmp_path / "s.toml"
    file.write_text('session = "dev2"\n[[group]]\nargv = ["sleep", "60"]\n'
                    f'pre_stop = "exec:touch {tmp_path / "up-hook"}"\npre_stop_timeout = 2\n')
    d.cli("up", str(file), check=True)
    assert d.json("stop", "dev2")["groups"][0]["pre_stop"]["result"] == "ok"
    assert (tmp_path / "up-hook").exists()
    bad = d.cli("spawn", "--session", "dev3", "--pre-stop", "curl localhost", "--", "true")
    assert bad.returncode == 2 and "exec:COMMAND" in bad.stderr


async def test_a_hook_runs_on_a_remote_target_too(sshd: SSHServer, tmp_path: Path) -> None:
    """Pre-stop hooks are an exec on the group's target: over SSH they run on that host,
    as the SSH user, before the stop signal."""
    work = Path(tempfile.mkdtemp(prefix="prestop-", dir=sshd.tmp))
    os.chown(work, sshd.uid, -1)
    ctx = SignallerContext(f"pre-ssh-{os.getpid()}", "", sshd.options(ssh_containment="pgid"))
    signallers = Signallers(ctx)
    signallers.add(LocalSignaller(ctx))
    auth = Authority(ctx.agent_name, signallers)
    try:
        mark = work / "hook-ran"
        view = await auth.spawn(build_spec(
            ["sleep", "300"], target=f"ssh:{sshd.where}", env={"PATH": "/usr/bin:/bin"},
            pre_stop=f"exec:sh -c 'id -un > {mark}'"))
        assert view.state is GroupState.RUNNING, view.exit
        rec = (await auth.stop(view.group_id)).exit
        assert rec is not None and rec.clean
        # The hook ran to its end: with its exit code when the SSH side could read it (a
        # quick hook's status can arrive with its end), as "exited" when it could not.
        assert rec.pre_stop is not None and rec.pre_stop.result in (
            PreStopResult.OK, PreStopResult.EXITED), rec.pre_stop
        assert mark.read_text().strip() == sshd.user
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()


@pytest.mark.docker
async def test_a_hook_runs_inside_the_container(docker_engine: DockerEngine,
                                                docker_container: Any) -> None:
    """In a container the hook is a docker exec there, with its exit code."""
    ctx = SignallerContext(f"pre-dk-{os.getpid()}", "", {"docker_host": docker_engine.url})
    signallers = Signallers(ctx)
    signallers.add(LocalSignaller(ctx))
    auth = Authority(ctx.agent_name, signallers)
    try:
        view = await auth.spawn(build_spec(
            ["sleep", "300"], target=f"docker:{docker_container.name}", env={"PATH": "/bin"},
            pre_stop="exec:sh -c 'touch /tmp/hook-ran; exit 5'"))
        assert view.state is GroupState.RUNNING, view.exit
        rec = (await auth.stop(view.group_id)).exit
        assert rec is not None and rec.clean
        assert rec.pre_stop is not None and rec.pre_stop.result is PreStopResult.FAILED
        assert rec.pre_stop.exit_code == 5
        assert docker_container.exec_run(["test", "-f", "/tmp/hook-ran"]).exit_code == 0
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()
