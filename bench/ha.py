"""Coordinators in high availability: failover time, and PostgreSQL beside SQLite.

    python bench/ha.py            # 10 failovers, 3 rounds of 200 spawns + stop per store
    python bench/ha.py --quick    # 3 failovers, 1 round of 100
    python bench/ha.py --pause --failover-only   # the leader SIGSTOPped instead

Failover: two coordinators on one PostgreSQL (lease --leader-ttl, default 2 s), one
agent. Each run spawns a group, SIGKILLs the leader, and at once asks for the session's
stop through the SDK given both addresses; the time is from the kill until that stop
has returned complete through the new leader. The killed coordinator is started again
(a standby) before the next run. With ``--pause`` the leader is SIGSTOPped instead (a
GC pause, a VM freeze: its connections stay open and silent) and SIGCONTed after the
run, when it finds its lease gone and stands by.

Throughput: the same agent setup behind a coordinator on SQLite (`--state-dir` only)
and behind a leader on PostgreSQL (with a standby beside it), alternating: N
`sleep` groups spawned through the SDK, 32 at a time (spawns per second), then one
StopSession (groups stopped per second).

PostgreSQL is started by the test suite's fixture code (initdb/pg_ctl from Debian's
package, as the postgres user when run as root) with its defaults: every commit is
fsynced, where SQLite in WAL mode with synchronous=NORMAL is not. Prints a markdown
table; writes every sample to bench/results/ha.json. Measurements, not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.plugins.postgres import remove_cluster, start_cluster  # noqa: E402
from tests.plugins.processes import Daemon, marked_alive, start_daemon, stop_daemon  # noqa: E402


def coordinator(root: Path, name: str, url: str, ttl: float) -> Daemon:
    env = {"TETHER_STORE": url} if url else {}
    args = ["--listen", "127.0.0.1:0", "--state-dir", str(root / name), "--agent-ttl", "5"]
    if url:
        args += ["--leader-ttl", str(ttl)]
    return start_daemon("coordinator", args, root / name, name, env=env)


def agent(root: Path, name: str, coordinators: str) -> Daemon:
    return start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", coordinators,
                                  "--name", name, "--state-dir", str(root / name)],
                        root / name, name)


async def wait_agent(addresses: str, name: str) -> None:
    from tether.client import AsyncClient

    async with AsyncClient(addresses, failover=60) as c:
        for _ in range(400):
            if any(a.info.name == name and a.up for a in await c.agents()):
                return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"agent {name} did not come up")


async def leader_of(addresses: str) -> str:
    from tether.client import AsyncClient

    async with AsyncClient(addresses, failover=60) as c:
        for _ in range(400):
            for a in addresses.split(","):
                try:
                    info = await c.leader(address=a, timeout=2)
                except Exception:  # a dead one: ask the next
                    continue
                if info.leading:
                    return a
            await asyncio.sleep(0.05)
    raise RuntimeError("no leader")


async def failovers(root: Path, url: str, runs: int, ttl: float, pause: bool = False
                    ) -> list[float]:
    from tether.client import AsyncClient

    cs = [coordinator(root, f"f{n}", url, ttl) for n in range(2)]
    names = 2
    addresses = ",".join(d.address for d in cs)
    a = agent(root, "fa", addresses)
    out = []
    try:
        await wait_agent(addresses, "fa")
        for run in range(runs):
            lead = await leader_of(addresses)
            async with AsyncClient(addresses, failover=60) as c:
                await c.spawn(["sleep", "1000"], session=f"f{run}", grace=1)
                victim = next(d for d in cs if d.address == lead)
                t0 = time.monotonic()
                victim.proc.send_signal(signal.SIGSTOP if pause else signal.SIGKILL)
                report = await c.stop(f"f{run}")
                took = time.monotonic() - t0
            assert report.complete, report
            out.append(took)
            print(f"  failover {run + 1}/{runs}: {took * 1000:.0f} ms", flush=True)
            if pause:  # it wakes up, finds its lease gone and stands by
                victim.proc.send_signal(signal.SIGCONT)
                for _ in range(600):
                    if await leader_of(addresses) != victim.address:
                        break
                    await asyncio.sleep(0.1)
                continue
            victim.proc.wait()
            cs.remove(victim)
            # The same address back, as a standby (as a restarted pod would be).
            port = victim.address.rsplit(":", 1)[1]
            d = start_daemon("coordinator", ["--listen", f"127.0.0.1:{port}", "--state-dir",
                                             str(root / f"f{names}"), "--agent-ttl", "5",
                                             "--leader-ttl", str(ttl)],
                             root / f"f{names}", f"f{names}", env={"TETHER_STORE": url})
            names += 1
            cs.append(d)
    finally:
        for d in [a, *cs]:
            stop_daemon(d)
    return out


async def throughput(addresses: str, agent_name: str, n: int, session: str
                     ) -> tuple[float, float]:
    from tether.client import AsyncClient

    gate = asyncio.Semaphore(32)
    async with AsyncClient(addresses, failover=60) as c:
        async def one(i: int) -> None:
            async with gate:
                await c.spawn(["sleep", "1000"], session=session, agent=agent_name, grace=1)

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        spawned = time.monotonic() - t0
        t0 = time.monotonic()
        report = await c.stop(session)
        stopped = time.monotonic() - t0
    assert report.complete and len(report.groups) == n
    return n / spawned, n / stopped


async def compare(root: Path, url: str, rounds: int, n: int, ttl: float
                  ) -> dict[str, list[tuple[float, float]]]:
    setups: dict[str, tuple[list[Daemon], Daemon, str]] = {}
    sq = coordinator(root, "sqlite", "", ttl)
    setups["SQLite"] = ([sq], agent(root, "tq", sq.address), "tq")
    pg = [coordinator(root, f"pg{k}", url, ttl) for k in range(2)]
    addresses = ",".join(d.address for d in pg)
    setups["PostgreSQL"] = (pg, agent(root, "tp", addresses), "tp")
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
    try:
        for cs, _, name in setups.values():
            await wait_agent(",".join(d.address for d in cs), name)
        for r in range(rounds):
            for kind, (cs, _, name) in setups.items():
                rates = await throughput(",".join(d.address for d in cs), name, n, f"t{r}")
                out[kind].append(rates)
                print(f"  {kind} round {r + 1}/{rounds}: {rates[0]:.0f} spawns/s, "
                      f"{rates[1]:.0f} stops/s", flush=True)
    finally:
        for cs, a, _ in setups.values():
            for d in [a, *cs]:
                stop_daemon(d)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--lease", type=float, default=2.0, help="--leader-ttl (default 2 s)")
    p.add_argument("--pause", action="store_true",
                   help="SIGSTOP the leader instead of SIGKILLing it")
    p.add_argument("--failover-only", action="store_true", help="skip the throughput part")
    args = p.parse_args()
    runs, rounds, n = (3, 1, 100) if args.quick else (10, 3, 200)
    root = Path(tempfile.mkdtemp(prefix="tether-bench-ha-"))
    cluster = start_cluster()
    try:
        print(f"failover, lease {args.lease:g} s, {runs} runs", flush=True)
        fo = asyncio.run(failovers(root, cluster.url(cluster.create_database()), runs,
                                   args.lease, args.pause))
        tp: dict[str, list[tuple[float, float]]] = {}
        if not args.failover_only:
            print(f"throughput, {rounds} round(s) of {n} groups", flush=True)
            tp = asyncio.run(compare(root, cluster.url(cluster.create_database()), rounds, n,
                                     args.lease))
    finally:
        remove_cluster(cluster)
        for short in ("fa", "tq", "tp"):
            for pid in marked_alive(agent=short):
                os.kill(pid, signal.SIGKILL)

    def med(kind: str, i: int) -> float:
        return statistics.median(r[i] for r in tp[kind])

    print(f"\nhost: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| measure | value |\n|---|---:|")
    how = "SIGSTOPped (paused)" if args.pause else "SIGKILLed"
    print(f"| failover, leader {how} → first stop through the new leader (lease "
          f"{args.lease:g} s), median / max of {runs} | {statistics.median(fo) * 1000:.0f} ms"
          f" / {max(fo) * 1000:.0f} ms |")
    if args.failover_only:
        return
    for i, what in ((0, "spawns"), (1, "stops")):
        sq, pg = med("SQLite", i), med("PostgreSQL", i)
        print(f"| {what} per second, {n} groups, SQLite / PostgreSQL (median of {rounds}) | "
              f"{sq:.0f} / {pg:.0f} ({pg / sq:.2f}x) |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"lease": args.lease, "failover_seconds": fo,
                            "throughput": {k: [list(r) for r in v] for k, v in tp.items()},
                            "groups": n}
    (out / "ha.json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
