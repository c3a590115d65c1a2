"""The coordinator's state in SQLite: one file in --state-dir (the default store).

Tables: agents, sessions, groups (with their exit records), stop_intents,
spawn_intents, events (the newest, for watchers that resume), leader (one row: the
lease, which a lone coordinator takes once per start, so agents see its epoch rise)
and ``meta`` with the schema version and the store's lineage. The schema is created
and migrated by the coordinator (``MIGRATIONS``, applied in order, each in one
transaction), from an empty file or from any earlier version. Rows are laid out by
``rows.py``, as in the PostgreSQL store.

One coordinator uses the file (its state directory is locked), so the lease's clock is
this host's. SQLite runs on a thread of the store's own, never on the event loop. The
file and its directory are private (0600/0700).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tether.coordinator import rows
from tether.coordinator.model import TrackedGroup
from tether.coordinator.store import (
    EVENTS_KEPT,
    Batch,
    Key,
    Lease,
    Snapshot,
    SpawnIntent,
    Term,
    Value,
)
from tether.core.errors import NotLeader, StateFileError
from tether.core.private import private_dir, touch_private
from tether.core.sessions import AgentInfo, Session, SessionEvent, StopIntent

T = TypeVar("T")
#: The expiry of a lone coordinator's lease (year 5138).
NEVER = 1e11

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
    # 3: several coordinators' worth of state: spawns recorded before they are sent,
    # events kept for watchers that resume, the leadership lease, the store's lineage.
    """
    CREATE TABLE IF NOT EXISTS spawn_intents (
        group_id TEXT PRIMARY KEY, agent TEXT NOT NULL, session_id TEXT NOT NULL,
        idempotency_key TEXT NOT NULL, fingerprint TEXT NOT NULL, stop_order INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY, session_id TEXT NOT NULL, event_pb BLOB NOT NULL
    );
    CREATE TABLE IF NOT EXISTS leader (
        id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL, address TEXT NOT NULL,
        epoch INTEGER NOT NULL, expires_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
    INSERT OR IGNORE INTO meta VALUES ('lineage', lower(hex(randomblob(8))));
    """,
    # 4: stream leases (OpenLease): the grace and the resume token's hash, so a restarted
    # coordinator (or the next leader) gives the owner its grace to come back.
    """
    ALTER TABLE sessions ADD COLUMN lease_grace REAL NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN lease_token TEXT NOT NULL DEFAULT '';
    """,
    # 5: a stop intent may stop some groups of a session (cause "groups:[...]"): a tether
    # that does not know that would resume it as a stop of the whole session, so it must
    # not open this file (the version is what keeps it out).
    """
    INSERT OR REPLACE INTO meta VALUES ('stop_intent_scopes', 'session groups');
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
    shared = False

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self.where = f"state file {self.path}"
        self.lineage = ""
        self._pruned = 0
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
            self.lineage = db.execute("SELECT value FROM meta WHERE key='lineage'").fetchone()[0]
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # -- reading

    async def load(self) -> Snapshot:
        try:
            return await self._run(self._load)
        except (sqlite3.DatabaseError, ValueError, KeyError) as exc:
            raise StateFileError(self.path, str(exc), ADVICE.format(path=self.path)) from exc

    def _load(self) -> Snapshot:
        db = self.db
        with db:
            db.execute("BEGIN")
            agents = [rows.agent_of(r) for r in db.execute(
                f"SELECT {', '.join(rows.AGENT_COLUMNS)} FROM agents")]
            sessions = [rows.session_of(r) for r in db.execute(
                f"SELECT {', '.join(rows.SESSION_COLUMNS)} FROM sessions ORDER BY created_at")]
            groups = [rows.group_of(r) for r in db.execute(
                "SELECT agent, idempotency_key, group_pb, error, fingerprint, attempts "
                "FROM groups")]
            intents = [rows.intent_of(r) for r in db.execute(
                f"SELECT {', '.join(rows.INTENT_COLUMNS)} FROM stop_intents")]
            spawns = [rows.spawn_of(r) for r in db.execute(
                f"SELECT {', '.join(rows.SPAWN_COLUMNS)} FROM spawn_intents")]
            tail = db.execute("SELECT event_pb FROM events ORDER BY seq DESC LIMIT ?",
                              (EVENTS_KEPT,)).fetchall()
            last = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        events = [rows.event_of(r[0]) for r in reversed(tail)]
        return Snapshot(agents, sessions, groups, intents, spawns, events, int(last),
                        self.lineage)

    # -- writing

    async def write(self, batch: Batch, term: Term | None = None) -> None:
        await self._run(self._write, dict(batch), term)

    def _write(self, batch: dict[Key, Value], term: Term | None) -> None:
        db = self.db
        with db:
            db.execute("BEGIN IMMEDIATE")
            if term is not None and db.execute(
                    "SELECT 1 FROM leader WHERE id = 1 AND holder = ? AND epoch = ?",
                    (term.holder, term.epoch)).fetchone() is None:
                raise NotLeader(f"this coordinator's lease (epoch {term.epoch}) is gone")
            newest = 0
            for key, value in batch.items():
                kind = key[0]
                if kind == "agent":
                    if value is None:
                        db.execute("DELETE FROM agents WHERE name = ?", (key[1],))
                    else:
                        assert isinstance(value, AgentInfo)
                        db.execute(_upsert("agents", rows.AGENT_COLUMNS), rows.agent_row(value))
                elif kind == "session":
                    if value is None:
                        db.execute("DELETE FROM sessions WHERE session_id = ?", (key[1],))
                    else:
                        assert isinstance(value, Session)
                        db.execute(_upsert("sessions", rows.SESSION_COLUMNS),
                                   rows.session_row(value))
                elif kind == "group":
                    if value is None:
                        db.execute("DELETE FROM groups WHERE agent = ? AND group_id = ?",
                                   (key[1], key[2]))
                    else:
                        assert isinstance(value, TrackedGroup)
                        db.execute(_upsert("groups", rows.GROUP_COLUMNS), rows.group_row(value))
                elif kind == "intent":
                    if value is None:
                        db.execute("DELETE FROM stop_intents WHERE session_id = ?", (key[1],))
                    else:
                        assert isinstance(value, StopIntent)
                        db.execute(_upsert("stop_intents", rows.INTENT_COLUMNS),
                                   rows.intent_row(value))
                elif kind == "spawn":
                    if value is None:
                        db.execute("DELETE FROM spawn_intents WHERE group_id = ?", (key[1],))
                    else:
                        assert isinstance(value, SpawnIntent)
                        db.execute(_upsert("spawn_intents", rows.SPAWN_COLUMNS),
                                   rows.spawn_row(value))
                elif kind == "event":
                    assert isinstance(value, SessionEvent)
                    db.execute(_upsert("events", rows.EVENT_COLUMNS),
                               rows.event_row(value, self.lineage))
                    newest = max(newest, value.seq)
            if newest - self._pruned >= EVENTS_KEPT // 10:
                db.execute("DELETE FROM events WHERE seq <= ?", (newest - EVENTS_KEPT,))
                self._pruned = newest

    # -- leadership: one coordinator per file, this host's clock

    async def acquire(self, holder: str, address: str, ttl: float) -> Lease:
        return await self._run(self._acquire, holder, address, ttl)

    def _acquire(self, holder: str, address: str, ttl: float) -> Lease:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO leader VALUES (1, ?, ?, 1, ?) ON CONFLICT (id) DO UPDATE SET "
                "holder = excluded.holder, address = excluded.address, "
                "epoch = leader.epoch + 1, expires_at = excluded.expires_at "
                "WHERE leader.expires_at <= ?", (holder, address, now + ttl, now))
            return self._lease(now)

    async def take(self, holder: str, address: str) -> Term:
        """One coordinator per file (its state directory is locked, so any earlier holder
        is gone): the lease is taken whatever its expiry, for a new epoch, and never
        lapses."""
        def take() -> Term:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                r = self.db.execute(
                    "INSERT INTO leader VALUES (1, ?, ?, 1, ?) ON CONFLICT (id) DO UPDATE SET "
                    "holder = excluded.holder, address = excluded.address, "
                    "epoch = leader.epoch + 1, expires_at = excluded.expires_at RETURNING epoch",
                    (holder, address, NEVER)).fetchone()
                return Term(holder, int(r[0]))

        return await self._run(take)

    def _lease(self, now: float) -> Lease:
        r = self.db.execute("SELECT holder, address, epoch, expires_at FROM leader").fetchone()
        return Lease(r[0], r[1], int(r[2]), r[3] - now)

    async def renew(self, term: Term, ttl: float) -> bool:
        def renew() -> bool:
            now = time.time()
            with self.db:
                cur = self.db.execute(
                    "UPDATE leader SET expires_at = ? WHERE holder = ? AND epoch = ? "
                    "AND expires_at > ?", (now + ttl, term.holder, term.epoch, now))
                return cur.rowcount == 1

        return await self._run(renew)

    async def raise_epoch(self, term: Term, above: int) -> int | None:
        def bump() -> int | None:
            now = time.time()
            with self.db:
                r = self.db.execute(
                    "UPDATE leader SET epoch = max(epoch, ?) + 1 WHERE holder = ? AND epoch = ? "
                    "AND expires_at > ? RETURNING epoch",
                    (above, term.holder, term.epoch, now)).fetchone()
                return None if r is None else int(r[0])

        return await self._run(bump)

    async def release(self, term: Term) -> None:
        def release() -> None:
            with self.db:
                self.db.execute("UPDATE leader SET expires_at = 0 WHERE holder = ? AND epoch = ?",
                                (term.holder, term.epoch))

        await self._run(release)

    async def lease(self) -> Lease | None:
        def read() -> Lease | None:
            if self.db.execute("SELECT 1 FROM leader").fetchone() is None:
                return None
            return self._lease(time.time())

        return await self._run(read)

    async def close(self) -> None:
        await self._run(self.db.close)
        self._io.shutdown()


def _upsert(table: str, columns: Sequence[str]) -> str:
    return (f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) "
            f"VALUES ({rows.placeholders(columns, '?')})")
