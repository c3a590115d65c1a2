"""How client commands print: tables that fit a terminal, or JSON (``-o json``)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterable
from typing import Any

from tether.core.model import ExitRecord, RunRecord
from tether.core.sessions import GroupEntry, SessionReport, SessionView

#: Columns that may be cut to make a table fit the terminal (widest first).
ELASTIC = ("command", "error", "agent / message", "message", "address", "former_group")


def table(rows: Iterable[Iterable[Any]], header: list[str], width: int | None = None) -> str:
    """Aligned columns under an upper-case header; long free-text columns are cut with
    "…" so a line fits ``width`` (the terminal's, else 80) where that is possible."""
    data = [[str(c) for c in r] for r in rows]
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
    return out


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
        "unhealthy": v.unhealthy, "restarts": v.restarts,
        **({"health": v.health} if v.health else {}),
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
    return out
