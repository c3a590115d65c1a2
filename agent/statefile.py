"""The agent's state file format, readable without importing the agent (the guardian
reads it after its agent died, and must stay small)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    group_id TEXT PRIMARY KEY, state TEXT NOT NULL, orphan_policy TEXT NOT NULL,
    leader_pid INTEGER NOT NULL, leader_start_time REAL NOT NULL, pgid INTEGER NOT NULL,
    cgroup TEXT NOT NULL, containment TEXT NOT NULL, target TEXT NOT NULL,
    session_id TEXT NOT NULL, spec TEXT NOT NULL, exit TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class GroupRecord:
    group_id: str
    state: str
    orphan_policy: str
    leader_pid: int
    leader_start_time: float
    pgid: int
    cgroup: str
    containment: str
    target: str
    session_id: str
    spec: dict[str, Any]
    exit: dict[str, Any]

    @property
    def ended(self) -> bool:
        return self.state in ("stopped", "exited", "failed")


def to_record(r: Any) -> GroupRecord:
    return GroupRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9],
                       json.loads(r[10]), json.loads(r[11]))


def read_records(path: str) -> list[GroupRecord]:
    """For the guardian: read without creating anything. A missing file holds no group;
    a file that cannot be read raises ``sqlite3.Error`` (never "no groups": that would
    turn every keep group into a kill)."""
    if not Path(path).exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT * FROM groups").fetchall()
        return [to_record(r) for r in rows]
    except (ValueError, KeyError, IndexError) as exc:
        raise sqlite3.DatabaseError(f"unexpected content: {exc}") from exc
    finally:
        db.close()
