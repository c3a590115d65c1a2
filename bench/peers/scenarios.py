"""W1-W3 side by side, and the idle footprint. Synchronous on purpose: every manager is
driven the way its own users drive it (blocking XML-RPC, a CLI process, a gRPC call), and
the only concurrency is the GoneWatcher thread that sees processes go, independently of
the manager, through pidfds.
"""

from __future__ import annotations

import collections
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc
import psutil
from harness import RUN_ID, GoneWatcher, Lab, sleep_exe, tether_exe

from peers.common import Manager, Workload, kill_marked, mark_for, marked, program_env, wait_marked
from peers.tether_driver import Tether, cli_env
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

#: (manager key, interface, column label), in the table's column order.
VARIANTS = [
    ("tether", "api", "tether gRPC"),
    ("tether", "cli", "tether CLI"),
    ("supervisord", "api", "supervisord XML-RPC"),
    ("supervisord", "cli", "supervisorctl"),
    ("circus", "api", "circus client"),
    ("circus", "cli", "circusctl"),
    ("base", "api", "plain Python"),
]
COLUMNS = [label for _, _, label in VARIANTS]

#: Pause before each start, so one cycle's teardown (and tether's orphan scan after groups
#: end, see bench/README.md) is over before the next begins. Same for every manager.
SETTLE = 0.3
#: How long after the stop call returned the benchmark keeps waiting for the rest to go.
LINGER = 3.0


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


@dataclass
class Sample:
    run: int
    running_s: float | None = None
    stop_call_s: float | None = None
    all_gone_s: float | None = None
    processes: int = 0
    left_at_report: int | None = None
    left_after: int | None = None
    gone_in_linger: int | None = None
    details: dict[str, Any] | None = None
    error: str = ""


def cycle(m: Manager, w: Workload, start_via: str, stop_via: str, cycle_id: str,
          run: int) -> Sample:
    mark = mark_for(m.key, w.key)
    s = Sample(run)
    stale = kill_marked(mark)
    if stale:
        log(f"{m.name} {w.key}: killed {stale} stale process(es) before the cycle")
    time.sleep(SETTLE)
    expected = w.count * w.per_tree
    t_start = time.monotonic()
    returned = m.start(w, start_via, cycle_id)
    pids, seen = wait_marked(mark, expected, 30)
    if len(pids) < expected:
        raise RuntimeError(f"{m.name}: only {len(pids)} of {expected} processes appeared")
    s.running_s = max(returned, seen) - t_start
    time.sleep(0.2)  # every tree is in its final shape (escapee forked, shells waiting)
    pids = marked(mark)
    s.processes = len(pids)
    with GoneWatcher(pids) as gw:
        call = m.stop(w, stop_via, cycle_id)
        s.stop_call_s = call.t1 - call.t0
        s.left_at_report = len(marked(mark))
        s.details = call.details or None
        if w.after:
            time.sleep(max(0.0, call.t1 + w.after - time.monotonic()))
            s.left_after = len(marked(mark))
        gw.wait(max(0.0, call.t1 + LINGER - time.monotonic()))
        s.gone_in_linger = len(gw.gone_at)
        if gw.all_gone:
            s.all_gone_s = gw.last() - call.t0
    kill_marked(mark)
    return s


