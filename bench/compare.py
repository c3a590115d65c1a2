"""tether side by side with supervisord, circus and plain Python: `python bench/compare.py [--quick]`.

Installs the peers into bench/.venv-peers, runs W1-W3 against every manager (alternating,
several runs each), W4, exit detection and the idle footprint, prints markdown tables and
writes every sample to bench/results/compare.json. Not a test: nothing asserts on timing.
See bench/peers/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Lab, byte_compile_tether  # noqa: E402
from peers import venv  # noqa: E402
from peers.baseline import Baseline  # noqa: E402
from peers.circusd import Circus  # noqa: E402
from peers.common import Manager, Workload, workloads  # noqa: E402
from peers.scenarios import COLUMNS, LINGER, Sample, footprint, log, run_workload  # noqa: E402
from peers.supervisord import Supervisord  # noqa: E402
from peers.tether_driver import Tether  # noqa: E402
from workloads import exit_detection, fan_out  # noqa: E402

STEPS = ["w1", "w2", "w3", "w4", "exit", "footprint"]


class BudgetExceeded(Exception):
    pass


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Raise BudgetExceeded in the main thread once ``seconds`` have passed."""
    def expire(signum: int, frame: object) -> None:
        raise BudgetExceeded(f"did not finish within its {seconds:.0f} s budget")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- statistics and cells


def stat(values: list[float | int | None]) -> dict[str, Any] | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def time_cell(st: dict[str, Any] | None) -> str:
    """Median, then min-max in the median's unit: "343 ms (215-471)", "1.21 s (1.15-1.26)"."""
    if st is None:
        return "-"
    med = fmt_ms(st["median"])
    if st["n"] == 1:
        return med
    unit = med.split()[1]

    def bare(x: float) -> str:
        if unit == "s":
            return f"{x:.2f}"
        ms = x * 1000
        return f"{ms:.0f}" if ms >= 100 else (f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}")
    return f"{med} ({bare(st['min'])}-{bare(st['max'])})"


def count_cell(st: dict[str, Any] | None) -> str:
    if st is None:
        return "-"
    med = st["median"]
    text = f"{med:g}"
    return text if st["min"] == st["max"] else f"{text} ({st['min']:g}-{st['max']:g})"


# ---------------------------------------------------------------- W1-W3 rows

Row = dict[str, Any]


def side_rows(w: Workload, samples: dict[str, list[Sample]], notes: dict[str, str]) -> list[Row]:
    rows: list[Row] = []

    def add(measure: str, kind: str, get: Callable[[Sample], float | int | None],
            only: tuple[str, ...] = ()) -> None:
        cells, values = {}, {}
        for col in COLUMNS:
            got = samples.get(col, [])
            if col in notes:
                cells[col] = notes[col]
                continue
            if only and col not in only:
                cells[col] = ""
                continue
            ok = [s for s in got if not s.error]
            if not ok:
                cells[col] = f"failed: {got[0].error[:80]}" if got else "-"
                continue
            st = stat([get(s) for s in ok])
            values[col] = st
            cells[col] = count_cell(st) if kind == "count" else time_cell(st)
            missing = sum(1 for s in ok if get(s) is None)
            if missing and kind == "gone":
                left = stat([s.processes - (s.gone_in_linger or 0) for s in ok])
                cells[col] = (f"never ({count_cell(left)} of {ok[0].processes} left after "
                              f"{max(LINGER, w.after):g} s)" if missing == len(ok)
                              else f"{time_cell(st)}; {missing} run(s) never")
            if len(ok) < len(got):
                cells[col] += f" [{len(got) - len(ok)} failed]"
        rows.append({"workload": w.key, "section": w.title, "measure": measure, "cells": cells,
                     "values": values})

    if w.key == "w1":
        add("time to all running (start call(s) returned, all seen in /proc)", "ms",
            lambda s: s.running_s)
    add("stop call wall time", "ms", lambda s: s.stop_call_s)
    add("stop request → every process gone" + (f" (KILL due at {w.grace:g} s)"
                                                if w.ignores_term else ""),
        "gone", lambda s: s.all_gone_s)
    add("processes left when the manager reported stopped", "count",
        lambda s: s.left_at_report)
    if w.after:
        add(f"processes left {w.after:g} s later", "count", lambda s: s.left_after)
    if w.ignores_term:
        add("tether exit records: longest stop duration (request → containment empty)", "ms",
            lambda s: (s.details or {}).get("stop_duration_ms", {}).get("max", 0) / 1000
            if s.details else None, only=("tether gRPC", "tether CLI"))
    return rows



