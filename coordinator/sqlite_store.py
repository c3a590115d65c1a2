"""The coordinator's state in SQLite: one file in --state-dir (the default store).

Tables: agents, sessions, groups (with their exit records), stop_intents, and
``meta`` with the schema version. The schema is created and migrated by the
coordinator (``MIGRATIONS``, applied in order, each in one transaction), from an
empty file or from any earlier version. Groups keep the agent's view as a
protobuf ``Group`` (the agent's own words, with environment values: a restarted
coordinator must be able to start a group again).

SQLite runs on a thread of the store's own, never on the event loop. The file and
its directory are private (0600/0700).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from tether.coordinator.model import TrackedGroup
from tether.coordinator.store import Batch, Key, Snapshot, Value
from tether.core.errors import StateFileError
from tether.core.model import Containment
from tether.core.private import private_dir, touch_private
from tether.core.sessions import AgentInfo, Session, SessionState, StopIntent
from tether.rpc.convert import group_from_pb, group_to_pb
from tether.v1 import common_pb2 as pb

# Each migration takes the schema from version N-1 to N.
MIGRATIONS: Sequence[str] = (
    # 1: the first release.
    """
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
    """,
    # 2: agent instances and credentials, stop times, idempotency fingerprints.
    """
    ALTER TABLE agents ADD COLUMN instance TEXT NOT NULL DEFAULT '';
    ALTER TABLE agents ADD COLUMN credential TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN stopped_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE groups ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';
    ALTER TABLE groups ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    """,
)
VERSION = len(MIGRATIONS)

ADVICE = ("move it aside (e.g. `mv {path} {path}.broken`) and start the coordinator again "
          "with an empty state; agents re-register and report their groups")


def schema_version(db: sqlite3.Connection) -> int:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" in tables:
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0
    return 1 if "agents" in tables else 0


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema to ``VERSION``; returns the version it started from."""
    found = schema_version(db)
    if found > VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {found} is newer than this tether knows ({VERSION}); "
            "run the newer tether, or restore a backup")
    for version in range(found + 1, VERSION + 1):
        with db:
            db.execute("BEGIN")
            for statement in MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                       (str(version),))
    return found


class SQLiteStore:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.where = f"state file {self.path}"
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tether-store")
        try:
            self.db = self._io.submit(self._open).result()
        except sqlite3.DatabaseError as exc:
            self._io.shutdown()
            raise StateFileError(self.path, str(exc), ADVICE.format(path=self.path)) from exc

    def _open(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            private_dir(Path(self.path).parent)
            touch_private(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            migrate(db)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    async def _run(self, fn: object, *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)  # type: ignore[arg-type]

    # -- reading

    async def load(self) -> Snapshot:
        try:
            snap = await self._run(self._load)
        except (sqlite3.DatabaseError, ValueError, KeyError) as exc:
            raise StateFileError(self.path, str(exc), ADVICE.format(path=self.path)) from exc
        assert isinstance(snap, Snapshot)
        return snap

    def _load(self) -> Snapshot:
        db = self.db
        agents = [AgentInfo(r[0], r[1], _containment(r[2]), r[3], r[4], r[5], r[6], r[7])
                  for r in db.execute("SELECT name, address, containment, version, epoch, "
                                      "last_seen, instance, credential FROM agents")]
        sessions = [Session(r[0], r[1], json.loads(r[2]), SessionState(r[3]), r[4], r[5], r[6],
                            r[7], r[8])
                    for r in db.execute("SELECT session_id, window, labels, state, ttl, "
                                        "lease_expires_at, stop_cause, created_at, stopped_at "
                                        "FROM sessions ORDER BY created_at")]
        groups = []
        for agent, key, blob, error, fingerprint, attempts in db.execute(
                "SELECT agent, idempotency_key, group_pb, error, fingerprint, attempts "
                "FROM groups"):
            msg = pb.Group()
            msg.ParseFromString(blob)
            groups.append(TrackedGroup(agent, group_from_pb(msg), key, fingerprint, error,
                                       attempts))
        intents = [StopIntent(*r) for r in db.execute(
            "SELECT session_id, grace, cause, created_at FROM stop_intents")]
        return Snapshot(agents, sessions, groups, intents)

    # -- writing

    async def write(self, batch: Batch) -> None:
        await self._run(self._write, dict(batch))

    def _write(self, batch: dict[Key, Value]) -> None:
        db = self.db
        with db:
            db.execute("BEGIN")
            for key, value in batch.items():
                kind = key[0]
                if kind == "agent":
                    if value is None:
                        db.execute("DELETE FROM agents WHERE name = ?", (key[1],))
                    else:
                        assert isinstance(value, AgentInfo)
                        db.execute(
                            "INSERT OR REPLACE INTO agents (name, address, containment, "
                            "version, epoch, last_seen, instance, credential) "
                            "VALUES (?,?,?,?,?,?,?,?)",
                            (value.name, value.address, _CONTAINMENT_NUM[value.containment],
                             value.version, value.epoch, value.last_seen, value.instance,
                             value.credential))
                elif kind == "session":
                    if value is None:
                        db.execute("DELETE FROM sessions WHERE session_id = ?", (key[1],))
                    else:
                        assert isinstance(value, Session)
                        db.execute(
                            "INSERT OR REPLACE INTO sessions (session_id, window, labels, "
                            "state, ttl, lease_expires_at, stop_cause, created_at, stopped_at) "
                            "VALUES (?,?,?,?,?,?,?,?,?)",
                            (value.session_id, value.window, json.dumps(value.labels),
                             value.state.value, value.ttl, value.lease_expires_at,
                             value.stop_cause, value.created_at, value.stopped_at))
                elif kind == "group":
                    if value is None:
                        db.execute("DELETE FROM groups WHERE agent = ? AND group_id = ?",
                                   (key[1], key[2]))
                    else:
                        assert isinstance(value, TrackedGroup)
                        msg = group_to_pb(value.view, redact=False)
                        msg.agent = value.agent
                        db.execute(
                            "INSERT OR REPLACE INTO groups (agent, group_id, session_id, "
                            "idempotency_key, group_pb, error, fingerprint, attempts) "
                            "VALUES (?,?,?,?,?,?,?,?)",
                            (value.agent, value.group_id, value.session_id,
                             value.idempotency_key, msg.SerializeToString(), value.error,
                             value.fingerprint, value.attempts))
                elif kind == "intent":
                    if value is None:
                        db.execute("DELETE FROM stop_intents WHERE session_id = ?", (key[1],))
                    else:
                        assert isinstance(value, StopIntent)
                        db.execute("INSERT OR REPLACE INTO stop_intents VALUES (?,?,?,?)",
                                   (value.session_id, value.grace, value.cause,
                                    value.created_at))

    async def close(self) -> None:
        await self._run(self.db.close)
        self._io.shutdown()


_CONTAINMENT_NUM = {Containment.CGROUP: 1, Containment.SUBREAPER: 2, Containment.PGID: 3}
_CONTAINMENT_BY_NUM = {v: k for k, v in _CONTAINMENT_NUM.items()}


def _containment(n: int) -> Containment:
    return _CONTAINMENT_BY_NUM.get(n, Containment.PGID)
