"""The agent's local state file (SQLite): enough to re-adopt or clean up after a crash.

One row per group: leader pid and start time (PID-reuse guard), cgroup
directory, orphan policy, state, and the spec. Written on every state
change; read by a restarted agent and by the guardian.
"""

from __future__ import annotations

import asyncio
import enum
import json
import sqlite3
from pathlib import Path
from typing import Any

from tether.agent.authority import GroupView, Hooks
from tether.agent.statefile import SCHEMA, GroupRecord, read_records, to_record

__all__ = ["SCHEMA", "AgentStore", "GroupRecord", "read_records", "row_of", "spec_from_json",
           "spec_json", "to_record"]


def spec_json(view: GroupView) -> dict[str, Any]:
    spec = view.spec
    return {
        "argv": list(spec.argv), "cwd": spec.cwd, "env": dict(spec.env),
        "inherit_env": spec.inherit_env, "log_path": spec.log_path,
        "ready": str(spec.ready) if spec.ready else "",
        "start_timeout": spec.start_timeout,
        "stop_signal": spec.stop.signal.name, "grace": spec.stop.grace,
        "orphan_policy": spec.orphan_policy.value, "label": spec.label,
        "labels": dict(spec.labels), "session_id": spec.session_id, "window": spec.window,
        "stop_order": spec.stop_order, "target": spec.target, "owns_target": spec.owns_target,
    }


def row_of(view: GroupView) -> tuple[Any, ...]:
    """The state-file row of a group. The spec never changes, so its JSON is encoded once
    per group and reused by every later write."""
    spec = view.encoded.get("json")
    if spec is None:
        spec = view.encoded["json"] = json.dumps(spec_json(view))
    exit_ = {}
    if view.exit is not None:
        exit_ = {k: (v.value if isinstance(v, enum.Enum) else v)
                 for k, v in vars(view.exit).items()}
    return (view.group_id, view.state.value, view.spec.orphan_policy.value, view.leader_pid,
            view.leader_start_time, view.pgid, view.cgroup, view.containment.value,
            view.spec.target, view.spec.session_id, spec, json.dumps(exit_))


class AgentStore(Hooks):
    """Persists every group change; a Hooks implementation for the Authority."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._pending: dict[str, GroupView] = {}
        self._scheduled = False

    def group_changed(self, view: GroupView) -> None:
        """Write-behind: changes made in one event-loop turn are written in one transaction
        at the end of it (a 1000-group stop must not cost 2000 commits)."""
        self._pending[view.group_id] = view
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        rows = [row_of(v) for v in self._pending.values()]
        self._pending.clear()
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO groups VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                                rows)

    def records(self) -> list[GroupRecord]:
        self.flush()
        rows = self.db.execute("SELECT * FROM groups").fetchall()
        return [to_record(r) for r in rows]

    def forget_ended(self) -> None:
        self.db.execute("DELETE FROM groups WHERE state IN ('stopped', 'exited', 'failed')")

    def close(self) -> None:
        self.flush()
        self.db.close()


def spec_from_json(d: dict[str, Any]) -> Any:
    """Rebuild the GroupSpec persisted by ``spec_json``."""
    from types import MappingProxyType

    from tether.agent.model import GroupSpec, OrphanPolicy, Probe, StopPolicy, parse_signal

    return GroupSpec(
        argv=tuple(d["argv"]), cwd=d["cwd"], env=MappingProxyType(d["env"]),
        inherit_env=d["inherit_env"], log_path=d["log_path"],
        ready=Probe.parse(d["ready"]) if d["ready"] else None,
        start_timeout=d["start_timeout"],
        stop=StopPolicy(parse_signal(d["stop_signal"]), d["grace"]),
        orphan_policy=OrphanPolicy(d["orphan_policy"]), label=d["label"],
        labels=MappingProxyType(d["labels"]), session_id=d["session_id"], window=d["window"],
        stop_order=d["stop_order"], target=d["target"], owns_target=d["owns_target"])