def side_table(rows: list[Row]) -> str:
    lines = ["| Workload | Measure | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    last = ""
    for r in rows:
        section = r["section"] if r["section"] != last else ""
        last = r["section"]
        lines.append(f"| {section} | {r['measure']} | "
                     + " | ".join(r["cells"].get(c, "") for c in COLUMNS) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- tether-only rows


def only_rows(reused: list[dict[str, Any]]) -> str:
    lines = ["| Workload | Measure | tether | plain Python | n |", "|---|---|---:|---:|---:|"]
    for r in reused:
        if "error" in r:
            lines.append(f"| {r['workload']} | **failed**: {r['error'][:150]} | - | - | - |")
            continue
        t, b = r.get("tether"), r.get("baseline")
        unit = r["unit"]

        def f(v: float | None, unit: str = unit) -> str:
            if v is None:
                return "-"
            return fmt_ms(v / 1000) if unit == "ms" else f"{v:,.0f} {unit}"
        cell = f(t)
        if r.get("spread"):
            lo, hi = r["spread"]
            cell += f" ({lo:.0f}-{hi:.0f})" if unit == "ms" else f" ({lo:,.0f}-{hi:,.0f})"
        lines.append(f"| {r['workload']} | {r['metric']} | {cell} | {f(b)} | {r['n']} |")
    return "\n".join(lines)


def fan_out_rows(lab: Lab, reps: int) -> list[dict[str, Any]]:
    """W4 through the existing fan-out workload (always 1000 groups), ``reps`` times."""
    got: list[list[dict[str, Any]]] = []
    for i in range(reps):
        log(f"w4: repetition {i + 1} of {reps}")
        # fan_out names its daemons after the run, so each repetition gets a lab (state
        # dirs) of its own; its close() sweeps that repetition's daemons and groups.
        rep = Lab(root=lab.root / f"w4-{i}", keep_logs=True)
        rep.root.mkdir(parents=True)
        try:
            got.append(asyncio.run(fan_out(rep, False)))
        finally:
            for note in rep.close():
                log(f"w4 cleanup: {note}")
            lab.agent_names += rep.agent_names  # so the final sweep also covers them
    stop = [g[0] for g in got]
    spawn = [g[1] for g in got]
    tv = [r["tether"] for r in stop]
    return [{
        **stop[0], "workload": "W4", "tether": statistics.median(tv), "n": reps,
        "spread": (min(tv), max(tv)) if reps > 1 else None,
        "baseline": statistics.median([r["baseline"] for r in stop]),
        "details": {"samples": [r["details"] for r in stop],
                    "samples_ms": tv},
    }, {**spawn[0], "workload": "W4", "tether": statistics.median([r["tether"] for r in spawn]),
        "n": reps, "details": {"samples": [r["tether"] for r in spawn]}}]


# ---------------------------------------------------------------- footprint table


def footprint_table(fp: dict[str, Any]) -> str:
    idle = fp.get("idle", {})
    cols = list(idle)
    n = fp["groups"]
    lines = ["| Measure | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def row(label: str, key: str, fmt: str = "{}") -> None:
        lines.append(f"| {label} | " + " | ".join(
            fmt.format(idle[c][key]) if key in idle[c] else "-" for c in cols) + " |")
    row(f"RSS, idle, {n} groups/programs", "rss_mb", "{} MB")
    row("RSS with no groups (tether)", "rss_mb_no_groups", "{} MB")
    row("USS (memory only this process holds)", "uss_mb", "{} MB")
    row("guardian process RSS (tether)", "guardian_rss_mb", "{} MB")
    row(f"CPU while idle ({fp['window_s']:g} s window)", "cpu_ms_per_s", "{} ms/s")
    row("wake-ups (context switches, all threads)", "wakeups_per_s", "{}/s")
    row("wake-ups of the main thread", "main_thread_wakeups_per_s", "{}/s")
    row("threads", "threads")
    med = fp.get("status_cli_median_s", {})
    status = {"tether serve": ["tether sessions", "tether show"],
              "supervisord": ["supervisorctl status"], "circus": ["circusctl status"]}
    lines.append(f"| status command, {n} tracked (median) | " + " | ".join(
        "; ".join(f"`{k}` {fmt_ms(med[k])}" for k in status.get(c, []) if k in med) or "-"
        for c in cols) + " |")
    spawn = {"tether serve": "serve_spawn_s", "tether agent": "agent_spawn_s",
             "supervisord": "supervisord_spawn_s", "circus": "circus_spawn_s"}
    lines.append(f"| time to start {n} (API) | " + " | ".join(
        f"{fp[spawn[c]]:g} s" if spawn.get(c) in fp else "-" for c in cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- targets


def value(rows: list[Row], wl: str, prefix: str, col: str) -> float | None:
    for r in rows:
        if r["workload"] == wl and r["measure"].startswith(prefix):
            st = r["values"].get(col)
            return None if st is None else float(st["median"])
    return None


def targets(side: list[Row], reused: list[dict[str, Any]], fp: dict[str, Any]
            ) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    t_api = value(side, "w1", "stop call", "tether gRPC")
    base = value(side, "w1", "stop call", "plain Python")
    left = value(side, "w1", "processes left", "tether gRPC")
    if t_api is not None and base:
        out.append(("W1 stop through gRPC within 3x of plain Python",
                    f"{fmt_ms(t_api)} vs {fmt_ms(base)}: {t_api / base:.1f}x"
                    + (f", {left:g} left at return" if left else ""),
                    verdict(t_api <= 3 * base and not left)))
    for col in ("supervisord XML-RPC", "circus client"):
        peer = value(side, "w1", "stop call", col)
        if t_api and peer is not None:
            out.append((f"W1 stop through gRPC >=20x faster than {col}",
                        f"{fmt_ms(t_api)} vs {fmt_ms(peer)}: {peer / t_api:.1f}x faster",
                        verdict(peer >= 20 * t_api)))
    t_cli = value(side, "w1", "stop call", "tether CLI")
    if t_cli is not None:
        out.append(("W1 `tether stop` under 300 ms", fmt_ms(t_cli), verdict(t_cli < 0.3)))
        for col in ("supervisorctl", "circusctl"):
            peer = value(side, "w1", "stop call", col)
            if peer is not None:
                out.append((f"W1 `tether stop` faster than `{col}`",
                            f"{fmt_ms(t_cli)} vs {fmt_ms(peer)}", verdict(t_cli < peer)))
    gone = value(side, "w2", "stop request", "tether gRPC")
    rec = value(side, "w2", "tether exit records", "tether gRPC")
    bgone = value(side, "w2", "stop request", "plain Python")
    if gone is not None:
        # The baseline sends KILL exactly at the grace; what it needs past 1 s is the
        # kernel tearing 200 processes down. "Not a tick later" = within 20 ms of it (a
        # polling tick is 100 ms to 1 s).
        floor = bgone if bgone is not None else 1.0
        late = gone - floor
        text = f"all gone {fmt_ms(gone)} after the request (grace 1 s)"
        if rec is not None:
            text += f"; exit records' longest stop {fmt_ms(rec)}"
        if bgone is not None:
            text += f"; plain Python {fmt_ms(bgone)}"
        out.append(("W2 KILL exactly at the grace: all gone within 20 ms of plain Python's "
                    "KILL at the grace", text,
                    verdict(late < 0.02 and (rec is None or rec - floor < 0.02))))
    for when, prefix in (("at report", "processes left when"), ("5 s later", "processes left 5")):
        s = value(side, "w3", prefix, "tether gRPC")
        c = value(side, "w3", prefix, "tether CLI")
        if s is not None:
            out.append((f"W3 zero survivors for tether ({when})",
                        f"gRPC {s:g}, CLI {c if c is None else f'{c:g}'}",
                        verdict(s == 0 and not c)))
    for r in reused:
        if "error" in r:
            continue
        if r["workload"] == "W4" and r["unit"] == "ms":
            out.append(("W4 1000 groups on 4 agents, session stop under 500 ms",
                        fmt_ms(r["tether"] / 1000), verdict(r["tether"] < 500)))
        if r["workload"] == "exit detection" and r["metric"].endswith("p99"):
            out.append((f"exit detection p99 under 5 ms ({r['metric'].rsplit(' ', 1)[0]})",
                        fmt_ms(r["tether"] / 1000), verdict(r["tether"] < 5)))
    idle = fp.get("idle", {})
    floor = idle.get("bare grpc.aio server")
    for name in ("tether agent", "tether serve"):
        if name in idle:
            d = idle[name]
            out.append((f"{name} idle with {fp['groups']} groups under 50 MB RSS",
                        f"{d['rss_mb']} MB ({d.get('rss_mb_no_groups', '?')} MB with none; a "
                        f"bare grpc.aio server: {floor['rss_mb'] if floor else '?'} MB)",
                        verdict(d["rss_mb"] < 50)))
            top = ", ".join(f"{k} {v}/s" for k, v in
                            list(d["wakeups_per_s_by_thread"].items())[:3]) or "none"
            own = d.get("main_thread_wakeups_per_s")
            out.append((f"{name} idle: no periodic wake-ups beyond heartbeats",
                        f"{d['wakeups_per_s']}/s ({top})"
                        + (f"; main (asyncio) thread {own}/s" if own is not None else "")
                        + f"; CPU {d['cpu_ms_per_s']} ms/s"
                        + (f"; a bare grpc.aio server: {floor['wakeups_per_s']}/s" if floor
                           else ""),
                        verdict(d["wakeups_per_s"] <= 1.0)))
    med = fp.get("status_cli_median_s", {})
    if "tether sessions" in med:
        out.append((f"`tether sessions` under 300 ms ({fp['groups']} groups tracked)",
                    fmt_ms(med["tether sessions"]), verdict(med["tether sessions"] < 0.3)))
    return out


# ---------------------------------------------------------------- main


def host_info() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "euid": os.geteuid()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 runs per manager instead of 5; "
                   "fewer exit-detection samples; one W4 repetition")
    p.add_argument("--runs", type=int, default=0, help="runs per manager and workload")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--out", default=str(HERE / "results" / "compare.json"))
    p.add_argument("--keep-logs", action="store_true",
                   help="keep daemons' logs, configs and state dirs (path printed at the end)")
    args = p.parse_args(argv)
    byte_compile_tether()
    steps = [s.strip() for s in args.only.split(",") if s.strip()] or STEPS
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; choose from {STEPS}")
    runs = args.runs or (2 if args.quick else 5)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    setup_log: list[str] = []
    peers = venv.ensure(setup_log)
    for line in setup_log:
        log(line)
    for peer in peers.values():
        log(f"{peer.name}: {peer.version if peer.ok else 'unavailable: ' + peer.why}")

    lab = Lab(keep_logs=args.keep_logs)
    managers: dict[str, Manager] = {
        "tether": Tether(lab),
        "supervisord": Supervisord(lab, "" if peers["supervisor"].ok else peers["supervisor"].why),
        "circus": Circus(lab, "" if peers["circus"].ok else peers["circus"].why),
        "base": Baseline(),
    }
    notes: dict[str, str] = {}
    for key, cols in (("supervisord", ("supervisord XML-RPC", "supervisorctl")),
                      ("circus", ("circus client", "circusctl"))):
        if managers[key].unavailable:
            for c in cols:
                notes[c] = f"not run: {managers[key].unavailable[:100]}"

    started = datetime.datetime.now(datetime.UTC)
    loads: dict[str, float] = {}
    raw: dict[str, Any] = {}
    side: list[Row] = []
    reused: list[dict[str, Any]] = []
    fp: dict[str, Any] = {}
    failures: dict[str, str] = {}
    budgets = {"w1": 900, "w2": 600, "w3": 900, "w4": 600, "exit": 400, "footprint": 600}
    wls = workloads(args.quick)
    interrupted = False
    try:
        for step in steps:
            loads[step] = round(os.getloadavg()[0], 2)
            log(f"{step} (budget {budgets[step]} s, load average {loads[step]}) ...")
            t0 = time.monotonic()
            try:
                with budget(budgets[step]):
                    if step in wls:
                        samples = run_workload(managers, wls[step], runs)
                        raw[step] = {c: [asdict(s) for s in v] for c, v in samples.items()}
                        side += side_rows(wls[step], samples, notes)
                    elif step == "w4":
                        reused += fan_out_rows(lab, 1 if args.quick else 3)
                    elif step == "exit":
                        reused += asyncio.run(exit_detection(lab, args.quick))
                    elif step == "footprint":
                        fp = footprint(lab, managers, 1000, 10.0, 5)
            except Exception as exc:  # one failed step is reported; the others still run
                msg = f"{type(exc).__name__}: {exc}"
                failures[step] = msg
                log(f"{step} failed: {msg}")
                if step in ("w4", "exit"):
                    reused.append({"workload": step, "error": msg})
            log(f"{step} done in {time.monotonic() - t0:.1f} s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
    finally:
        for m in managers.values():
            with contextlib.suppress(Exception):
                m.finish()
        for note in lab.close():
            log(f"cleanup: {note}")
        if args.keep_logs:
            log(f"logs kept in {lab.root}")
    if interrupted:
        return 130

    info = host_info()
    goals = targets(side, reused, fp)
    out_md = []
    if side:
        out_md += ["## W1-W3 side by side (median (min-max) of "
                   f"{runs} runs each, alternating)", "", side_table(side), ""]
    if reused:
        out_md += ["## tether only", "", only_rows(reused), ""]
    if fp.get("idle"):
        out_md += [f"## Footprint, idle with {fp['groups']} groups (peers: as many programs)",
                   "", footprint_table(fp), ""]
    if goals:
        out_md += ["## Targets (issue 7)", "", "| Target | Measured | |", "|---|---|---|"]
        out_md += [f"| {a} | {b} | {c} |" for a, b, c in goals]
        out_md.append("")
    for step, msg in failures.items():
        out_md.append(f"- **{step} failed**: {msg[:300]}")
    out_md.append(
        f"{'Quick run' if args.quick else 'Full run'}, {started:%Y-%m-%d}: {info['cpus']} CPUs, "
        f"Python {info['python']}, containment {lab.containment or 'unknown'}, supervisor "
        f"{peers['supervisor'].version or '-'}, circus {peers['circus'].version or '-'}, "
        f"1-min load average at each step's start {min(loads.values(), default=0):g}"
        f"-{max(loads.values(), default=0):g}.")
    print("\n".join(out_md))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "quick": args.quick, "runs": runs,
        "host": {**info, "containment": lab.containment},
        "peers": {k: asdict(v) for k, v in peers.items()},
        "load_average_at_start": loads, "failures": failures,
        "side_by_side": side, "samples": raw, "tether_only": reused, "footprint": fp,
        "targets": [{"target": a, "measured": b, "verdict": c} for a, b, c in goals],
    }, indent=2, default=str) + "\n")
    log(f"results written to {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
