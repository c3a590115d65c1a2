"""The workloads. Each measures tether through its real gRPC API against real daemons
(subprocesses) and, in the same run, a plain-Python baseline doing the same job with
subprocess.Popen(start_new_session=True) + os.killpg + waitpid.

Each returns rows: {"workload", "metric", "unit", "tether", "baseline", "n", "details"}.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from harness import (
    BENCH_ENV,
    RUN_ID,
    GoneWatcher,
    Lab,
    live_marked,
    median,
    percentile,
    sleep_exe,
    tether_exe,
)

from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

Row = dict[str, Any]
ENDED = {pb.GROUP_STATE_STOPPED, pb.GROUP_STATE_EXITED, pb.GROUP_STATE_FAILED}
GONE_TIMEOUT = 60.0
EVENT_TIMEOUT = 10.0

#: Pause (seconds) after groups end and before the next spawn on the same agent. The
#: agent's orphan scan (run whenever a group ends) can kill a group spawned while it
#: runs; see bench/README.md. run.py sets it from --settle; 0 reproduces the race.
SETTINGS = {"settle": 0.3}


async def settle() -> None:
    await asyncio.sleep(SETTINGS["settle"])

# Sleeps 50 ms, writes its own CLOCK_REALTIME just before exiting, exits at once (no
# interpreter teardown after the stamp). argv[1] is the stamp file.
EXITER = ("import os,sys,time\ntime.sleep(0.05)\n"
          "fd=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT|os.O_TRUNC)\n"
          "os.write(fd,repr(time.time()).encode())\nos._exit(0)\n")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def exiter_argv(stamp: Path) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", EXITER, str(stamp)]


def spec(session: str, argv: list[str], label: str = "") -> pb.GroupSpec:
    return pb.GroupSpec(argv=argv, session_id=session, env={BENCH_ENV: RUN_ID}, label=label)


def sleeper(session: str) -> pb.GroupSpec:
    return spec(session, [sleep_exe(), "1000"], "sleep")


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


async def spawn_many(call: Callable[[int], Awaitable[pb.Group]], n: int,
                     concurrency: int) -> tuple[list[pb.Group], float, list[float]]:
    """Spawn n groups with at most `concurrency` RPCs in flight; (groups, seconds, latencies)."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> pb.Group:
        async with sem:
            t = time.perf_counter()
            g = await call(i)
            latencies.append(time.perf_counter() - t)
            if g.state != pb.GROUP_STATE_RUNNING:
                raise RuntimeError(f"spawn {i} did not reach running: {g}")
            return g

    t0 = time.perf_counter()
    groups = await asyncio.gather(*(one(i) for i in range(n)))
    return list(groups), time.perf_counter() - t0, latencies


def agent_spawner(stub: agrpc.AgentServiceStub, make: Callable[[int], pb.GroupSpec]
                  ) -> Callable[[int], Awaitable[pb.Group]]:
    async def call(i: int) -> pb.Group:
        reply: apb.SpawnResponse = await stub.Spawn(apb.SpawnRequest(spec=make(i)), timeout=60)
        return reply.group
    return call


def coordinator_spawner(stub: cgrpc.CoordinatorServiceStub, make: Callable[[int], pb.GroupSpec],
                        agent: Callable[[int], str] = lambda i: ""
                        ) -> Callable[[int], Awaitable[pb.Group]]:
    async def call(i: int) -> pb.Group:
        group: pb.Group = await stub.Spawn(
            cpb.CoordinatorSpawnRequest(agent=agent(i), spec=make(i)), timeout=60)
        return group
    return call


async def stop_groups(stub: agrpc.AgentServiceStub, groups: list[pb.Group]) -> list[pb.Group]:
    replies = await asyncio.gather(*(stub.Stop(apb.StopRequest(group_id=g.group_id), timeout=120)
                                     for g in groups))
    return [r.group for r in replies]


