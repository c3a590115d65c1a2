"""The coordinator's state in PostgreSQL, shared by several coordinators (``--store URL``).

The same records as the SQLite store (``rows.py``), in tables prefixed ``tether_``,
through psycopg 3 (async, a small pool: nothing blocks the event loop). The schema is
created and migrated by the coordinator (``MIGRATIONS``, under a transaction-scoped
advisory lock, so coordinators starting together migrate once).

Leadership is the one row of ``tether_leader``: holder, epoch, expiry, compared with
the database's ``now()`` only. A coordinator takes it when it expired (a new epoch),
renews it about every second, and writes every batch in a transaction that first
reads that row ``FOR SHARE``: a batch commits only while the row names the writer's
holder and epoch, and a takeover (an UPDATE of the row) waits for batches in flight,
so whoever leads next loads every batch the previous leader committed and none it
tries later.

Works behind PgBouncer in transaction mode: no session state is used (no prepared
statements, no session advisory locks, no LISTEN, no SET outside a transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tether.coordinator import rows
from tether.coordinator.model import TrackedGroup
from tether.coordinator.store import (
    EVENTS_KEPT,
    Batch,
    Lease,
    Snapshot,
    SpawnIntent,
    Term,
)
from tether.coordinator.store_url import redact, secrets_of
from tether.core.errors import NotLeader, StateFileError, StoreUnavailable
from tether.core.sessions import AgentInfo, Session, SessionEvent, StopIntent
from tether.core.writebehind import RowsRefused

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Each migration takes the schema from version N-1 to N (one transaction for all).
MIGRATIONS: Sequence[str] = (
    # 1: the first release with PostgreSQL (as SQLite's version 3).
    """
    CREATE TABLE tether_agents (
        name text PRIMARY KEY, address text NOT NULL, containment integer NOT NULL,
        version text NOT NULL, epoch text NOT NULL, last_seen double precision NOT NULL,
        instance text NOT NULL DEFAULT '', credential text NOT NULL DEFAULT ''
    );
    CREATE TABLE tether_sessions (
        session_id text PRIMARY KEY, "window" text NOT NULL, labels text NOT NULL,
        state text NOT NULL, ttl double precision NOT NULL,
        lease_expires_at double precision NOT NULL, stop_cause text NOT NULL,
        created_at double precision NOT NULL, stopped_at double precision NOT NULL DEFAULT 0
    );
    CREATE TABLE tether_groups (
        agent text NOT NULL, group_id text NOT NULL, session_id text NOT NULL,
        idempotency_key text NOT NULL, group_pb bytea NOT NULL, error text NOT NULL DEFAULT '',
        fingerprint text NOT NULL DEFAULT '', attempts integer NOT NULL DEFAULT 0,
        PRIMARY KEY (agent, group_id)
    );
    CREATE INDEX tether_groups_by_session ON tether_groups (session_id);
    CREATE TABLE tether_stop_intents (
        session_id text PRIMARY KEY, grace double precision, cause text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE TABLE tether_spawn_intents (
        group_id text PRIMARY KEY, agent text NOT NULL, session_id text NOT NULL,
        idempotency_key text NOT NULL, fingerprint text NOT NULL, stop_order integer NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE TABLE tether_events (
        seq bigint PRIMARY KEY, session_id text NOT NULL, event_pb bytea NOT NULL
    );
    CREATE TABLE tether_leader (
        id integer PRIMARY KEY CHECK (id = 1), holder text NOT NULL, address text NOT NULL,
        epoch bigint NOT NULL, expires_at timestamptz NOT NULL
    );
    INSERT INTO tether_meta VALUES ('lineage', substr(md5(random()::text ||
                                                         clock_timestamp()::text), 1, 16))
    """,
    # 2: stream leases (OpenLease): the grace and the resume token's hash, so the next
    # leader gives the owner its grace to come back.
    """
    ALTER TABLE tether_sessions ADD COLUMN lease_grace double precision NOT NULL DEFAULT 0;
    ALTER TABLE tether_sessions ADD COLUMN lease_token text NOT NULL DEFAULT ''
    """,
    # 3: a stop intent may stop some groups of a session (cause "groups:[...]"): a tether
    # that does not know that would resume it as a stop of the whole session, so it must
    # not lead this database (the version is what keeps it out).
    """
    INSERT INTO tether_meta VALUES ('stop_intent_scopes', 'session groups')
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
    """,
)
VERSION = len(MIGRATIONS)
#: pg_advisory_xact_lock key for migrations ("tether" in ASCII).
MIGRATION_LOCK = 0x746574686572

#: How long one store operation may take before the store counts as unavailable.
OP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
#: Rows fetched at a time by a load (the event loop runs between chunks).
LOAD_CHUNK = 2000
#: libpq TCP keepalives: a silent server (a partition) is noticed in seconds.
KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3}

_TABLES = {"agent": ("tether_agents", rows.AGENT_COLUMNS, ("name",)),
           "session": ("tether_sessions", rows.SESSION_COLUMNS, ("session_id",)),
           "group": ("tether_groups", rows.GROUP_COLUMNS, ("agent", "group_id")),
           "intent": ("tether_stop_intents", rows.INTENT_COLUMNS, ("session_id",)),
           "spawn": ("tether_spawn_intents", rows.SPAWN_COLUMNS, ("group_id",)),
           "event": ("tether_events", rows.EVENT_COLUMNS, ("seq",))}


def is_store_url(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


class SchemaTooNew(StateFileError):
    #: Retrying does not help: the leader steps down at once (``ha.Controller``).
    permanent = True


class _RolledBack(Exception):
    """Raised to roll a probing transaction back."""


def _quote(column: str) -> str:
    return f'"{column}"'


def _upsert(table: str, columns: Sequence[str], key: Sequence[str]) -> str:
    cols = ", ".join(map(_quote, columns))
    updates = ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in columns if c not in key)
    return (f"INSERT INTO {table} ({cols}) VALUES ({rows.placeholders(columns, '%s')}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}")


def _delete(table: str, key: Sequence[str]) -> str:
    return f"DELETE FROM {table} WHERE " + " AND ".join(f"{_quote(k)} = %s" for k in key)


class PostgresStore:
    shared = True

    def __init__(self, url: str, *, op_timeout: float = OP_TIMEOUT,
                 lease_ttl: float = 3.0) -> None:
        self.url = url
        # Server-side limits set in every transaction (SET LOCAL: no session state, so
        # PgBouncer's transaction mode is fine). A coordinator that goes silent with a
        # transaction open (a partition, SIGSTOP, a VM freeze) would otherwise keep its
        # locks on tether_leader until TCP gives up (hours): its transaction is ended
        # after half a lease idle, a lock is waited for at most half a lease, a statement
        # runs at most the operation timeout.
        half = max(0.5, lease_ttl / 2)
        self._limits = (f"{int(half * 1000)}ms", f"{int(half * 1000)}ms",
                        f"{int(op_timeout * 1000)}ms")
        self.where = f"PostgreSQL store {redact(url)}"
        self.lineage = ""
        self.op_timeout = op_timeout
        self._secrets = secrets_of(url)
        self._pool: AsyncConnectionPool | None = None
        self._pruned = 0

    @classmethod
    async def open(cls, url: str, *, op_timeout: float = OP_TIMEOUT,
                   lease_ttl: float = 3.0) -> PostgresStore:
        """Connect, create or migrate the schema, open the pool. Refuses a store that does
        not answer, a wrong password, a schema from a newer tether (with what to do).
        ``lease_ttl``: the leader lease's, which sizes the server-side timeouts."""
        store = cls(url, op_timeout=op_timeout, lease_ttl=lease_ttl)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT + op_timeout):
                conn = await psycopg.AsyncConnection.connect(
                    url, connect_timeout=int(CONNECT_TIMEOUT), prepare_threshold=None,
                    **KEEPALIVES)
                async with conn:
                    await store._migrate(conn)
        except TimeoutError:
            raise store._unavailable(f"no answer within {CONNECT_TIMEOUT + op_timeout:g} s") \
                from None
        except psycopg.OperationalError as exc:
            raise store._unavailable(str(exc)) from exc
        store._pool = AsyncConnectionPool(
            url, min_size=1, max_size=4, open=False, timeout=op_timeout,
            kwargs={"prepare_threshold": None, "connect_timeout": int(CONNECT_TIMEOUT),
                    **KEEPALIVES},
            name="tether-store")
        await store._pool.open(wait=False)
        return store

    def _clean(self, text: str) -> str:
        text = " ".join(text.split())
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _unavailable(self, why: str) -> StoreUnavailable:
        why = self._clean(why)
        if "password authentication failed" in why or "no password supplied" in why:
            advice = ("check the user and password (in the URL, PGPASSWORD or a PGPASSFILE; "
                      "the URL's password is visible to every local user in `ps`: prefer "
                      "TETHER_STORE or the config file)")
        elif "does not exist" in why:
            advice = "create the database (createdb), or fix the name in the store URL"
        else:
            advice = ("check that PostgreSQL runs there and this host can reach it (host, "
                      "port, firewall); a running coordinator keeps trying")
        return StoreUnavailable(self.where, why, advice)

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> int:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS tether_meta "
                               "(key text PRIMARY KEY, value text NOT NULL)")
            cur = await conn.execute("SELECT value FROM tether_meta "
                                     "WHERE key = 'schema_version'")
            row = await cur.fetchone()
            found = int(row[0]) if row else 0
            if found > VERSION:
                raise SchemaTooNew(
                    self.where, f"its schema version {found} is newer than this tether knows "
                    f"({VERSION})", "run the newer tether on this coordinator (upgrade it), "
                    "or point it at another database")
            for version in range(found + 1, VERSION + 1):
                await conn.execute(MIGRATIONS[version - 1].encode())
                await conn.execute(
                    "INSERT INTO tether_meta VALUES ('schema_version', %s) ON CONFLICT (key) "
                    "DO UPDATE SET value = EXCLUDED.value", (str(version),))
            if found < VERSION:
                log.info("%s: schema migrated from version %d to %d", self.where, found,
                         VERSION)
            cur = await conn.execute("SELECT value FROM tether_meta WHERE key = 'lineage'")
            row = await cur.fetchone()
            assert row is not None
            self.lineage = str(row[0])
        return found

    async def _in_transaction(self, work: Callable[[psycopg.AsyncConnection[Any]],
                                                   Awaitable[T]], first: str = "") -> T:
        """Run ``work`` in one transaction (``first``: a SET TRANSACTION for it) on a
        pooled connection, within the operation
        timeout; a database that does not answer is ``StoreUnavailable``."""
        if self._pool is None:
            raise StoreUnavailable(self.where, "the store is closed")
        try:
            async with asyncio.timeout(self.op_timeout):
                async with self._pool.connection() as conn, conn.transaction():
                    if first:
                        await conn.execute(first.encode())
                    await conn.execute(
                        "SELECT set_config('idle_in_transaction_session_timeout', %s, true), "
                        "set_config('lock_timeout', %s, true), "
                        "set_config('statement_timeout', %s, true)", self._limits)
                    return await work(conn)
        except TimeoutError:
            raise StoreUnavailable(self.where, f"no answer within {self.op_timeout:g} s") \
                from None
        except PoolTimeout as exc:
            raise self._unavailable(f"no connection within {self.op_timeout:g} s ({exc})") \
                from None
        except psycopg.OperationalError as exc:
            raise self._unavailable(str(exc)) from exc

    # ------------------------------------------------------------ reading

    async def load(self) -> Snapshot:
        async def read(conn: psycopg.AsyncConnection[Any]
                       ) -> tuple[tuple[list[Any], ...], int]:
            cur = await conn.execute("SELECT value FROM tether_meta "
                                     "WHERE key = 'schema_version'")
            version = int(((await cur.fetchone()) or ("0",))[0])
            if version > VERSION:  # a newer tether migrated it since this one started
                raise SchemaTooNew(
                    self.where, f"its schema version {version} is newer than this tether "
                    f"knows ({VERSION})", "upgrade this coordinator: a newer one migrated "
                    "the database since it started")

            async def all_of(sql: str, *args: Any) -> list[Any]:
                # In chunks, yielding between them: the loop that renews the lease runs
                # on through a big load (a takeover must not lapse while it loads).
                cur = await conn.execute(sql, args or None)
                found: list[Any] = []
                while chunk := await cur.fetchmany(LOAD_CHUNK):
                    found.extend(chunk)
                    await asyncio.sleep(0)
                return found

            raw = (
                await all_of(f"SELECT {', '.join(map(_quote, rows.AGENT_COLUMNS))} "
                             "FROM tether_agents"),
                await all_of(f"SELECT {', '.join(map(_quote, rows.SESSION_COLUMNS))} "
                             "FROM tether_sessions ORDER BY created_at"),
                await all_of("SELECT agent, idempotency_key, group_pb, error, fingerprint, "
                             "attempts FROM tether_groups"),
                await all_of(f"SELECT {', '.join(rows.INTENT_COLUMNS)} "
                             "FROM tether_stop_intents"),
                await all_of(f"SELECT {', '.join(rows.SPAWN_COLUMNS)} "
                             "FROM tether_spawn_intents"),
                await all_of("SELECT event_pb FROM tether_events ORDER BY seq DESC LIMIT %s",
                             EVENTS_KEPT),
            )
            (last,) = (await all_of("SELECT coalesce(max(seq), 0) FROM tether_events"))[0]
            return raw, int(last)

        def convert(raw: tuple[list[Any], ...], last: int) -> Snapshot:
            agents, sessions, groups, intents, spawns, tail = raw
            return Snapshot([rows.agent_of(r) for r in agents],
                            [rows.session_of(r) for r in sessions],
                            [rows.group_of(r) for r in groups],
                            [rows.intent_of(r) for r in intents],
                            [rows.spawn_of(r) for r in spawns],
                            [rows.event_of(r[0]) for r in reversed(tail)], last,
                            self.lineage)

        try:
            raw, last = await self._in_transaction(
                read, first="SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            # Rows to objects (protobuf parsing, the bulk of the work) off the event loop.
            return await asyncio.to_thread(convert, raw, last)
        except (ValueError, KeyError) as exc:
            raise StateFileError(self.where, str(exc), "restore the database from a backup, "
                                 "or clear its tether_ tables to start empty") from exc

    # ------------------------------------------------------------ writing

    async def write(self, batch: Batch, term: Term | None = None) -> None:
        upserts: dict[str, list[rows.Row]] = {}
        keys_of: dict[str, list[Any]] = {}
        deletes: dict[str, list[tuple[str, ...]]] = {}
        newest = 0
        for key, value in batch.items():
            kind = key[0]
            if value is None:
                deletes.setdefault(kind, []).append(tuple(key[1:]))
            elif isinstance(value, AgentInfo):
                upserts.setdefault(kind, []).append(rows.agent_row(value))
            elif isinstance(value, Session):
                upserts.setdefault(kind, []).append(rows.session_row(value))
            elif isinstance(value, TrackedGroup):
                upserts.setdefault(kind, []).append(rows.group_row(value))
            elif isinstance(value, StopIntent):
                upserts.setdefault(kind, []).append(rows.intent_row(value))
            elif isinstance(value, SpawnIntent):
                upserts.setdefault(kind, []).append(rows.spawn_row(value))
            elif isinstance(value, SessionEvent):
                upserts.setdefault(kind, []).append(rows.event_row(value, self.lineage))
                newest = max(newest, value.seq)
            else:
                raise TypeError(f"cannot store {type(value).__name__} under {key}")
            if value is not None:
                keys_of.setdefault(kind, []).append(key)
        prune = newest - self._pruned >= EVENTS_KEPT // 10

        async def apply(conn: psycopg.AsyncConnection[Any],
                        refused: dict[Any, str] | None = None) -> None:
            if term is not None:
                cur = await conn.execute(
                    "SELECT 1 FROM tether_leader WHERE id = 1 AND holder = %s AND epoch = %s "
                    "FOR SHARE", (term.holder, term.epoch))
                if await cur.fetchone() is None:
                    raise NotLeader(f"this coordinator's lease (epoch {term.epoch}) is gone")
                # A newer tether may have migrated the schema since this one loaded it (a
                # rolling upgrade): write nothing in this version's format into it. (A
                # migration takes its tables' locks, so it waits for this transaction or
                # this statement sees its result.)
                cur = await conn.execute("SELECT value FROM tether_meta "
                                         "WHERE key = 'schema_version' FOR SHARE")
                found = int(((await cur.fetchone()) or ("0",))[0])
                if found > VERSION:
                    raise SchemaTooNew(
                        self.where, f"its schema version {found} is newer than this tether "
                        f"knows ({VERSION}): a newer tether migrated it", "upgrade this "
                        "coordinator; it stops leading so that an upgraded one leads")
            async with conn.cursor() as cur:
                for kind, keys in deletes.items():
                    table, _, key_columns = _TABLES[kind]
                    await cur.executemany(_delete(table, key_columns), keys)
                for kind, values in upserts.items():
                    table, columns, key_columns = _TABLES[kind]
                    sql = _upsert(table, columns, key_columns)
                    if refused is None:
                        await cur.executemany(sql, values)
                        continue
                    for key, value in zip(keys_of[kind], values, strict=True):
                        try:  # each row in a savepoint, to learn which ones are refused
                            async with conn.transaction():
                                await cur.execute(sql, value)
                        except psycopg.DataError as exc:
                            refused[key] = self._clean(str(exc))
                if prune:
                    await cur.execute("DELETE FROM tether_events WHERE seq <= %s",
                                      (newest - EVENTS_KEPT,))

        try:
            await self._in_transaction(apply)
        except psycopg.DataError as exc:
            # A row the database cannot hold (a NUL in text, a number out of range) fails
            # the batch; retried as it is, it would fail every later batch too. Find the
            # rows it refuses (row by row, rolled back: the batch stays all or nothing)
            # and say which, so the writer drops them and writes the rest.
            refused: dict[Any, str] = {}

            async def probe(conn: psycopg.AsyncConnection[Any]) -> None:
                await apply(conn, refused)
                raise _RolledBack

            with contextlib.suppress(_RolledBack):
                await self._in_transaction(probe)
            if not refused:  # not a row of ours: an error like any other (retried)
                raise
            raise RowsRefused(refused) from exc
        if prune:
            self._pruned = newest

    # ------------------------------------------------------------ leadership

    async def _one(self, sql: str, args: Sequence[Any]) -> Any:
        async def run(conn: psycopg.AsyncConnection[Any]) -> Any:
            cur = await conn.execute(sql, args)
            return await cur.fetchone()

        return await self._in_transaction(run)

    async def acquire(self, holder: str, address: str, ttl: float) -> Lease:
        async def take(conn: psycopg.AsyncConnection[Any]) -> Lease:
            # Read first, without a lock: an upsert locks the row even when its WHERE is
            # false, and a standby gone silent right after would block the leader's
            # renewals and batches. Only an expired (or absent) lease is written.
            lease = await self._read_lease(conn)
            if lease is not None and lease.remaining > 0:
                return lease
            await conn.execute(
                "INSERT INTO tether_leader AS l VALUES "
                "(1, %s, %s, 1, now() + make_interval(secs => %s)) "
                "ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, "
                "address = EXCLUDED.address, epoch = l.epoch + 1, "
                "expires_at = EXCLUDED.expires_at WHERE l.expires_at <= now()",
                (holder, address, ttl))
            lease = await self._read_lease(conn)
            assert lease is not None
            return lease

        return await self._in_transaction(take)

    @staticmethod
    async def _read_lease(conn: psycopg.AsyncConnection[Any]) -> Lease | None:
        cur = await conn.execute("SELECT holder, address, epoch, "
                                 "extract(epoch FROM expires_at - now()) FROM tether_leader")
        r = await cur.fetchone()
        return None if r is None else Lease(r[0], r[1], int(r[2]), float(r[3]))

    async def renew(self, term: Term, ttl: float) -> bool:
        row = await self._one(
            "UPDATE tether_leader SET expires_at = now() + make_interval(secs => %s) "
            "WHERE id = 1 AND holder = %s AND epoch = %s AND expires_at > now() RETURNING 1",
            (ttl, term.holder, term.epoch))
        return row is not None

    async def raise_epoch(self, term: Term, above: int) -> int | None:
        row = await self._one(
            "UPDATE tether_leader SET epoch = greatest(epoch, %s) + 1 WHERE id = 1 AND "
            "holder = %s AND epoch = %s AND expires_at > now() RETURNING epoch",
            (above, term.holder, term.epoch))
        return None if row is None else int(row[0])

    async def release(self, term: Term) -> None:
        await self._one("UPDATE tether_leader SET expires_at = now() WHERE id = 1 AND "
                        "holder = %s AND epoch = %s RETURNING 1", (term.holder, term.epoch))

    async def lease(self) -> Lease | None:
        return await self._in_transaction(self._read_lease)

    async def close(self) -> None:
        if self._pool is not None:
            t0 = time.monotonic()
            await self._pool.close(timeout=5)
            log.debug("%s: pool closed in %.3f s", self.where, time.monotonic() - t0)
            self._pool = None
