"""The coordinator's persisted state: SQLite, one file in --state-dir.

Tables: agents, sessions, groups (with their exit records), stop_intents.
Every acknowledged change is committed before the RPC answers, so a
coordinator killed with SIGKILL loses nothing it has acknowledged. Groups
keep their protobuf ``Group`` message as bytes: the agent's own words.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY, address TEXT NOT NULL, containment INTEGER NOT NULL,
    version TEXT NOT NULL, epoch TEXT NOT NULL, last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, window TEXT NOT NULL, labels TEXT NOT NULL,
    state TEXT NOT NULL, ttl REAL NOT NULL, lease_expires_at REAL NOT NULL,
    stop_cause TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    agent TEXT NOT NULL, group_id TEXT NOT NULL, session_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL, group_pb BLOB NOT NULL, error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (agent, group_id)
);
CREATE INDEX IF NOT EXISTS groups_by_session ON groups (session_id);
CREATE TABLE IF NOT EXISTS stop_intents (
    session_id TEXT PRIMARY KEY, grace REAL, cause TEXT NOT NULL, created_at REAL NOT NULL
);
"""


@dataclass
class AgentRow:
    name: str
    address: str
    containment: int
    version: str
    epoch: str
    last_seen: float


@dataclass
class SessionRow:
    session_id: str
    window: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "active"
    ttl: float = 0.0
    lease_expires_at: float = 0.0
    stop_cause: str = ""
    created_at: float = field(default_factory=time.time)


@dataclass
class GroupRow:
    agent: str
    group_id: str
    session_id: str
    idempotency_key: str
    group_pb: bytes
    error: str = ""


@dataclass
class StopIntent:
    session_id: str
    grace: float | None
    cause: str
    created_at: float


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # agents
    def put_agent(self, a: AgentRow) -> None:
        self.db.execute("INSERT OR REPLACE INTO agents VALUES (?,?,?,?,?,?)",
                        (a.name, a.address, a.containment, a.version, a.epoch, a.last_seen))

    def agents(self) -> list[AgentRow]:
        return [AgentRow(*r) for r in self.db.execute("SELECT * FROM agents ORDER BY name")]

    # sessions
    def put_session(self, s: SessionRow) -> None:
        self.db.execute("INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?,?,?)",
                        (s.session_id, s.window, json.dumps(s.labels), s.state, s.ttl,
                         s.lease_expires_at, s.stop_cause, s.created_at))

    def delete_session(self, session_id: str) -> None:
        self.db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))

    def sessions(self) -> list[SessionRow]:
        rows = self.db.execute("SELECT * FROM sessions ORDER BY created_at")
        return [SessionRow(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    # groups
    def put_group(self, g: GroupRow) -> None:
        self.db.execute("INSERT OR REPLACE INTO groups VALUES (?,?,?,?,?,?)",
                        (g.agent, g.group_id, g.session_id, g.idempotency_key, g.group_pb,
                         g.error))

    def put_groups(self, rows: list[GroupRow]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO groups VALUES (?,?,?,?,?,?)",
                                [(g.agent, g.group_id, g.session_id, g.idempotency_key,
                                  g.group_pb, g.error) for g in rows])

    def groups(self) -> list[GroupRow]:
        return [GroupRow(*r) for r in self.db.execute("SELECT * FROM groups")]

    # stop intents
    def put_intent(self, i: StopIntent) -> None:
        self.db.execute("INSERT OR REPLACE INTO stop_intents VALUES (?,?,?,?)",
                        (i.session_id, i.grace, i.cause, i.created_at))

    def drop_intent(self, session_id: str) -> None:
        self.db.execute("DELETE FROM stop_intents WHERE session_id = ?", (session_id,))

    def intents(self) -> list[StopIntent]:
        return [StopIntent(*r) for r in self.db.execute("SELECT * FROM stop_intents")]
