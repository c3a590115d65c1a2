"""--user: a root agent starts groups as a real unprivileged user, keeps them in their cgroup
and stops them; an agent that is not root refuses any other user."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.plugins.common import require_root
from tests.plugins.processes import Daemon, make_authority, marked_alive, start_daemon, stop_daemon
from tether.agent import users
from tether.agent.authority import Authority
from tether.client.spec import build_spec
from tether.core.errors import InvalidSpec
from tether.core.model import ExitReason, FailureClass, GroupState

USER = "tether-test-user"


@pytest.fixture(scope="module")
def test_user() -> pwd.struct_passwd:
    """A real unprivileged account (created once if missing; never a login)."""
    require_root()
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture
async def auth(test_user: pwd.struct_passwd, tmp_path: Path) -> AsyncIterator[Authority]:
    a, signallers = await make_authority(f"user-{os.getpid()}-{tmp_path.name[-6:]}")
    try:
        yield a
    finally:
        await a.stop_all()
        await a.shutdown()
        await signallers.aclose()


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the test user may reach and write (pytest's tmp_path is under a
    directory only root may enter)."""
    d = Path(tempfile.mkdtemp(prefix="tether-user-test-", dir="/tmp"))
    d.chmod(0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def ended(auth: Authority, group_id: str):  # type: ignore[no-untyped-def]
    await auth.find(group_id).ended.wait()
    return auth.get(group_id)


async def test_group_runs_as_the_user_with_its_groups_home_and_log(
        auth: Authority, test_user: pwd.struct_passwd, shared: Path) -> None:
    log = shared / "out.log"
    spec = build_spec(["sh", "-c", 'id -u; id -g; id -G; echo "$HOME $USER $LOGNAME"; pwd; '
                                   'cat /proc/self/cgroup'],
                      user=USER, log=str(log), cwd=str(shared), session="u")
    view = await auth.spawn(spec)
    view = await ended(auth, view.group_id)
    assert view.exit is not None and view.exit.reason is ExitReason.NATURAL, view.exit
    uid, gid, groups, names, cwd, *cgroup = log.read_text().splitlines()
    assert int(uid) == test_user.pw_uid
    assert int(gid) == test_user.pw_gid
    assert set(map(int, groups.split())) == set(os.getgrouplist(USER, test_user.pw_gid))
    assert names == f"{test_user.pw_dir} {USER} {USER}"
    assert cwd == str(shared)
    assert os.stat(log).st_uid == test_user.pw_uid, "the log is the user's"
    assert os.stat(log).st_gid == test_user.pw_gid
    if view.containment.value == "cgroup":
        assert any(view.group_id in line for line in cgroup), "it ran inside its cgroup"
    assert USER in view.context.user and str(test_user.pw_uid) in view.context.user
    assert view.exit.context.user == view.context.user, "the record names the user"


async def test_user_and_group_given_with_env_overrides(auth: Authority, shared: Path) -> None:
    nogroup = grp.getgrnam("nogroup")
    log = shared / "out.log"
    spec = build_spec(["sh", "-c", 'id -g; echo "$HOME"'], user=f"{USER}:nogroup", log=str(log),
                      env={"HOME": "/srv/app"})
    view = await ended(auth, (await auth.spawn(spec)).group_id)
    assert view.exit is not None and view.exit.reason is ExitReason.NATURAL, view.exit
    gid, home = log.read_text().split()
    assert int(gid) == nogroup.gr_gid
    assert home == "/srv/app", "HOME given in the spec wins over the password database"


async def test_the_agent_keeps_the_cgroup_and_stops_the_users_tree(auth: Authority) -> None:
    # The user's program cannot leave its cgroup (the directories are root's), and
    # setsid does not help it: the stop still ends every member.
    spec = build_spec(["sh", "-c", "setsid sleep 300 & sleep 300"], user=USER, session="u")
    view = await auth.spawn(spec)
    assert view.state is GroupState.RUNNING
    members = marked_alive(view.group_id)
    assert members and all(os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam(USER).pw_uid
                           for pid in members)
    stopped = await auth.stop(view.group_id)
    assert stopped.exit is not None and stopped.exit.clean
    assert marked_alive(view.group_id) == []


async def test_the_user_joins_every_cgroup_of_its_limits_before_dropping_root(
        auth: Authority, shared: Path) -> None:
    log = shared / "out.log"
    view = await auth.spawn(build_spec(["sh", "-c", "id -un; cat /proc/self/cgroup"], user=USER,
                                       memory="64M", pids=30, log=str(log)))
    view = await ended(auth, view.group_id)
    assert view.exit is not None and view.exit.reason is ExitReason.NATURAL, view.exit
    name, *cgroups = log.read_text().splitlines()
    assert name == USER
    inside = [line for line in cgroups if line.endswith("/" + view.group_id)]
    # The v2 group, plus the v1 memory and pids cgroups where those are v1 here.
    assert len(inside) == 1 + view.context.limits.count(f"/{view.group_id}"), cgroups


async def test_what_the_user_may_not_touch_fails_naming_the_user(auth: Authority,
                                                                 shared: Path) -> None:
    private = shared / "private"
    private.mkdir(mode=0o700)
    view = await auth.spawn(build_spec(["true"], user=USER, log=str(private / "x.log")))
    assert view.exit is not None and view.exit.failure is FailureClass.PERMISSION_DENIED
    assert USER in view.exit.message and "x.log" in view.exit.message
    assert not (private / "x.log").exists(), "nothing was created as root either"
    view = await auth.spawn(build_spec(["true"], user=USER, cwd=str(private)))
    assert view.exit is not None and view.exit.failure is FailureClass.PERMISSION_DENIED
    assert USER in view.exit.message and str(private) in view.exit.message
    script = private / "tool"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o700)
    view = await auth.spawn(build_spec([str(script)], user=USER))
    assert view.exit is not None and view.exit.failure is FailureClass.PERMISSION_DENIED
    assert f"user {USER}" in view.exit.message


