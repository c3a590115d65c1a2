"""Stream leases (issue 17): a client SIGKILLed -> every process of its window gone.

    python bench/lease.py            # graces 1, 2 and 5 s, 5 runs each
    python bench/lease.py --quick    # 2 runs each

`tether serve`; per run a separate Python process opens a window through the SDK
(`Client.window(..., lease_grace=G)`), spawns 10 trees (`sh` with a `setsid sleep`
escapee each: 20 processes), prints their group ids and waits. The bench finds the
processes by their TETHER_GROUP marker, watches them with pidfds (independent of
tether), SIGKILLs the client, and times the kill until the last one is gone. The
issue's target is grace + 1 s. Prints a markdown table; writes every sample to
bench/results/lease.json. Measurements, not tests (tests/test_lease.py waits for the
events instead of timing them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import GoneWatcher, Lab  # noqa: E402

CLIENT = r"""
import json, sys
from tether.client import Client
with Client(sys.argv[1]) as c, c.window(sys.argv[2], lease_grace=float(sys.argv[3])) as w:
    ids = [w.spawn(["sh", "-c", "setsid sleep 600 & exec sleep 600"]).view.group_id
           for _ in range(10)]
    print(json.dumps(ids), flush=True)
    sys.stdin.readline()
"""


def pids_of(ids: set[str]) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("TETHER_GROUP") in ids:
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def one_run(address: str, session: str, grace: float) -> float:
    client = subprocess.Popen([sys.executable, "-c", CLIENT, address, session, str(grace)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        ids = set(json.loads(client.stdout.readline()))
        deadline = time.monotonic() + 10
        while len(pids := pids_of(ids)) < 20:  # the escapees fork after the spawn answered
            if time.monotonic() > deadline:
                raise SystemExit(f"expected 20 processes, found {len(pids)}")
            time.sleep(0.05)
        with GoneWatcher(pids) as watcher:
            t0 = time.monotonic()
            client.send_signal(signal.SIGKILL)
            client.wait()
            if not watcher.wait(grace + 60) or not watcher.all_gone:
                raise SystemExit(f"{session}: processes left {grace + 60} s after the kill")
            return watcher.last() - t0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for f in (client.stdin, client.stdout):
            if f is not None:
                f.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs = 2 if args.quick else 5
    lab = Lab()
    samples: dict[float, list[float]] = {}
    try:
        d = lab.serve(f"lease-{os.getpid()}")
        for grace in (1.0, 2.0, 5.0):
            samples[grace] = [one_run(d.address, f"bench-{grace:g}-{n}", grace)
                              for n in range(runs)]
    finally:
        lab.close()
    print("| lease_grace | kill -> every process gone, median | max | target (grace + 1 s) |")
    print("|---:|---:|---:|---|")
    for grace, values in samples.items():
        ok = "met" if max(values) <= grace + 1 else "MISSED"
        print(f"| {grace:g} s | {statistics.median(values):.2f} s | {max(values):.2f} s | "
              f"{ok} |")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "lease.json").write_text(json.dumps({
        "machine": platform.platform(), "load": os.getloadavg(), "runs": runs,
        "samples": {str(k): v for k, v in samples.items()}}, indent=1))


if __name__ == "__main__":
    main()
