"""--memory, --cpus, --pids: real cgroup limits, a real OOM kill, and what is left afterwards.

This host binds memory, cpu and pids to cgroup v1 hierarchies beside the v2 tree
(a "hybrid" host), so the limits land in per-group v1 cgroups; where the host
delegates the v2 controllers the same tests exercise memory.max and friends.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.plugins.common import require_root
from tests.plugins.processes import (
    Daemon,
    free_port,
    make_authority,
    marked_alive,
    start_daemon,
    stop_daemon,
    wait_until,
)
from tests.test_metrics import scrape, value
from tests.test_supervise import until
from tether.agent.authority import Authority
from tether.client.spec import build_spec
from tether.core.errors import InvalidSpec
from tether.core.model import ExitReason, FailureClass, GroupState, GroupView
from tether.signallers.limits import Limiter
from tether.signallers.local import LocalSignaller

#: Appends 10 MB chunks until the kernel says no.
HOG = [sys.executable, "-c", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 << 20))"]


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[Authority]:
    require_root()
    a, signallers = await make_authority(f"lim-{os.getpid()}-{tmp_path.name[-6:]}")
    local = signallers.get("local")
    assert isinstance(local, LocalSignaller)
    if local.limiter is None:
        pytest.fail("no cgroup v2 tree for the agent: limits cannot be tested")
    try:
        yield a
    finally:
        await a.stop_all()
        await a.shutdown()
        await signallers.aclose()


def limiter(auth: Authority) -> Limiter:
    local = auth.signallers.get("local")
    assert isinstance(local, LocalSignaller) and local.limiter is not None
    return local.limiter


def limit_file(auth: Authority, view: GroupView, controller: str) -> Path:
    """The kernel file holding a group's limit for ``controller`` (v2 or v1)."""
    lim = limiter(auth)
    if lim.how(controller) == "v2":
        names = {"memory": "memory.max", "cpu": "cpu.max", "pids": "pids.max"}
        return Path(view.cgroup) / names[controller]
    names = {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us", "pids": "pids.max"}
    return lim.v1_base[controller] / lim.tree.name / view.group_id / names[controller]


async def ended(auth: Authority, group_id: str) -> GroupView:
    await auth.find(group_id).ended.wait()
    return auth.get(group_id)


async def test_an_allocation_loop_is_oom_killed_at_its_memory_limit(auth: Authority) -> None:
    view = await auth.spawn(build_spec(HOG, memory="64M", session="m"))
    assert view.state is GroupState.RUNNING, view.exit
    file = limit_file(auth, view, "memory")
    assert int(file.read_text()) == 64 << 20
    view = await ended(auth, view.group_id)
    rec = view.exit
    assert rec is not None
    assert rec.reason is ExitReason.OOM_KILLED, rec
    assert rec.signal == 9 and rec.oom_kills >= 1
    assert "memory 64M" in rec.context.limits and "OOM" in rec.detail
    assert not file.parent.exists(), "its cgroups are removed once it ended"


async def test_an_oom_killed_run_is_restarted_under_on_failure(auth: Authority,
                                                               tmp_path: Path) -> None:
    """The OOM killer ending a run at its --memory limit is a failure, not a clean end."""
    flag = tmp_path / "second-run"
    program = ("import os, sys, time\n"
               "if os.path.exists(sys.argv[1]):\n    time.sleep(300)\n"
               "open(sys.argv[1], 'w').close()\n" + HOG[2])
    view = await auth.spawn(build_spec([sys.executable, "-c", program, str(flag)],
                                       memory="64M", restart="on-failure", session="m"))
    assert view.state is GroupState.RUNNING, view.exit
    again = await until(auth, view.group_id,
                        lambda v: v.restarts >= 1 and v.state is GroupState.RUNNING)
    assert again.runs[0].exit.reason is ExitReason.OOM_KILLED, again.runs[0].exit
    assert flag.exists()


async def test_pids_and_cpus_are_set_and_enforced(auth: Authority, tmp_path: Path) -> None:
    log = tmp_path / "threads.log"
    counter = [sys.executable, "-c",
               "import threading, time\nn = 0\ntry:\n    for _ in range(200):\n"
               "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
               "        n += 1\nexcept RuntimeError:\n    pass\nprint(n, flush=True)\n"
               "time.sleep(300)"]
    view = await auth.spawn(build_spec(counter, pids=20, cpus=0.5, log=str(log), session="p",
                                       ready="log:^[0-9]+$"))
    assert view.state is GroupState.RUNNING, view.exit
    started = int(log.read_text().split()[0])
    assert started < 20, "threads count against pids.max: the 20th task was refused"
    assert int(limit_file(auth, view, "pids").read_text()) == 20
    cpu = limit_file(auth, view, "cpu").read_text().split()
    assert int(cpu[0]) == 50000  # cpu.cfs_quota_us, or cpu.max "50000 100000"
    cgroups = Path(f"/proc/{view.leader_pid}/cgroup").read_text()
    assert cgroups.count(view.group_id) >= (1 if limiter(auth).how("cpu") == "v2" else 3), \
        "the program runs in every cgroup that holds one of its limits"
    assert "pids 20" in view.context.limits and "cpus 0.5" in view.context.limits
    stopped = await auth.stop(view.group_id)
    assert stopped.exit is not None and stopped.exit.clean


async def test_a_failed_start_leaves_no_cgroup_behind(auth: Authority) -> None:
    lim = limiter(auth)
    view = await auth.spawn(build_spec(["no-such-command-xyz"], memory="64M", pids=10))
    assert view.exit is not None and view.exit.failure is FailureClass.COMMAND_NOT_FOUND
    for c in ("memory", "pids"):
        if lim.how(c) == "v1":
            assert not (lim.v1_base[c] / lim.tree.name / view.group_id).exists()
    assert not any(d.name == view.group_id for d in lim.tree.group_dirs())


def test_a_host_that_does_not_delegate_a_controller_is_named(auth: Authority) -> None:
    lim = limiter(auth)
    offered = (lim.tree.base.parent / "cgroup.controllers").read_text().split()
    bare = Limiter(lim.tree, lim.mount, v1={})  # as if no v1 hierarchy were mounted
    if "memory" in offered:
        assert bare.how("memory") in ("v2", None)
        return
    assert bare.how("memory") is None
    with pytest.raises(InvalidSpec) as caught:
        bare.check(build_spec(["true"], memory="64M").limits, "local")
    message = str(caught.value)
    assert "--memory is not supported for target 'local'" in message
    assert f"cgroup v2 at {lim.mount} offers {' '.join(sorted(offered)) or 'none'}" in message
    assert "no cgroup v1 memory hierarchy is mounted" in message
    assert "Delegate" in message and "drop --memory" in message


async def test_a_v2_controller_the_kernel_will_not_enable_falls_back_to_v1(
        auth: Authority) -> None:
    """Try v2 first, as on a host that offers the controller; when the kernel refuses the
    subtree_control write, the limit goes to v1 for this spawn and every later one."""
    lim = limiter(auth)
    offered = (lim.tree.base.parent / "cgroup.controllers").read_text().split()
    if "pids" in offered:
        pytest.skip("this host's v2 tree offers pids: the refusal cannot be provoked")
    local = auth.signallers.get("local")
    assert isinstance(local, LocalSignaller)
    local.limiter = Limiter(lim.tree, lim.mount, v2={"pids"})
    try:
        assert local.limiter.how("pids") == "v2"
        view = await auth.spawn(build_spec(["sleep", "300"], pids=7))
        assert view.state is GroupState.RUNNING, view.exit
        assert local.limiter.how("pids") == "v1"
        assert "cgroup v1 pids.max" in view.context.limits
        assert int(limit_file(auth, view, "pids").read_text()) == 7
        refused = Limiter(lim.tree, lim.mount, v1={}, v2={"pids"})
        assert refused.how("pids") == "v2"
        with pytest.raises(InvalidSpec, match=r"enabling it failed: writing \+pids to"):
            refused.prepare("g-00000000", Path(view.cgroup), view.spec.limits)
        await auth.stop(view.group_id)
    finally:
        local.limiter = lim


async def test_without_cgroup_containment_limits_are_refused() -> None:
    auth, signallers = await make_authority(f"lim-sub-{os.getpid()}", "subreaper")
    try:
        with pytest.raises(InvalidSpec, match=r"needs cgroup containment.*subreaper"):
            await auth.spawn(build_spec(["true"], memory="64M"))
        assert auth.views() == []
    finally:
        await auth.shutdown()
        await signallers.aclose()


@pytest.mark.parametrize("target", ["docker:web", "ssh:nobody@127.0.0.1:1"])
async def test_remote_targets_refuse_limits(auth: Authority, target: str) -> None:
    with pytest.raises(InvalidSpec, match=f"--memory/--pids is not supported for target "
                                          f"'{target}'"):
        await auth.spawn(build_spec(["true"], memory="1G", pids=5, target=target))


@pytest.mark.parametrize(("kw", "says"), [
    ({"memory": "-1"}, "memory '-1' is not understood"),
    ({"memory": "1E"}, "memory '1E' is not understood"),
    ({"memory": "0"}, "out of range"),
    ({"memory": "12"}, "a unit is missing"),
    ({"memory": "2048T"}, "more than the 1P"),
    ({"memory": -5}, "out of range"),
    ({"cpus": 0}, "cpus 0 is out of range"),
    ({"cpus": math.nan}, "cpus nan is out of range"),
    ({"cpus": math.inf}, "out of range"),
    ({"cpus": -1.5}, "out of range"),
    ({"pids": 0}, "pids 0 is out of range"),
    ({"pids": -5}, "out of range"),
    ({"pids": True}, "out of range"),
])
def test_bad_limits_are_refused(kw: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidSpec, match=says):
        build_spec(["true"], **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    require_root()
    mport = free_port()
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                               "--agent-name", f"lim-{tmp_path.name[-10:]}",
                               "--metrics-listen", f"127.0.0.1:{mport}"], tmp_path)
    try:
        yield d, f"127.0.0.1:{mport}"
    finally:
        stop_daemon(d)


