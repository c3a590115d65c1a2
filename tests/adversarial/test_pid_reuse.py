"""Issue 12.2: a reused leader pid never makes a stranger a member (subreaper, pgid).

A process counts as a member only with proof (marker, cgroup, or pgid/sid while the
leader's pid number is provably the leader's). The scenario runs in a private PID
namespace where ns_last_pid hands the dead leader's pid to an unrelated session leader.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.common import require, require_root

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("containment", ["subreaper", "pgid"])
def test_stop_spares_the_session_that_took_the_leaders_pid(containment: str) -> None:
    require_root()
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    res = subprocess.run(
        ["unshare", "-p", "-f", "--mount-proc", sys.executable, "-m",
         "tests.adversarial.pidreuse_scenario", containment],
        capture_output=True, text=True, timeout=120, cwd=REPO, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["stranger"] == out["leader"], "the stranger took the dead leader's pid"
    assert len(out["strangers"]) == 3 and all(out["strangers_alive"]), (
        f"a stranger in session {out['leader']} was signalled: {out}")
    assert not out["child_alive"], f"the group's own member survived its stop: {out}"
    assert out["state"] == "stopped" and out["survivors"] == 0, out
