"""`tether up FILE`: a session file starts every group it lists, in one command, against
a real `tether serve`; a bad file starts nothing and says where the mistake is."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.plugins.processes import Daemon, marked_alive
from tests.test_cli import GROUP_ID, snapshot, srv  # noqa: F401  (srv is a fixture)


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "session.toml"
    f.write_text(text)
    return str(f)


def test_up_starts_every_group_and_replica(srv: Daemon, tmp_path: Path) -> None:  # noqa: F811
    path = write(tmp_path, """
session = "dev"
window = "main"

[[group]]
label = "worker"
argv = ["sleep", "300"]
env = { MODE = "batch" }
replicas = 3

[[group]]
label = "web"
argv = ["sh", "-c", "exec sleep 301"]
cwd = "/tmp"
grace = 2
stop_order = 1
""")
    res = srv.cli("up", path)
    assert res.returncode == 0, res.stderr
    lines = [line.split() for line in res.stdout.strip().splitlines()[1:]]
    assert len(lines) == 4, res.stdout
    assert all(GROUP_ID.match(row[0]) for row in lines)
    assert sorted(row[1] for row in lines) == ["web", "worker", "worker", "worker"]
    session = srv.json("show", "dev")
    assert session["window"] == "main"
    groups = {g["group_id"]: g for g in session["groups"]}
    assert set(groups) == {row[0] for row in lines}
    assert all(g["state"] == "running" for g in groups.values())
    for gid, g in groups.items():
        alive = marked_alive(gid)
        assert len(alive) == 1, (gid, alive)
        env = psutil.Process(alive[0]).environ()
        if g["label"] == "worker":
            assert env["MODE"] == "batch"
        else:
            assert g["stop_order"] == 1 and psutil.Process(alive[0]).cwd() == "/tmp"
    stopped = srv.cli("stop", "dev")
    assert stopped.returncode == 0, stopped.stderr
    assert all(marked_alive(gid) == [] for gid in groups)


@pytest.mark.parametrize(("text", "names"), [
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\ngrce = 5\n', ["group 1", "grce"]),
    ('session = "s"\n[[group]]\nlabel = "web"\nargv = "sleep 1"\n', ["group 1 (web)", "argv"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\n[[group]]\nargv = []\n',
     ["group 2", "argv"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\nenv = { PORT = 8000 }\n',
     ["env.PORT", "string"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\nreplicas = 0\n', ["replicas"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\ngrace = -1\n', ["grace"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\n[[group]]\nlabel = "w"\n'
     'argv = ["sleep", "1"]\nstop_signal = "TREM"\n', ["group 2 (w)", "TREM"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\nready = "tcp:http"\n',
     ["group 1", "tcp:http"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\ncwd = "relative/dir"\n',
     ["group 1", "absolute"]),
    ('session = "s"\n[[group]]\nlabel = "w"\nargv = ["sleep", "1"]\nrestart = "always"\n'
     'restart_max = 0\n', ["group 1 (w)", "restart max 0"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\non_unhealthy = "restart"\n',
     ["group 1", "needs a liveness probe"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\nlive = "tcp:1"\nlive_failures = 0\n',
     ["group 1", "live failures"]),
    ('session = "s"\n[[group]]\nargv = ["sleep", "1"]\nrestart = "sometimes"\n',
     ["group 1", "sometimes"]),
    ('[[group]]\nargv = ["sleep", "1"]\n', ["session"]),
    ('session = "s"\n', ["no groups"]),
    ('session = "s"\n[[group]\n', ["TOML"]),
])
def test_a_bad_file_starts_nothing_and_names_the_mistake(srv: Daemon, tmp_path: Path,  # noqa: F811
                                                          text: str, names: list[str]) -> None:
    path = write(tmp_path, text)
    before = snapshot(srv)
    res = srv.cli("up", path)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert path in res.stderr
    for name in names:
        assert name in res.stderr, (name, res.stderr)
    assert "nothing was started" in res.stderr
    assert snapshot(srv) == before


def test_a_missing_file_is_named(srv: Daemon, tmp_path: Path) -> None:  # noqa: F811
    res = srv.cli("up", str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert "nope.toml" in res.stderr and "not found" in res.stderr


def test_start_failures_are_reported_and_the_rest_runs(srv: Daemon, tmp_path: Path  # noqa: F811
                                                       ) -> None:
    path = write(tmp_path, """
session = "mixed"
[[group]]
label = "ok"
argv = ["sleep", "300"]
[[group]]
label = "typo"
argv = ["no-such-program-tether"]
""")
    res = srv.cli("up", path, "--session", "override")
    assert res.returncode == 1, res.stderr
    assert "no-such-program-tether" in res.stderr and "typo" in res.stderr
    groups = {g["label"]: g for g in srv.json("show", "override")["groups"]}
    assert groups["ok"]["state"] == "running"
    assert groups["typo"]["state"] == "failed"
    assert len(marked_alive(groups["ok"]["group_id"])) == 1


def test_up_twice_refuses_to_duplicate_a_live_session_unless_added(srv: Daemon,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    path = write(tmp_path, 'session = "twice"\n[[group]]\nlabel = "a"\nargv = ["sleep", "300"]\n')
    assert srv.cli("up", path).returncode == 0
    again = srv.cli("up", path)
    assert again.returncode == 2
    assert "twice" in again.stderr and "--add" in again.stderr
    assert len(srv.json("show", "twice")["groups"]) == 1
    added = srv.cli("up", path, "--add", "-o", "json")
    assert added.returncode == 0, added.stderr
    assert len(srv.json("show", "twice")["groups"]) == 2
    assert srv.cli("stop", "twice").returncode == 0
    # A stopped session can be brought up again without --add.
    assert srv.cli("up", path).returncode == 0
    assert sum(g["state"] == "running" for g in srv.json("show", "twice")["groups"]) == 1


def test_parallel_must_be_positive(srv: Daemon, tmp_path: Path) -> None:  # noqa: F811
    path = write(tmp_path, 'session = "p"\n[[group]]\nargv = ["sleep", "1"]\n')
    res = srv.cli("up", path, "--parallel", "0")
    assert res.returncode == 2 and "--parallel" in res.stderr


def test_supervision_keys_reach_the_group(srv: Daemon, tmp_path: Path) -> None:  # noqa: F811
    path = write(tmp_path, """
session = "sup"

[[group]]
label = "web"
argv = ["sleep", "300"]
live = "exec:true"
live_interval = 5
live_timeout = 2
live_failures = 4
on_unhealthy = "restart"
restart = "on-failure"
restart_max = 3
restart_window = 30
""")
    assert srv.cli("up", path).returncode == 0
    from tether.client import Client

    with Client(srv.address) as c:
        (g,) = c.session("sup").groups
    spec = g.view.spec
    assert spec.liveness is not None and str(spec.liveness.probe) == "exec:true"
    assert (spec.liveness.interval, spec.liveness.probe.timeout, spec.liveness.failures,
            spec.liveness.on_unhealthy.value) == (5, 2, 4, "restart")
    assert (spec.restart.mode.value, spec.restart.limit, spec.restart.window) == (
        "on-failure", 3, 30)
    assert srv.cli("stop", "sup").returncode == 0