@pytest.mark.parametrize(("user", "says"), [
    ("no-such-user-xyz", "no user 'no-such-user-xyz'"),
    ("54321", "no user '54321'"),
    (f"{USER}:no-such-group", "no group 'no-such-group'"),
])
async def test_unknown_accounts_are_refused_before_anything_starts(
        auth: Authority, user: str, says: str) -> None:
    before = set(auth.live_ids())
    with pytest.raises(InvalidSpec, match=says):
        await auth.spawn(build_spec(["true"], user=user, session="u"))
    assert set(auth.live_ids()) == before
    assert auth.views() == [] or all(v.spec.user != user for v in auth.views())


@pytest.mark.parametrize("text", ["root\n", "a b", "../x", "a:b:c", "-rf", "x" * 40, "u$x"])
def test_user_names_that_are_not_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidSpec, match="--user"):
        build_spec(["true"], user=text)


def test_a_non_root_agent_refuses_other_users(test_user: pwd.struct_passwd) -> None:
    """The rule in the agent itself, with the privileges really dropped."""
    code = f"""
import os, sys
from tether.agent import users
from tether.core.errors import InvalidSpec
os.setgroups([]); os.setresgid({test_user.pw_gid}, {test_user.pw_gid}, {test_user.pw_gid})
os.setresuid({test_user.pw_uid}, {test_user.pw_uid}, {test_user.pw_uid})
out = {{}}
for name in ("root", "0", "nobody", "{USER}", "{test_user.pw_uid}"):
    try:
        out[name] = users.resolve(name).uid
    except InvalidSpec as exc:
        out[name] = str(exc)
print(__import__("json").dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for refused in ("root", "0", "nobody"):
        assert "not root" in out[refused] and USER in out[refused], out[refused]
    assert out[USER] == test_user.pw_uid
    assert out[str(test_user.pw_uid)] == test_user.pw_uid


@pytest.mark.parametrize("target", ["docker:web", "ssh:nobody@127.0.0.1:1"])
async def test_remote_targets_refuse_user(auth: Authority, target: str) -> None:
    with pytest.raises(InvalidSpec, match=f"--user is not supported for target '{target}'"):
        await auth.spawn(build_spec(["true"], user=USER, target=target, session="u"))


def test_resolve_reports_supplementary_groups(test_user: pwd.struct_passwd) -> None:
    run_as = users.resolve(USER)
    assert run_as.groups == tuple(os.getgrouplist(USER, test_user.pw_gid))
    assert run_as.home == test_user.pw_dir


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def srv(tmp_path: Path, test_user: pwd.struct_passwd) -> Iterator[Daemon]:
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                               "--agent-name", f"usr-{tmp_path.name[-10:]}"], tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


def test_cli_spawn_user_show_and_up(srv: Daemon, shared: Path, tmp_path: Path) -> None:
    log = shared / "id.log"
    res = srv.cli("spawn", "--session", "cu", "--label", "svc", "--user", USER, "--log",
                  str(log), "--", "sh", "-c", "id -un; sleep 60", check=True)
    assert res.stdout.strip().startswith("g-")
    show = srv.cli("show", "cu", check=True).stdout
    assert f"user: {USER} (uid" in show
    assert srv.json("show", "cu")["groups"][0]["context"]["user"].startswith(USER)
    stop = srv.json("stop", "cu")
    assert stop["groups"][0]["context"]["user"].startswith(USER)
    assert log.read_text().split()[0] == USER
    file = tmp_path / "s.toml"
    file.write_text(f'session = "cu2"\n[[group]]\nlabel = "a"\nargv = ["sleep", "60"]\n'
                    f'user = "{USER}"\n')
    srv.cli("up", str(file), check=True)
    assert srv.json("show", "cu2")["groups"][0]["context"]["user"].startswith(USER)
    bad = srv.cli("spawn", "--session", "cu3", "--user", "no-such-user-xyz", "--", "true")
    assert bad.returncode == 2 and "no user 'no-such-user-xyz'" in bad.stderr
    srv.cli("stop", "cu2", check=True)


def test_a_readopted_group_restarts_and_is_checked_as_its_user(
        test_user: pwd.struct_passwd, shared: Path, tmp_path: Path) -> None:
    """After an agent restart a re-adopted keep group keeps its user: its next run and its
    exec: liveness checks run as that user, never as the agent's root (review2)."""
    from tests.plugins.processes import wait_until

    runs, checks = shared / "runs", shared / "checks"
    name = f"readopt-{os.getpid()}"
    args = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"), "--agent-name",
            name]
    d = start_daemon("serve", args, tmp_path, name="first")
    second = None
    try:
        go = shared / "go"
        # Each run records its uid, then ends with 1 once told to (a file the test makes).
        script = (f"id -u >> {runs}; while [ ! -e {go} ]; do sleep 0.05; done; "
                  f"rm -f {go}; exit 1")
        d.cli("spawn", "--session", "priv", "--user", USER, "--orphan-policy", "keep",
              "--restart", "always", "--cwd", str(shared), "--live",
              f"exec:sh -c 'id -u >> {checks}'", "--live-interval", "0.2", "--",
              "sh", "-c", script, check=True)
        wait_until(lambda: runs.exists() and runs.read_text().count("\n") == 1, 30,
                   "the first run")
        stop_daemon(d)  # SIGTERM: keep groups outlive their agent
        second = start_daemon("serve", args, tmp_path, name="second")
        checks.unlink(missing_ok=True)
        go.touch()  # the re-adopted run ends; the policy starts another
        wait_until(lambda: runs.read_text().count("\n") == 2, 60, "a run after the restart")
        wait_until(lambda: checks.exists() and checks.read_text().count("\n") >= 1, 60,
                   "a liveness check of the new run")
        uids = {int(u) for u in runs.read_text().split() + checks.read_text().split()}
        assert uids == {test_user.pw_uid}, uids
        (g,) = second.json("show", "priv")["groups"]
        assert g["restarts"] == 1 and g["state"] == "running"
        assert second.json("stop", "priv")["complete"]
    finally:
        for daemon in (second, d):
            if daemon is not None:
                stop_daemon(daemon)
        for pid in marked_alive(agent=name):
            os.kill(pid, 9)
