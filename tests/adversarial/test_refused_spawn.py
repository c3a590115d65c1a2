"""Issue 12.3: a spawn that is refused or fails for any reason leaves no group that cannot
be ended: every field is checked before anything starts, and a failure inside a
signaller ends the group `failed` with a `start_failed` record."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest

from tests.adversarial.helpers import gid, kill_leftovers, running, serve, spawn, trees
from tests.plugins.common import require_root
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

BAD = [
    ("cwd", {"cwd": "/tmp/a\0b"}),
    ("log_path", {"log_path": "/tmp/x\0.log"}),
    ("label", {"label": "we\0b"}),
    ("target", {"target": "local\0"}),
    ("window", {"window": "w\nx"}),
    ("ready", {"ready": "tcp:80\0"}),
    ("cwd", {"cwd": "/" + "x" * 5000}),
]


#: Fields of the request around the spec (review6: a NUL in an idempotency key reached
#: the store, where PostgreSQL refuses it, so the spawn's record was dropped).
BAD_REQUEST = [("idempotency_key", {"idempotency_key": "k\0ey"}),
               ("idempotency_key", {"idempotency_key": "k" * 5000})]


@pytest.mark.parametrize(("field", "kw"), BAD + BAD_REQUEST,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD + BAD_REQUEST)])
def test_a_bad_field_is_refused_before_anything_starts(tmp_path: Path, field: str,
                                                       kw: dict[str, str]) -> None:
    name = f"bad-{os.getpid()}"
    with running(serve(tmp_path, name)) as d:
        before = d.json("sessions", "--all")
        outside = {k: v for k, v in kw.items() if k == "idempotency_key"}
        inside = {k: v for k, v in kw.items() if k not in outside}
        spec = pb.GroupSpec(argv=["sleep", "300"], session_id="s", **inside)  # type: ignore[arg-type]
        with grpc.insecure_channel(d.address) as channel, pytest.raises(grpc.RpcError) as refused:
            cgrpc.CoordinatorServiceStub(channel).Spawn(
                cpb.CoordinatorSpawnRequest(spec=spec, **outside), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field.split("_")[0] in (refused.value.details() or ""), refused.value.details()
        assert d.json("sessions", "--all") == before, "a refused spawn left a session behind"
    kill_leftovers(name)


def test_a_failure_inside_the_signaller_ends_the_group_failed_and_stoppable(
        tmp_path: Path) -> None:
    """The agent's cgroup tree is removed behind its back: the next start fails inside
    the signaller. The group must end `failed` with a record, the session must stop
    cleanly, and serve must shut down cleanly afterwards."""
    require_root()
    name = f"gone-{os.getpid()}"
    d = serve(tmp_path, name)
    with running(d):
        good = gid(spawn(d, "s", ["sleep", "300"]))
        (tree,) = trees(name)
        # The keep/ half of the tree is empty: remove it, as an operator cleaning up
        # /sys/fs/cgroup by hand might. The next keep-policy start cannot make its cgroup.
        (tree / "keep").rmdir()
        res = spawn(d, "s", ["sleep", "300"], "--orphan-policy", "keep", check=False)
        assert res.returncode == 1, res.stderr
        assert "start failed (target_unreachable)" in res.stderr
        assert "cgroup" in res.stderr and "restart the agent" in res.stderr
        shown = {g["label"] or g["group_id"]: g for g in d.json("show", "s")["groups"]}
        failed = [g for g in shown.values() if g["state"] == "failed"]
        assert len(failed) == 1 and failed[0]["reason"] == "start_failed"
        report = d.json("stop", "s")
        assert report["complete"], report
        states = {g["group_id"]: g["state"] for g in report["groups"]}
        assert states[good] == "stopped" and "failed" in states.values()
        assert d.cli("stop", "s").returncode == 0
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
        assert "Traceback" not in d.log()
    kill_leftovers(name)