def reasons(groups: list[pb.Group] | list[cpb.GroupReport]) -> dict[str, int]:
    count: collections.Counter[str] = collections.Counter()
    survivors = 0
    for g in groups:
        count[pb.ExitReason.Name(g.exit.reason)] += 1
        survivors += g.exit.survivors
    return {**count, "survivors": survivors}


def check_gone(watcher: GoneWatcher, group_ids: set[str], what: str) -> dict[str, Any]:
    ok = watcher.wait(GONE_TIMEOUT)
    alive = live_marked(group_ids)
    if not ok or alive:
        raise RuntimeError(f"{what}: {len(alive)} process(es) still alive after the stop: "
                           f"{alive[:10]}")
    return {"verified_gone": len(group_ids)}


# ---------------------------------------------------------------- 1. exit detection


async def _exit_latency(lab: Lab, n: int, warmup: int, subscribe: Callable[[], Any],
                        spawn: Callable[[list[str]], Awaitable[pb.Group]], tag: str
                        ) -> dict[str, list[float]]:
    """Spawn EXITER n times, one at a time; latency = event receipt - the process's own stamp."""
    loop = asyncio.get_running_loop()
    arrived: collections.defaultdict[str, asyncio.Future[tuple[float, float, int]]] = \
        collections.defaultdict(loop.create_future)
    call = subscribe()

    async def reader() -> None:
        async for ev in call:
            now = time.time()
            if ev.group.state in ENDED:
                fut = arrived[ev.group.group_id]
                if not fut.done():
                    fut.set_result((now, ev.at.ToNanoseconds() / 1e9, ev.group.exit.reason))

    task = asyncio.create_task(reader())
    out: dict[str, list[float]] = {"receipt": [], "emit": []}
    bad: collections.Counter[str] = collections.Counter()
    try:
        for i in range(warmup + n):
            stamp = lab.root / f"{tag}-{i}.stamp"
            g = await spawn(exiter_argv(stamp))
            try:
                recv, at, reason = await asyncio.wait_for(arrived[g.group_id], EVENT_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(
                    f"{tag}: no exit event for group {g.group_id} (iteration {i}) within "
                    f"{EVENT_TIMEOUT:g} s; stamp written: {stamp.exists()}") from None
            if reason != pb.EXIT_REASON_NATURAL:
                bad[pb.ExitReason.Name(reason)] += 1
            exited = float(stamp.read_text())
            if i >= warmup:
                out["receipt"].append(recv - exited)
                out["emit"].append(at - exited)
            await settle()
    finally:
        call.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if bad:
        raise RuntimeError(f"{tag}: unexpected exit reasons {dict(bad)}")
    return out


def _exit_baseline(lab: Lab, n: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + n):
        stamp = lab.root / f"base-{i}.stamp"
        p = lab.popen(exiter_argv(stamp))
        p.wait()  # blocking waitpid
        now = time.time()
        if i >= warmup:
            out.append(now - float(stamp.read_text()))
    lab.forget_children()
    return out


def _latency_rows(name: str, tether: dict[str, list[float]], base: list[float], n: int
                  ) -> list[Row]:
    rows = []
    for q in (50, 99):
        rows.append({
            "workload": "exit detection", "metric": f"{name} p{q}", "unit": "ms",
            "tether": ms(percentile(tether["receipt"], q)), "baseline": ms(percentile(base, q)),
            "n": n, "details": {"event_stamped_ms": ms(percentile(tether["emit"], q))},
        })
    return rows


async def exit_detection(lab: Lab, quick: bool) -> list[Row]:
    n, warmup = (30, 3) if quick else (200, 5)
    base = _exit_baseline(lab, n, warmup)
    rows: list[Row] = []

    d = lab.agent(f"{RUN_ID}-exit")
    try:
        async with channel(d.address) as ch:
            stub = agrpc.AgentServiceStub(ch)
            session = "bench-exit"

            async def spawn_a(argv: list[str]) -> pb.Group:
                reply: apb.SpawnResponse = await stub.Spawn(
                    apb.SpawnRequest(spec=spec(session, argv)), timeout=30)
                return reply.group

            agent = await _exit_latency(
                lab, n, warmup, lambda: stub.Watch(apb.WatchRequest(session_id=session)),
                spawn_a, "agent")
    finally:
        await asyncio.to_thread(lab.stop_daemon, d)
    rows += _latency_rows("agent Watch", agent, base, n)

    s = lab.serve(f"{RUN_ID}-exits")
    try:
        async with channel(s.address) as ch:
            cstub = cgrpc.CoordinatorServiceStub(ch)
            session = "bench-exit"
            await cstub.CreateSession(cpb.CreateSessionRequest(session_id=session), timeout=10)

            async def spawn_c(argv: list[str]) -> pb.Group:
                group: pb.Group = await cstub.Spawn(
                    cpb.CoordinatorSpawnRequest(spec=spec(session, argv)), timeout=30)
                return group

            coord = await _exit_latency(
                lab, n, warmup,
                lambda: cstub.WatchSession(cpb.WatchSessionRequest(session_id=session)),
                spawn_c, "serve")
    finally:
        await asyncio.to_thread(lab.stop_daemon, s)
    rows += _latency_rows("serve WatchSession", coord, base, n)
    return rows


# ---------------------------------------------------------------- 2. stop latency


def _stop_baseline(lab: Lab, n: int) -> float:
    procs = [lab.popen([sleep_exe(), "1000"]) for _ in range(n)]
    t0 = time.monotonic()
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait()
    elapsed = time.monotonic() - t0
    lab.forget_children()
    return elapsed


async def _stop_agent_once(stub: agrpc.AgentServiceStub, n: int, session: str
                           ) -> tuple[float, float, dict[str, Any]]:
    groups, _, _ = await spawn_many(agent_spawner(stub, lambda i: sleeper(session)), n, 16)
    ids = {g.group_id for g in groups}
    with GoneWatcher([g.leader_pid for g in groups]) as w:
        t0 = time.monotonic()
        ended = await stop_groups(stub, groups)
        rpc = time.monotonic() - t0
        details = check_gone(w, ids, f"agent stop of {n}")
        gone = w.last() - t0
    return rpc, gone, {**details, **reasons(ended)}


async def _stop_session_once(stub: cgrpc.CoordinatorServiceStub, n: int, session: str
                             ) -> tuple[float, float, dict[str, Any]]:
    groups, _, _ = await spawn_many(coordinator_spawner(stub, lambda i: sleeper(session)), n, 16)
    ids = {g.group_id for g in groups}
    with GoneWatcher([g.leader_pid for g in groups]) as w:
        t0 = time.monotonic()
        report = await stub.StopSession(cpb.StopSessionRequest(session_id=session), timeout=300)
        rpc = time.monotonic() - t0
        details = check_gone(w, ids, f"session stop of {n}")
        gone = w.last() - t0
    if not report.complete or len(report.groups) != n:
        raise RuntimeError(f"StopSession of {n}: complete={report.complete}, "
                           f"{len(report.groups)} records")
    return rpc, gone, {**details, **reasons(list(report.groups))}


async def stop_latency(lab: Lab, quick: bool) -> list[Row]:
    sizes = [(1, 5 if quick else 20), (100, 1 if quick else 3), (1000, 1)]
    rows: list[Row] = []
    for n, reps in sizes:
        base = [_stop_baseline(lab, n) for _ in range(reps)]
        agent_rpc, agent_gone, session_rpc, session_gone = [], [], [], []
        details: dict[str, Any] = {}
        d = lab.agent(f"{RUN_ID}-stop{n}")
        try:
            async with channel(d.address) as ch:
                stub = agrpc.AgentServiceStub(ch)
                for r in range(reps):
                    await settle()
                    rpc, gone, det = await _stop_agent_once(stub, n, f"stop-{n}-{r}")
                    agent_rpc.append(rpc)
                    agent_gone.append(gone)
                    details["agent"] = det
        finally:
            await asyncio.to_thread(lab.stop_daemon, d)
        s = lab.serve(f"{RUN_ID}-sstop{n}")
        try:
            async with channel(s.address) as ch:
                cstub = cgrpc.CoordinatorServiceStub(ch)
                for r in range(reps):
                    await settle()
                    rpc, gone, det = await _stop_session_once(cstub, n, f"sstop-{n}-{r}")
                    session_rpc.append(rpc)
                    session_gone.append(gone)
                    details["session"] = det
        finally:
            await asyncio.to_thread(lab.stop_daemon, s)
        b = ms(median(base))
        rows.append({"workload": "stop", "metric": f"{n} group(s), agent Stop x{n}: all gone",
                     "unit": "ms", "tether": ms(median(agent_gone)), "baseline": b, "n": reps,
                     "details": {"rpcs_returned_ms": ms(median(agent_rpc)),
                                 "samples_ms": [ms(x) for x in agent_gone], **details["agent"]}})
        rows.append({"workload": "stop",
                     "metric": f"{n} group(s), serve StopSession: RPC returned",
                     "unit": "ms", "tether": ms(median(session_rpc)), "baseline": b, "n": reps,
                     "details": {"all_gone_ms": ms(median(session_gone)),
                                 "samples_ms": [ms(x) for x in session_rpc],
                                 **details["session"]}})
    return rows


# ---------------------------------------------------------------- 3. spawn throughput


def _spawn_baseline(lab: Lab, n: int) -> tuple[float, list[float]]:
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        lab.popen([sleep_exe(), "1000"])
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    for p in lab.children:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    lab.forget_children()
    return n / elapsed, lat


async def spawn_throughput(lab: Lab, quick: bool) -> list[Row]:
    n16, n1 = (60, 20) if quick else (300, 50)
    base_rate, base_lat = _spawn_baseline(lab, n16)
    rows: list[Row] = []
    d = lab.agent(f"{RUN_ID}-spawn")
    try:
        async with channel(d.address) as ch:
            stub = agrpc.AgentServiceStub(ch)
            make = agent_spawner(stub, lambda i: sleeper("spawn"))
            g1, _t1, lat1 = await spawn_many(make, n1, 1)
            g16, t16, _ = await spawn_many(make, n16, 16)
            await stop_groups(stub, g1 + g16)
    finally:
        await asyncio.to_thread(lab.stop_daemon, d)
    s = lab.serve(f"{RUN_ID}-sspawn")
    try:
        async with channel(s.address) as ch:
            cstub = cgrpc.CoordinatorServiceStub(ch)
            _gs, ts, _ = await spawn_many(coordinator_spawner(cstub, lambda i: sleeper("sspawn")),
                                         n16, 16)
            await cstub.StopSession(cpb.StopSessionRequest(session_id="sspawn"), timeout=300)
    finally:
        await asyncio.to_thread(lab.stop_daemon, s)
    base = round(base_rate, 1)
    rows.append({"workload": "spawn", "metric": "agent Spawn, 1 in flight: latency p50",
                 "unit": "ms", "tether": ms(median(lat1)), "baseline": ms(median(base_lat)),
                 "n": n1, "details": {"p99_ms": ms(percentile(lat1, 99))}})
    rows.append({"workload": "spawn", "metric": "agent Spawn, 16 in flight: throughput",
                 "unit": "groups/s", "tether": round(n16 / t16, 1), "baseline": base, "n": n16,
                 "details": {}})
    rows.append({"workload": "spawn", "metric": "serve Spawn (coordinator), 16 in flight: "
                 "throughput", "unit": "groups/s", "tether": round(n16 / ts, 1),
                 "baseline": base, "n": n16, "details": {}})
    return rows


# ---------------------------------------------------------------- 4. fan-out


async def fan_out(lab: Lab, quick: bool) -> list[Row]:
    n = 200 if quick else 1000
    base = _stop_baseline(lab, n)
    c = lab.coordinator(f"{RUN_ID}-coord")
    agents = []
    try:
        names = [f"{RUN_ID}-a{i}" for i in range(1, 5)]
        for name in names:
            agents.append(lab.agent(name, coordinator=c.address))
        async with channel(c.address) as ch:
            stub = cgrpc.CoordinatorServiceStub(ch)
            deadline = time.monotonic() + 30
            while True:
                listed = await stub.ListAgents(cpb.ListAgentsRequest(), timeout=5)
                up = {a.name for a in listed.agents if a.state == cpb.AGENT_STATE_UP}
                if set(names) <= up:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agents did not register: up={sorted(up)}")
                await asyncio.sleep(0.1)
            session = "fanout"
            groups, spawn_s, _ = await spawn_many(
                coordinator_spawner(stub, lambda i: sleeper(session), lambda i: names[i % 4]),
                n, 16)
            ids = {g.group_id for g in groups}
            with GoneWatcher([g.leader_pid for g in groups]) as w:
                t0 = time.monotonic()
                report = await stub.StopSession(cpb.StopSessionRequest(session_id=session),
                                                timeout=300)
                rpc = time.monotonic() - t0
                details = check_gone(w, ids, "fan-out stop")
                gone = w.last() - t0
            if not report.complete or len(report.groups) != n:
                raise RuntimeError(f"fan-out StopSession: complete={report.complete}, "
                                   f"{len(report.groups)} records of {n}")
            per_agent = collections.Counter(r.agent for r in report.groups)
    finally:
        for a in agents:
            await asyncio.to_thread(lab.stop_daemon, a)
        await asyncio.to_thread(lab.stop_daemon, c)
    return [
        {"workload": "fan-out", "metric": f"{n} groups on 4 agents, StopSession: last exit record",
         "unit": "ms", "tether": ms(rpc), "baseline": ms(base), "n": 1,
         "details": {"all_gone_ms": ms(gone), "per_agent": dict(per_agent),
                     **details, **reasons(list(report.groups))}},
        {"workload": "fan-out", "metric": f"{n} groups on 4 agents, coordinator Spawn, "
         "16 in flight: throughput", "unit": "groups/s", "tether": round(n / spawn_s, 1),
         "baseline": None, "n": n, "details": {}},
    ]


# ---------------------------------------------------------------- 5. CLI start-up


def _wall(argv: list[str], runs: int, env: dict[str, str] | None = None) -> list[float]:
    out = []
    for _ in range(runs + 1):  # the first run warms the page cache and is dropped
        t = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, env=env, stdin=subprocess.DEVNULL,
                             timeout=60, check=False)
        out.append(time.perf_counter() - t)
        if res.returncode != 0:
            raise RuntimeError(f"{argv} -> {res.returncode}: {res.stderr.decode()[-500:]}")
    return out[1:]


