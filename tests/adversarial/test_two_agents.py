"""Issue 12.1: two daemons on one host never touch each other's processes or cgroups.

Every `tether serve` is agent `local` unless told otherwise; names that sanitise alike
(`a.x`, `a_x`) used to share a cgroup base. Each agent instance now owns a lock in its
state directory, a marker value (TETHER_AGENT=<name>/<instance>) and a cgroup tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.adversarial.helpers import (
    gid,
    kill_leftovers,
    processes_of,
    running,
    serve,
    spawn,
    tether,
    trees,
)
from tests.plugins.common import require_root
from tests.plugins.processes import marked_alive, pid_alive

pytestmark = pytest.mark.slow


def test_two_serves_named_local_leave_each_others_groups_alone(tmp_path: Path) -> None:
    require_root()
    name = f"local-{os.getpid()}"
    with running(serve(tmp_path, name, state=tmp_path / "a")) as a:
        first = gid(spawn(a, "s", ["sleep", "300"]))
        (pid,) = marked_alive(first)
        with running(serve(tmp_path, name, state=tmp_path / "b")) as b:
            # B's start-up orphan sweep ran before it printed "listening".
            assert pid_alive(pid), "the second agent's start-up sweep killed the first's group"
            listed = b.json("orphans", "--sweep")["orphans"]
            assert pid not in [o["pid"] for o in listed]
            assert pid_alive(pid)
            other = gid(spawn(b, "t", ["sleep", "300"]))
            assert len(trees(name)) == 2, "each instance owns its own cgroup tree"
            assert b.json("stop", "t")["complete"]
            assert marked_alive(other) == []
        # B is gone, and took only its own tree with it.
        assert pid_alive(pid)
        assert len(trees(name)) == 1
        again = gid(spawn(a, "s", ["sleep", "300"]))
        report = a.json("stop", "s")
        assert report["complete"] and {g["group_id"] for g in report["groups"]} == {first, again}
        assert all(g["survivors"] == 0 and g["state"] == "stopped" for g in report["groups"])
        assert not pid_alive(pid)
    kill_leftovers(name)


def test_a_second_agent_on_the_same_state_dir_refuses_naming_the_first(tmp_path: Path) -> None:
    name = f"dup-{os.getpid()}"
    with running(serve(tmp_path, name, state=tmp_path / "st")) as a:
        group = gid(spawn(a, "s", ["sleep", "300"]))
        res = tether("serve", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                     "--agent-name", name)
        assert res.returncode == 2, res.stderr
        assert f"pid {a.proc.pid}" in res.stderr and str(tmp_path / "st") in res.stderr
        assert "listening on" not in res.stdout
        # The first one is unharmed and still in charge.
        assert marked_alive(group)
        assert a.json("stop", "s")["complete"]
    kill_leftovers(name)


def test_names_that_sanitise_alike_get_trees_of_their_own(tmp_path: Path) -> None:
    require_root()
    tag = str(os.getpid())
    dotted, underscored = f"a.x{tag}", f"a_x{tag}"
    with running(serve(tmp_path, dotted)) as a:
        kept = gid(spawn(a, "s", ["sh", "-c", "sleep 300 & sleep 300"]))
        with running(serve(tmp_path, underscored)) as b:
            gid(spawn(b, "s", ["sleep", "300"]))
            # Both names sanitise to a_x...: the instance part keeps the trees apart.
            assert len(trees(dotted)) == 2
        assert len(trees(dotted)) == 1, "the other agent removed only its own tree"
        assert len(marked_alive(kept)) == 3, "the other agent's exit touched this group"
        assert processes_of(underscored) == []
        assert a.json("stop", "s")["complete"]
    kill_leftovers(dotted, underscored)