def run_workload(managers: dict[str, Manager], w: Workload, runs: int,
                 ) -> dict[str, list[Sample]]:
    """Every variant, ``runs`` times, alternating (the order rotates each run)."""
    samples: dict[str, list[Sample]] = {label: [] for label in COLUMNS}
    live = {k: m for k, m in managers.items() if not m.unavailable}
    try:
        for m in live.values():
            log(f"{w.key}: starting {m.name}")
            m.prepare(w)
        for run in range(runs):
            order = VARIANTS[run % len(VARIANTS):] + VARIANTS[:run % len(VARIANTS)]
            for key, via, label in order:
                if key not in live:
                    continue
                if key == "base" and via != "api":
                    continue
                if sum(1 for x in samples[label] if x.error) >= 2:
                    continue  # failed twice: report the errors, spend no more time on it
                start_via = via if w.key == "w1" else "api"
                t = time.monotonic()
                try:
                    s = cycle(live[key], w, start_via, via, f"r{run}-{via}", run)
                except (RuntimeError, OSError, grpc.RpcError, subprocess.SubprocessError) as exc:
                    s = Sample(run, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    log(f"{w.key} {label} run {run}: {s.error}")
                    kill_marked(mark_for(key, w.key))
                samples[label].append(s)
                log(f"{w.key} run {run} {label}: stop call "
                    f"{_ms(s.stop_call_s)}, all gone {_ms(s.all_gone_s)}, "
                    f"left {s.left_at_report} ({time.monotonic() - t:.1f} s)")
    finally:
        for m in live.values():
            m.finish()
            kill_marked(mark_for(m.key, w.key))
    return samples


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms"


# ---------------------------------------------------------------- footprint


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (thread name, voluntary + involuntary context switches so far)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            switches = 0
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except OSError:
            continue
        out[int(tid)] = (comm, switches)
    return out


def idle_window(pids: dict[str, int], seconds: float) -> dict[str, dict[str, Any]]:
    """RSS, CPU time and context switches (wake-ups) of each process over one idle window."""
    procs = {k: psutil.Process(p) for k, p in pids.items()}
    before = {k: (p.cpu_times(), _threads(p.pid)) for k, p in procs.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    out = {}
    for k, p in procs.items():
        cpu0, thr0 = before[k]
        cpu1, thr1 = p.cpu_times(), _threads(p.pid)
        per_thread: collections.Counter[str] = collections.Counter()
        main = 0
        for tid, (comm, n) in thr1.items():
            delta = n - thr0.get(tid, (comm, 0))[1]
            per_thread[comm] += delta
            if tid == p.pid:
                main = delta
        mem = p.memory_full_info()
        out[k] = {
            "pid": p.pid, "rss_mb": round(mem.rss / 2**20, 1), "uss_mb": round(mem.uss / 2**20, 1),
            "threads": len(thr1),
            "cpu_ms_per_s": round(((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system))
                                  * 1000 / elapsed, 2),
            "wakeups_per_s": round(sum(per_thread.values()) / elapsed, 1),
            "main_thread_wakeups_per_s": round(main / elapsed, 1),
            "wakeups_per_s_by_thread": {c: round(n / elapsed, 1)
                                        for c, n in per_thread.most_common() if n},
        }
    return out


def _spawn_all(call: Any, requests: list[Any], window: int = 32) -> list[Any]:
    out = []
    for i in range(0, len(requests), window):
        futures = [call.future(r, timeout=120) for r in requests[i:i + window]]
        out += [f.result() for f in futures]
    return out


def _wall(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs + 1):  # the first warms the page cache and is dropped
        t = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, env=cli_env(), timeout=120,
                             stdin=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t)
        if res.returncode != 0:
            raise RuntimeError(f"{argv[0]} {argv[1:3]} -> {res.returncode}: {res.stderr[-300:]}")
    return times[1:]


#: The floor under any Python gRPC daemon: grpc.aio with only the health service, no
#: clients, nothing else imported. Its RSS and its C-core threads' wake-ups (timer manager,
#: EventEngine pool and lifeguard) are what tether's own figures sit on.
GRPC_FLOOR = """
import asyncio, grpc
from grpc_health.v1 import health, health_pb2_grpc
async def main():
    s = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), s)
    s.add_insecure_port("127.0.0.1:0")
    await s.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""
FLOOR = "bare grpc.aio server"


def footprint(lab: Lab, managers: dict[str, Manager], groups: int, window: float,
              cli_runs: int) -> dict[str, Any]:
    """tether serve and a standalone tether agent with ``groups`` sleeps each (and the peers
    with as many programs, for orientation), idle side by side over one window; then the
    status commands against them."""
    out: dict[str, Any] = {"groups": groups, "window_s": window}
    tether = managers["tether"]
    assert isinstance(tether, Tether)
    fp = Workload("fp", "footprint", (sleep_exe(), "1000"), groups, 1)
    peers = [m for k, m in managers.items() if k in ("supervisord", "circus") and not m.unavailable]
    serve = lab.serve(f"{RUN_ID}-fp-serve")
    agent = lab.agent(f"{RUN_ID}-fp-agent")
    floor = lab.popen([sys.executable, "-c", GRPC_FLOOR])
    lab.wait_log(serve, "guardian started")
    try:
        rss0 = {k: round(psutil.Process(d.proc.pid).memory_info().rss / 2**20, 1)
                for k, d in (("serve", serve), ("agent", agent))}
        with grpc.insecure_channel(serve.address) as sch, grpc.insecure_channel(agent.address) as ach:
            cstub = cgrpc.CoordinatorServiceStub(sch)
            astub = agrpc.AgentServiceStub(ach)
            for key, stub, make in (
                    ("serve", cstub.Spawn, lambda s: cpb.CoordinatorSpawnRequest(spec=s)),
                    ("agent", astub.Spawn, lambda s: apb.SpawnRequest(spec=s))):
                spec = pb.GroupSpec(argv=list(fp.argv), session_id="fp", label="fp",
                                    env=program_env(mark_for(f"tether-{key}", "fp")))
                t = time.monotonic()
                _spawn_all(stub, [make(spec)] * groups)
                out[f"{key}_spawn_s"] = round(time.monotonic() - t, 2)
                log(f"footprint: {groups} groups on tether {key} in {out[f'{key}_spawn_s']} s")
            for m in peers:
                m.prepare(fp)
                t = time.monotonic()
                m.start(fp, "api", "fp")
                out[f"{m.key}_spawn_s"] = round(time.monotonic() - t, 2)
                log(f"footprint: {groups} programs on {m.name} in {out[f'{m.key}_spawn_s']} s")
            for key in ("tether-serve", "tether-agent", *(m.key for m in peers)):
                got = len(marked(mark_for(key, "fp")))
                if got != groups:
                    raise RuntimeError(f"footprint: {key} runs {got} of {groups} programs")
            time.sleep(2.0)  # let start-up work (scans, timers) settle before the window
            pids = {"tether serve": serve.proc.pid, "tether agent": agent.proc.pid,
                    FLOOR: floor.pid}
            for m in peers:
                pid = m.footprint_pid()  # type: ignore[attr-defined]
                if pid is not None:
                    pids[m.name] = pid
            log(f"footprint: idle window of {window:g} s")
            out["idle"] = idle_window(pids, window)
            out["idle"]["tether serve"]["rss_mb_no_groups"] = rss0["serve"]
            out["idle"]["tether agent"]["rss_mb_no_groups"] = rss0["agent"]
            for name, d in (("tether serve", serve), ("tether agent", agent)):
                guardians = [c for c in psutil.Process(d.proc.pid).children()
                             if "tether.agent.guardian" in " ".join(c.cmdline())]
                if guardians:
                    out["idle"][name]["guardian_rss_mb"] = round(
                        guardians[0].memory_info().rss / 2**20, 1)
            status: dict[str, list[float]] = {
                "tether sessions": _wall([tether_exe(), "sessions", "--coordinator",
                                          serve.address], cli_runs),
                "tether show": _wall([tether_exe(), "show", "fp", "--coordinator",
                                      serve.address], cli_runs)}
            for m in peers:
                argv = m.status_argv()  # type: ignore[attr-defined]
                status[" ".join(a.rsplit("/", 1)[-1] for a in argv[:1]) + " status"] = \
                    _wall(argv, cli_runs)
            out["status_cli_s"] = {k: [round(x, 4) for x in v] for k, v in status.items()}
            out["status_cli_median_s"] = {k: round(statistics.median(v), 4)
                                          for k, v in status.items()}
            cstub.StopSession(cpb.StopSessionRequest(session_id="fp"), timeout=300)
            ids = [g.group_id for g in astub.List(apb.ListRequest(), timeout=60).groups]
            _spawn_all(astub.Stop, [apb.StopRequest(group_id=i) for i in ids], window=64)
    finally:
        floor.kill()
        floor.wait()
        for m in peers:
            m.finish()
        lab.stop_daemon(agent)
        lab.stop_daemon(serve)
        for key in ("tether-serve", "tether-agent", *(m.key for m in peers)):
            kill_marked(mark_for(key, "fp"))
    return out