async def cli_startup(lab: Lab, quick: bool) -> list[Row]:
    runs = 10
    env = {k: v for k, v in os.environ.items() if k != "TETHER_COORDINATOR"}
    base = _wall([sys.executable, "-c", "pass"], runs, env)
    grpc_import = _wall([sys.executable, "-c", "import grpc"], runs, env)
    s = lab.serve(f"{RUN_ID}-cli")
    try:
        async with channel(s.address) as ch:
            stub = cgrpc.CoordinatorServiceStub(ch)
            for i in range(3):
                await stub.Spawn(cpb.CoordinatorSpawnRequest(spec=sleeper(f"cli-{i}")),
                                 timeout=30)
        help_ = await asyncio.to_thread(_wall, [tether_exe(), "--help"], runs, env)
        sessions = await asyncio.to_thread(
            _wall, [tether_exe(), "sessions", "--coordinator", s.address], runs, env)
    finally:
        await asyncio.to_thread(lab.stop_daemon, s)
    b = ms(statistics.median(base))
    return [
        {"workload": "CLI start-up", "metric": "`tether --help` (median)", "unit": "ms",
         "tether": ms(statistics.median(help_)), "baseline": b, "n": runs, "details": {}},
        {"workload": "CLI start-up", "metric": "`tether sessions` vs running serve (median)",
         "unit": "ms", "tether": ms(statistics.median(sessions)), "baseline": b, "n": runs,
         "details": {"python_import_grpc_ms": ms(statistics.median(grpc_import))}},
    ]


