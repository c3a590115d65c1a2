"""Run tether's benchmarks: `python bench/run.py [--quick] [--only exit,stop,...]`.

Prints a markdown table and writes JSON to bench/results/latest.json. Each tether
figure is measured beside a plain-Python baseline in the same run. Not a test:
nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Lab, byte_compile_tether, cgroup2_mount  # noqa: E402
from workloads import SETTINGS, WORKLOADS, Row  # noqa: E402


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"
    if unit == "%":
        return f"{value:.2f} % of a core"
    return f"{value:,.0f} {unit}"


def ratio(row: Row) -> str:
    t, b = row.get("tether"), row.get("baseline")
    if t is None or b is None or not b or not t:
        return "-"
    if row["unit"] in ("ms", "%"):
        return f"{t / b:.1f}x"
    return f"{b / t:.1f}x"  # throughput: how many times slower than baseline


def table(rows: list[Row]) -> str:
    lines = ["| Workload | Measure | tether | plain Python | tether / baseline |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | **failed**: {r['error'][:120]} | - | - | - |")
            continue
        lines.append(f"| {r['workload']} | {r['metric']} (n={r['n']}) | "
                     f"{fmt(r['tether'], r['unit'])} | {fmt(r['baseline'], r['unit'])} | "
                     f"{ratio(r)} |")
    return "\n".join(lines)


def host_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cgroup2": str(cgroup2_mount() or ""),
        "euid": os.geteuid(),
    }


async def run_all(lab: Lab, names: list[str], quick: bool, loads: dict[str, float]
                  ) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        loads[name] = round(os.getloadavg()[0], 2)
        func, budget_quick, budget_full = WORKLOADS[name]
        budget = budget_quick if quick else budget_full
        t0 = time.monotonic()
        print(f"[bench] {name} (budget {budget:.0f} s, load average {loads[name]}) ...",
              file=sys.stderr, flush=True)
        try:
            got = await asyncio.wait_for(func(lab, quick), budget)
        except Exception as exc:  # a failing workload is reported, the others still run
            msg = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, TimeoutError):
                msg = f"did not finish within its {budget:.0f} s budget"
            print(f"[bench] {name} failed: {msg}", file=sys.stderr, flush=True)
            got = [{"workload": name, "error": msg}]
        print(f"[bench] {name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr,
              flush=True)
        rows += got
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, smaller sizes")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"),
                   help="where to write the JSON results")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the daemons' logs and state dirs (path printed at the end)")
    p.add_argument("--settle", type=float, default=SETTINGS["settle"],
                   help="pause after groups end before spawning again on that agent (default "
                   "%(default)s s; 0 exposes the orphan-scan race described in bench/README.md)")
    args = p.parse_args(argv)
    byte_compile_tether()
    SETTINGS["settle"] = args.settle
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")

    # Ctrl-C (and SIGTERM, treated alike) cancels the running workload, whose `finally`
    # stops its daemons; Lab.close then sweeps whatever is left. SIGINT is restored to
    # Python's default even when started in the background (where it arrives ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    lab = Lab(keep_logs=args.keep_logs)
    started = datetime.datetime.now(datetime.UTC)
    rows: list[Row] = []
    loads: dict[str, float] = {}
    interrupted = False
    try:
        rows = asyncio.run(run_all(lab, names, args.quick, loads))
    except KeyboardInterrupt:
        interrupted = True
        print("[bench] interrupted; cleaning up", file=sys.stderr, flush=True)
    finally:
        notes = lab.close()
        for note in notes:
            print(f"[bench] cleanup: {note}", file=sys.stderr)
        if args.keep_logs:
            print(f"[bench] logs kept in {lab.root}", file=sys.stderr)
    if interrupted:
        return 130
    info = host_info()
    print(table(rows))
    print(f"\n{'Quick run' if args.quick else 'Full run'}, {started:%Y-%m-%d}: {info['cpus']} CPUs, "
          f"Python {info['python']}, containment {lab.containment or 'unknown'}, "
          f"1-min load average at each workload's start {min(loads.values(), default=0):g}"
          f"-{max(loads.values(), default=0):g}.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "settle_seconds": args.settle,
        "host": {**info, "containment": lab.containment},
        "load_average_at_start": loads,
        "cleanup_sweep": notes,
        "rows": rows,
    }, indent=2) + "\n")
    print(f"\n[bench] results written to {out}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