def watch_until_exit(d: Daemon, session: str) -> dict[str, object]:
    """The session's exit event, as `tether watch -o json` streams it (no polling)."""
    env = {**os.environ, "TETHER_COORDINATOR": d.address}
    with subprocess.Popen([sys.executable, "-m", "tether.coordinator.cli", "watch", session,
                           "-o", "json", "--timeout", "60"], stdout=subprocess.PIPE, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                event = json.loads(line)
                if event["kind"] == "exit" or (event["kind"] == "initial"
                                               and event.get("reason")):
                    return dict(event)
        finally:
            proc.kill()
    raise AssertionError("the watch ended without an exit event")


def test_cli_memory_limit_oom_kill_in_show_stop_and_metrics(srv: tuple[Daemon, str],
                                                            tmp_path: Path) -> None:
    d, metrics = srv
    assert value(scrape(metrics), "tether_oom_kills_total") == 0
    d.cli("spawn", "--session", "oom", "--label", "hog", "--memory", "64M", "--", *HOG,
          check=True)
    event = watch_until_exit(d, "oom")
    assert event["reason"] == "oom_killed" and event["oom_kills"] >= 1  # type: ignore[operator]
    show = d.cli("show", "oom", check=True).stdout
    assert "oom_killed" in show and "oom kills:" in show and "limits: memory 64M" in show
    report = d.json("stop", "oom")
    group = report["groups"][0]
    assert group["reason"] == "oom_killed" and group["oom_kills"] >= 1
    assert "memory 64M" in group["context"]["limits"]
    assert value(scrape(metrics), "tether_oom_kills_total") >= 1
    file = tmp_path / "s.toml"
    file.write_text('session = "lim2"\n[[group]]\nargv = ["sleep", "60"]\nmemory = "32M"\n'
                    'cpus = 0.25\npids = 50\n')
    d.cli("up", str(file), check=True)
    assert "memory 32M, cpus 0.25, pids 50" in d.json("show", "lim2")["groups"][0][
        "context"]["limits"]
    d.cli("stop", "lim2", check=True)
    for args, says in ((["--memory", "-1"], "not understood"), (["--cpus", "nan"], "cpus nan"),
                       (["--pids", "0"], "pids 0")):
        res = d.cli("spawn", "--session", "bad", *args, "--", "true")
        assert res.returncode == 2 and says in res.stderr, res.stderr


def test_a_killed_agents_guardian_removes_its_v1_cgroups(tmp_path: Path) -> None:
    require_root()
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                               "--agent-name", f"limk-{tmp_path.name[-10:]}"], tmp_path)
    try:
        gid = d.cli("spawn", "--session", "k", "--memory", "64M", "--pids", "50", "--",
                    "sleep", "300", check=True).stdout.strip()
        limits = d.json("show", "k")["groups"][0]["context"]["limits"]
        dirs = [Path(part.split(" in ", 1)[1].split(";")[0].rstrip(")"))
                for part in limits.split(", ") if " in /" in part]
        assert all(p.is_dir() and p.name == gid for p in dirs)
        d.proc.kill()  # SIGKILL: no shutdown; the guardian keeps the promise
        d.proc.wait()
        wait_until(lambda: marked_alive(gid) == [] and not any(p.exists() for p in dirs), 30,
                   "the guardian to end the group and remove its v1 cgroups")
    finally:
        stop_daemon(d)