# ---------------------------------------------------------------- 6. liveness checks


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user+system CPU of the process itself, of its reaped children) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # After "(comm)": state is field 3, so utime (14), stime (15), cutime (16), cstime (17)
    # are at 11..14 here.
    return ((int(fields[11]) + int(fields[12])) / tick,
            (int(fields[13]) + int(fields[14])) / tick)


class _Listener:
    """One TCP port that accepts and closes, for tcp: checks of every group."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()
            self.accepted += 1

    def close(self) -> None:
        self.sock.close()


async def liveness_cost(lab: Lab, quick: bool) -> list[Row]:
    """CPU of an agent holding N idle groups: without --live, and with a tcp: or an exec:
    liveness check of each every 10 s, measured over a window in steady state (the first
    checks are spread over 0.5 to 1.5 intervals)."""
    n, window, interval = (200, 20.0, 10.0) if quick else (1000, 60.0, 10.0)
    listener = _Listener()
    measured: dict[str, tuple[float, float, float]] = {}
    try:
        for kind, live in (("none", ""), ("tcp", f"tcp:127.0.0.1:{listener.port}"),
                           ("exec", "exec:true")):
            d = lab.agent(f"{RUN_ID}-live-{kind}")
            try:
                async with channel(d.address) as ch:
                    stub = agrpc.AgentServiceStub(ch)

                    def make(i: int, live: str = live) -> pb.GroupSpec:
                        g = sleeper("live")
                        if live:
                            g.live = live
                            g.live_interval_seconds = interval
                        return g

                    groups, _, _ = await spawn_many(agent_spawner(stub, make), n, 16)
                    await asyncio.sleep(1.5 * interval + 1)  # every group checked at least once
                    own0, kids0 = cpu_seconds(d.proc.pid)
                    accepted0, t0 = listener.accepted, time.monotonic()
                    await asyncio.sleep(window)
                    own1, kids1 = cpu_seconds(d.proc.pid)
                    elapsed = time.monotonic() - t0
                    measured[kind] = ((own1 - own0) / elapsed * 100,
                                      (kids1 - kids0) / elapsed * 100,
                                      (listener.accepted - accepted0) / elapsed)
                    await stop_groups(stub, groups)
            finally:
                await asyncio.to_thread(lab.stop_daemon, d)
            await settle()
    finally:
        listener.close()
    idle = measured["none"][0]
    rows: list[Row] = []
    for kind in ("tcp", "exec"):
        own, kids, accepts = measured[kind]
        rows.append({
            "workload": "liveness",
            "metric": f"{n} idle groups, --live {kind}: every {interval:g} s: agent CPU "
                      f"(baseline: same agent, no --live)",
            "unit": "%", "tether": round(own + kids, 3), "baseline": round(idle, 3), "n": n,
            "details": {"agent_process_pct": round(own, 3),
                        "reaped_children_pct": round(kids, 3),
                        "checks_expected_per_s": n / interval,
                        "tcp_accepts_per_s": round(accepts, 1) if kind == "tcp" else None,
                        "window_s": window}})
    return rows


WORKLOADS: dict[str, tuple[Callable[[Lab, bool], Awaitable[list[Row]]], float, float]] = {
    # name: (function, time budget quick, time budget full) in seconds
    "exit": (exit_detection, 120, 400),
    "stop": (stop_latency, 240, 600),
    "spawn": (spawn_throughput, 120, 300),
    "fanout": (fan_out, 180, 600),
    "cli": (cli_startup, 120, 120),
    "liveness": (liveness_cost, 240, 600),
}
