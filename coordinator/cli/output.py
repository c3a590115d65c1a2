"""How client commands print: tables that fit a terminal, or JSON (``-o json``)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterable
from typing import Any

from tether.core.model import ExitRecord, PortOwner, PreStopOutcome, RunContext, RunRecord
from tether.core.sessions import GroupEntry, SessionReport, SessionView

#: Columns that may be cut to make a table fit the terminal (widest first).
ELASTIC = ("command", "error", "agent / message", "message", "address", "former_group",
           "group")


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on escaped (``\\n``, ``\\r``,
    ``\\x1b``, ``\\x00``, bidi overrides...): what a cell shows is what it holds, and a
    hostile field (a refused caller's session name in the audit log) can neither move the
    cursor, erase a line nor start a fake row."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def table(rows: Iterable[Iterable[Any]], header: list[str], width: int | None = None) -> str:
    """Aligned columns under an upper-case header; long free-text columns are cut with
    "…" so a line fits ``width`` (the terminal's, else 80) where that is possible. Every
    cell is ``printable``: one row is one line, and nothing in it reaches the terminal raw."""
    data = [[printable(str(c)) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in data)) if data else len(h)
              for i, h in enumerate(header)]
    limit = width or (shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 0)
    if limit:
        for name in ELASTIC:
            if name not in header:
                continue
            i = header.index(name)
            over = sum(widths) + 2 * (len(widths) - 1) - limit
            if over > 0:
                widths[i] = max(len(name), widths[i] - over)
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for r in data:
        cells = [c if len(c) <= w else c[:max(0, w - 1)] + "…" for c, w in
                 zip(r, widths, strict=True)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines)


def emit(output: str, obj: Any, text: str) -> None:
    if output == "json":
        print(json.dumps(obj, indent=2))
    elif text:
        print(text)


def exit_fields(rec: ExitRecord | None) -> dict[str, Any]:
    if rec is None:
        return {"reason": None, "exit_code": None, "signal": None, "survivors": 0,
                "duration_ms": 0}
    out: dict[str, Any] = {
        "reason": rec.reason.value, "exit_code": rec.exit_code, "signal": rec.signal,
        "survivors": rec.survivors, "duration_ms": round(rec.stop_duration * 1000, 1),
    }
    if rec.failure is not None:
        out["failure"] = rec.failure.value
    if rec.message:
        out["message"] = rec.message
    if rec.detail:
        out["detail"] = rec.detail
    if rec.oom_kills:
        out["oom_kills"] = rec.oom_kills
    if rec.pre_stop is not None:
        out["pre_stop"] = pre_stop_dict(rec.pre_stop)
    if rec.context:
        out["context"] = context_dict(rec.context)
    return out


def pre_stop_dict(o: PreStopOutcome) -> dict[str, Any]:
    return {"result": o.result.value, "exit_code": o.exit_code, "signal": o.signal,
            "duration_ms": round(o.duration * 1000, 1), "detail": o.detail,
            "leftovers": o.leftovers}


def context_dict(c: RunContext) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if c.plugins:
        out["plugins"] = list(c.plugins)
    if c.user:
        out["user"] = c.user
    if c.ports:
        out["ports"] = {p.name: p.port for p in c.ports}
    if c.limits:
        out["limits"] = c.limits
    return out


def port_dict(o: PortOwner) -> dict[str, Any]:
    return {"agent": o.agent, "port": o.port, "address": o.address, "listening": o.listening,
            "session": o.session_id, "group_id": o.group_id, "label": o.label,
            "name": o.name, "pid": o.pid, "user": o.user, "command": o.command}


def context_lines(c: RunContext) -> list[str]:
    lines = []
    for i, p in enumerate(c.ports):
        also = " and PORT" if i == 0 else ""
        lines.append(f"port {p.name} = {p.port} ({p.env_name}{also}"
                     f"{', fixed' if p.fixed else ''})")
    if c.user:
        lines.append(f"user: {c.user}")
    if c.limits:
        lines.append(f"limits: {c.limits}")
    lines.extend(c.plugins)
    return lines


def details(groups: Iterable[GroupEntry]) -> str:
    """Per group, what it runs with and how its stop went beyond the table's columns."""
    blocks = []
    for e in groups:
        v = e.view
        lines = context_lines(v.context)
        rec = v.exit
        if rec is not None:
            if rec.oom_kills:
                lines.append(f"oom kills: {rec.oom_kills}")
            if rec.pre_stop is not None:
                p = rec.pre_stop
                lines.append(f"pre-stop: {p.result.value} in {p.duration:.3g} s"
                             + (f" ({p.detail})" if p.detail else ""))
        if lines:
            name = f"{v.group_id}" + (f" ({v.spec.label})" if v.spec.label else "")
            blocks.append(printable(name) + ":\n" + "\n".join("  " + printable(line)
                                                              for line in lines))
    return "\n".join(blocks)


def run_dict(r: RunRecord) -> dict[str, Any]:
    return {"started_at": round(r.started_at, 3), "duration_ms": round(r.duration * 1000, 1),
            **{k: v for k, v in exit_fields(r.exit).items() if k != "duration_ms"}}


def shown_state(e: GroupEntry) -> str:
    return "unreachable" if e.unreachable and not e.state.ended else e.state.value


def group_dict(e: GroupEntry) -> dict[str, Any]:
    v = e.view
    return {
        "group_id": v.group_id, "label": v.spec.label, "agent": e.agent,
        "target": v.spec.target or "local", "state": shown_state(e),
        "containment": v.containment.value, "pid": v.leader_pid,
        "stop_order": v.spec.stop_order, "detached": v.detached, "argv": list(v.spec.argv),
        **({"context": context_dict(v.context)} if v.context else {}),
        "unhealthy": v.unhealthy, "restarts": v.restarts,
        **({"health": v.health} if v.health else {}),
        **({"traceparent": v.spec.traceparent} if v.spec.traceparent else {}),
        **({"runs": [run_dict(r) for r in v.runs]} if v.runs else {}),
        **({"next_restart_in_seconds": round(max(0.0, v.next_restart_at - time.time()), 2)}
           if v.next_restart_at else {}),
        **(exit_fields(v.exit) if v.exit is not None else {}),
    }


def report_dict(rep: SessionReport) -> dict[str, Any]:
    groups = []
    for r in rep.groups:
        state = "unreachable" if r.unreachable and not r.state.ended else r.state.value
        d: dict[str, Any] = {"group_id": r.group_id, "label": r.label, "agent": r.agent,
                             "target": r.target, "state": state, **exit_fields(r.exit)}
        if r.error:
            d["error"] = r.error
        if r.traceparent:
            d["traceparent"] = r.traceparent
        groups.append(d)
    return {"session": rep.session_id, "complete": rep.complete,
            "stop_cause": rep.stop_cause, "groups": groups}


def report_table(rep: SessionReport) -> str:
    rows = []
    for r, d in zip(rep.groups, report_dict(rep)["groups"], strict=True):
        how = (f"code {d['exit_code']}" if d["exit_code"] is not None
               else f"signal {d['signal']}" if d["signal"] is not None else "-")
        rows.append([r.group_id, r.label or "-", r.agent, r.target, d["state"],
                     d["reason"] or "-", how, d["survivors"], d["duration_ms"], r.error or ""])
    return table(rows, ["group", "label", "agent", "target", "state", "reason", "leader",
                        "survivors", "ms", "error"])


def session_dict(v: SessionView) -> dict[str, Any]:
    s = v.session
    out: dict[str, Any] = {
        "session": s.session_id, "window": s.window, "state": s.state.value,
        "labels": dict(s.labels), "ttl_seconds": s.ttl, "stop_cause": s.stop_cause,
        "groups": [group_dict(g) for g in v.groups],
    }
    if s.lease_expires_at:
        out["lease_expires_in_seconds"] = round(s.lease_expires_at - time.time(), 1)
    if s.lease_grace:  # a stream lease (OpenLease): its grace, and whether a stream holds it
        out["lease_grace_seconds"] = s.lease_grace
        out["lease_held"] = v.lease_held
    return out
