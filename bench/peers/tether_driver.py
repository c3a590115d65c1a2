"""tether as a user runs it: `tether serve`, driven through its gRPC API (CoordinatorService,
a synchronous client) or through the `tether` CLI (`tether up`, `tether stop`)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import time
from typing import Any

import grpc
from harness import RUN_ID, Daemon, Lab, tether_exe

from peers.common import StopCall, Workload, mark_for, program_env
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TETHER_COORDINATOR"}


class Tether:
    name = "tether"
    key = "tether"
    unavailable = ""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.daemon: Daemon | None = None
        self.channel: grpc.Channel | None = None
        self.stub: Any = None
        self.serial = 0

    @property
    def address(self) -> str:
        assert self.daemon is not None
        return self.daemon.address

    def prepare(self, w: Workload) -> None:
        self.finish()
        self.serial += 1
        self.daemon = self.lab.serve(f"{RUN_ID}-cmp-{w.key}-{self.serial}")
        self.lab.wait_log(self.daemon, "guardian started")
        self.channel = grpc.insecure_channel(self.daemon.address)
        self.stub = cgrpc.CoordinatorServiceStub(self.channel)
        self.stub.ListSessions(cpb.ListSessionsRequest(), timeout=10)  # connect now

    @staticmethod
    def session(w: Workload, cycle: str) -> str:
        return f"{w.key}-{cycle}"

    def spec(self, w: Workload, cycle: str) -> pb.GroupSpec:
        return pb.GroupSpec(argv=list(w.argv), session_id=self.session(w, cycle),
                            env=program_env(mark_for(self.key, w.key)), label=w.key,
                            stop=pb.StopPolicy(grace_seconds=w.grace))

    def start(self, w: Workload, via: str, cycle: str) -> float:
        if via == "api":
            req = cpb.CoordinatorSpawnRequest(spec=self.spec(w, cycle))
            futures = [self.stub.Spawn.future(req, timeout=120) for _ in range(w.count)]
            groups = [f.result() for f in futures]
            done = time.monotonic()
            bad = [g for g in groups if g.state != pb.GROUP_STATE_RUNNING]
            if bad:
                raise RuntimeError(f"tether: {len(bad)} group(s) not running after Spawn: {bad[0]}")
            return done
        # One `tether up` with a session file, as supervisorctl/circusctl start every program
        # of their configuration with one command.
        env = program_env(mark_for(self.key, w.key))
        toml = "\n".join([
            f"session = {json.dumps(self.session(w, cycle))}", "[[group]]",
            f"label = {json.dumps(w.key)}", f"argv = {json.dumps(list(w.argv))}",
            f"grace = {w.grace:g}", f"replicas = {w.count}",
            "env = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items()) + " }", ""])
        path = self.lab.root / f"{self.session(w, cycle)}.toml"
        path.write_text(toml)
        argv = [tether_exe(), "up", str(path), "--coordinator", self.address]
        res = subprocess.run(argv, capture_output=True, text=True, env=cli_env(), timeout=120,
                             stdin=subprocess.DEVNULL, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"tether up -> {res.returncode}: {res.stderr[-300:]}")
        return time.monotonic()

    def stop(self, w: Workload, via: str, cycle: str) -> StopCall:
        session = self.session(w, cycle)
        if via == "api":
            t0 = time.monotonic()
            rep = self.stub.StopSession(cpb.StopSessionRequest(session_id=session), timeout=120)
            t1 = time.monotonic()
            records = [r.exit for r in rep.groups]
            complete = rep.complete
        else:
            argv = [tether_exe(), "stop", session, "--coordinator", self.address]
            t0 = time.monotonic()
            res = subprocess.run(argv, capture_output=True, text=True, env=cli_env(), timeout=120,
                                 stdin=subprocess.DEVNULL, check=False)
            t1 = time.monotonic()
            if res.returncode not in (0, 1):
                raise RuntimeError(f"tether stop -> {res.returncode}: {res.stderr[-300:]}")
            s = self.stub.GetSession(cpb.GetSessionRequest(session_id=session), timeout=30)
            records = [g.exit for g in s.groups]
            complete = res.returncode == 0
        reasons = collections.Counter(pb.ExitReason.Name(r.reason).removeprefix("EXIT_REASON_")
                                      .lower() for r in records)
        durations = sorted(round(r.stop_duration_seconds * 1000, 1) for r in records)
        return StopCall(t0, t1, {
            "complete": complete, "records": len(records), "reasons": dict(reasons),
            "record_survivors": sum(r.survivors for r in records),
            "stop_duration_ms": {"min": durations[0] if durations else None,
                                 "median": durations[len(durations) // 2] if durations else None,
                                 "max": durations[-1] if durations else None},
        })

    def finish(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.daemon is not None:
            self.lab.stop_daemon(self.daemon)
            self.daemon = None
