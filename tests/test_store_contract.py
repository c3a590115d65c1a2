"""One contract, two stores: SQLite (the default) and PostgreSQL (shared by coordinators).

Every test runs against both, on real databases (a file; a PostgreSQL cluster started
by tests/plugins/postgres.py): batches are atomic, reads give back what was written,
schemas migrate from empty and from the previous version and refuse a newer one, the
leadership lease has one holder at a time with epochs that only rise, and a batch
written under a lost term changes nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.postgres import PgCluster
from tether.coordinator.model import TrackedGroup
from tether.coordinator.sqlite_store import SQLiteStore
from tether.coordinator.store import EVENTS_KEPT, SpawnIntent, Store, Term
from tether.core.errors import NotLeader, StateFileError, StoreUnavailable
from tether.core.model import Containment, EventKind, GroupSpec, GroupState, GroupView
from tether.core.sessions import AgentInfo, GroupEntry, Session, SessionEvent, StopIntent

#: PostgreSQL directly, and behind PgBouncer in transaction mode (no session state).
KINDS = ["sqlite", "postgresql", "pgbouncer"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest
               ) -> Callable[[], asyncio.Future[Store]]:
    """A function opening (another handle on) this test's store."""
    if kind == "sqlite":
        path = tmp_path / "c.sqlite3"

        async def sqlite() -> Store:
            return SQLiteStore(path)

        return sqlite  # type: ignore[return-value]
    url = request.getfixturevalue("pg_url")
    if kind == "pgbouncer":
        url = request.getfixturevalue("pg_bouncer").url(url.rsplit("/", 1)[1])
    from tether.coordinator.postgres_store import PostgresStore

    async def postgres() -> Store:
        return await PostgresStore.open(url)

    return postgres  # type: ignore[return-value]


@pytest.fixture
async def store(open_store: Callable[[], asyncio.Future[Store]]) -> AsyncIterator[Store]:
    s = await open_store()
    try:
        yield s
    finally:
        await s.close()


def group(gid: str, session: str = "s", state: GroupState = GroupState.RUNNING,
          env: dict[str, str] | None = None) -> TrackedGroup:
    spec = GroupSpec(argv=("sleep", "60"), session_id=session, env=env or {})
    return TrackedGroup("a1", GroupView(gid, spec, state, Containment.PGID, leader_pid=42),
                        idempotency_key=f"k-{gid}", fingerprint="fp")


def event(seq: int, t: TrackedGroup) -> SessionEvent:
    return SessionEvent(seq, EventKind.STATE, GroupEntry(t.agent, t.view), time.time())


async def test_a_batch_reads_back_as_written(store: Store) -> None:
    t = group("g-000000000001", env={"SECRET": "v"})
    s = Session("s", "w", {"team": "x"}, ttl=30.0, lease_expires_at=time.time() + 30)
    leased = Session("l", lease_grace=7.5, lease_token="ab" * 32, lease_expires_at=1.0)
    batch = {
        ("agent", "a1"): AgentInfo("a1", "127.0.0.1:1", Containment.CGROUP, "1", "e1", 5.0,
                                   "a1/x", "token:ab"),
        ("session", "s"): s,
        ("session", "l"): leased,
        ("group", "a1", t.group_id): t,
        ("intent", "s"): StopIntent("s", 2.5, "requested", 7.0),
        ("spawn", "g-000000000002"): SpawnIntent("g-000000000002", "a1", "s", "key", "fp", 3,
                                                 8.0),
        ("event", "1"): event(1, t),
        ("event", "2"): event(2, t),
    }
    await store.write(batch)
    snap = await store.load()
    assert snap.agents == [batch[("agent", "a1")]]
    assert sorted(snap.sessions, key=lambda x: x.session_id) == [leased, s], \
        "a stream lease keeps its grace and its token's hash"
    (back,) = snap.groups
    assert back.view.spec.env == {"SECRET": "v"}, "groups keep environment values"
    assert (back.agent, back.group_id, back.idempotency_key, back.fingerprint) == \
        ("a1", t.group_id, "k-" + t.group_id, "fp")
    assert snap.intents == [batch[("intent", "s")]]
    assert snap.spawns == [batch[("spawn", "g-000000000002")]]
    assert [e.seq for e in snap.events] == [1, 2] and snap.last_seq == 2
    assert snap.events[0].group.view.spec.env == {}, "events never keep environment values"
    assert snap.lineage

    await store.write({("group", "a1", t.group_id): None, ("intent", "s"): None,
                       ("spawn", "g-000000000002"): None, ("session", "s"): None,
                       ("session", "l"): None,
                       ("agent", "a1"): None})
    snap = await store.load()
    assert (snap.agents, snap.sessions, snap.groups, snap.intents, snap.spawns) == \
        ([], [], [], [], [])


async def test_a_batch_is_all_or_nothing(store: Store) -> None:
    await store.write({("session", "s"): Session("s")})
    # The second row cannot be stored (a sequence past 64 bits): the first must not stay.
    bad = {("session", "t"): Session("t"), ("event", "x"): event(2**63, group("g-0000000000ff"))}
    with pytest.raises(Exception):  # noqa: B017,PT011 - whatever the store's own error is
        await store.write(bad)
    assert [s.session_id for s in (await store.load()).sessions] == ["s"]


async def test_events_past_the_kept_window_are_dropped(store: Store) -> None:
    t = group("g-000000000003")
    last = EVENTS_KEPT + EVENTS_KEPT // 5
    for start in range(1, last + 1, 2000):
        await store.write({("event", str(n)): event(n, t)
                           for n in range(start, min(start + 2000, last + 1))})
    snap = await store.load()
    assert snap.last_seq == last
    assert len(snap.events) == EVENTS_KEPT
    assert snap.events[-1].seq == last and snap.events[0].seq == last - EVENTS_KEPT + 1


async def test_the_lineage_survives_reopening(store: Store,
                                              open_store: Callable[[], asyncio.Future[Store]]
                                              ) -> None:
    first = (await store.load()).lineage
    again = await open_store()
    try:
        assert (await again.load()).lineage == first
    finally:
        await again.close()


async def test_one_holder_at_a_time_and_epochs_only_rise(store: Store) -> None:
    assert await store.lease() is None
    a = await store.acquire("A", "a:1", 30)
    assert (a.holder, a.address, a.epoch) == ("A", "a:1", 1) and a.remaining > 25
    b = await store.acquire("B", "b:1", 30)
    assert (b.holder, b.epoch) == ("A", 1), "an unexpired lease is not taken"
    term = Term("A", 1)
    assert await store.renew(term, 30)
    assert not await store.renew(Term("B", 1), 30)
    await store.release(term)
    b = await store.acquire("B", "b:1", 30)
    assert (b.holder, b.address, b.epoch) == ("B", "b:1", 2)
    assert not await store.renew(term, 30), "a released lease is not renewed"
    assert await store.raise_epoch(term, 10) is None
    assert await store.raise_epoch(Term("B", 2), 10) == 11
    assert (await store.lease()).epoch == 11  # type: ignore[union-attr]


async def test_an_expired_lease_is_taken_over_and_not_renewed(store: Store) -> None:
    a = await store.acquire("A", "a:1", 0.2)
    deadline = time.monotonic() + 10
    while (await store.lease()).remaining > 0:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert not await store.renew(Term("A", a.epoch), 30), "an expired lease is not renewed"
    b = await store.acquire("B", "b:1", 30)
    assert (b.holder, b.epoch) == ("B", a.epoch + 1)


async def test_a_batch_under_a_lost_term_changes_nothing(store: Store) -> None:
    a = await store.acquire("A", "a:1", 30)
    term = Term("A", a.epoch)
    await store.write({("session", "s"): Session("s")}, term)
    await store.release(term)
    await store.acquire("B", "b:1", 30)
    with pytest.raises(NotLeader):
        await store.write({("session", "t"): Session("t")}, term)
    assert [s.session_id for s in (await store.load()).sessions] == ["s"]


# ------------------------------------------------------------------ migrations


def test_sqlite_migrates_from_empty_and_from_every_earlier_version(tmp_path: Path) -> None:
    from tether.coordinator import sqlite_store

    for previous in range(sqlite_store.VERSION):
        path = tmp_path / f"v{previous}.sqlite3"
        db = sqlite3.connect(path, isolation_level=None)
        for statement in ";".join(sqlite_store.MIGRATIONS[:previous]).split(";"):
            if statement.strip():
                db.execute(statement)
        if previous >= 2:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                       (str(previous),))
        if previous:
            db.execute("INSERT INTO sessions (session_id, window, labels, state, ttl, "
                       "lease_expires_at, stop_cause, created_at) "
                       "VALUES ('old', '', '{}', 'active', 0, 0, '', 1)")
        db.close()
        store = SQLiteStore(path)
        snap = asyncio.run(store.load())
        asyncio.run(store.close())
        assert [s.session_id for s in snap.sessions] == (["old"] if previous else [])
        assert snap.lineage
        check = sqlite3.connect(path)
        assert check.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() \
            == (str(sqlite_store.VERSION),)
        check.close()


def test_sqlite_refuses_a_schema_from_a_newer_tether(tmp_path: Path) -> None:
    from tether.coordinator import sqlite_store

    path = tmp_path / "new.sqlite3"
    asyncio.run(SQLiteStore(path).close())
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
               (str(sqlite_store.VERSION + 1),))
    db.close()
    with pytest.raises(StateFileError, match="newer than this tether knows"):
        SQLiteStore(path)


async def test_postgresql_migrates_from_empty_and_from_the_previous_version(
        pg_cluster: PgCluster) -> None:
    from tether.coordinator import postgres_store
    from tether.coordinator.postgres_store import PostgresStore

    for previous in range(postgres_store.VERSION):
        name = pg_cluster.create_database()
        try:
            if previous:
                pg_cluster.psql("CREATE TABLE tether_meta (key text PRIMARY KEY, "
                                "value text NOT NULL)", name)
                for sql in postgres_store.MIGRATIONS[:previous]:
                    pg_cluster.psql(sql, name)
                pg_cluster.psql(f"INSERT INTO tether_meta VALUES ('schema_version', "
                                f"'{previous}')", name)
            store = await PostgresStore.open(pg_cluster.url(name))
            await store.close()
            assert pg_cluster.psql("SELECT value FROM tether_meta WHERE "
                                   "key = 'schema_version'", name) == \
                str(postgres_store.VERSION)
        finally:
            pg_cluster.drop_database(name)


async def test_postgresql_coordinators_starting_together_migrate_once(pg_url: str) -> None:
    from tether.coordinator.postgres_store import PostgresStore

    stores = await asyncio.gather(*(PostgresStore.open(pg_url) for _ in range(4)))
    try:
        assert len({s.lineage for s in stores}) == 1
    finally:
        for s in stores:
            await s.close()


async def test_postgresql_refuses_a_schema_from_a_newer_tether(pg_cluster: PgCluster,
                                                                pg_url: str) -> None:
    from tether.coordinator import postgres_store
    from tether.coordinator.postgres_store import PostgresStore

    await (await PostgresStore.open(pg_url)).close()
    name = pg_url.rsplit("/", 1)[1]
    pg_cluster.psql(f"UPDATE tether_meta SET value = '{postgres_store.VERSION + 1}' "
                    "WHERE key = 'schema_version'", name)
    with pytest.raises(StateFileError, match=r"newer than this tether knows.*upgrade"):
        await PostgresStore.open(pg_url)


async def test_postgresql_errors_name_the_store_and_never_the_password(
        pg_cluster: PgCluster) -> None:
    from tether.coordinator.postgres_store import PostgresStore

    wrong = pg_cluster.url("postgres", password="not-the-password-123")
    with pytest.raises(StoreUnavailable) as refused:
        await PostgresStore.open(wrong)
    text = str(refused.value)
    assert "password authentication failed" in text and "not-the-password-123" not in text
    assert f"127.0.0.1:{pg_cluster.port}" in text and "***" in text

    missing = pg_cluster.url("no_such_database")
    with pytest.raises(StoreUnavailable, match=r"does not exist.*createdb"):
        await PostgresStore.open(missing)

    from tests.plugins.processes import free_port

    silent = f"postgresql://tether:pw@127.0.0.1:{free_port()}/x"
    with pytest.raises(StoreUnavailable, match=r"refused.*check that PostgreSQL runs"):
        await PostgresStore.open(silent)


async def test_postgresql_names_a_row_it_cannot_hold_and_the_writer_drops_only_it(
        pg_url: str) -> None:
    """review3 nul_registration_wedges_store: a row PostgreSQL refuses (a NUL in text)
    failed its batch and, retried with every later batch, wedged the store for good."""
    from tether.coordinator.postgres_store import PostgresStore
    from tether.core.writebehind import RowsRefused, WriteBehind

    store = await PostgresStore.open(pg_url)
    try:
        evil = AgentInfo("evil", "127.0.0.1:9", Containment.PGID, "1\0", "e1", 5.0)
        with pytest.raises(RowsRefused) as refused:
            await store.write({("agent", "evil"): evil, ("session", "s"): Session("s")})
        assert list(refused.value.refused) == [("agent", "evil")]
        assert (await store.load()).sessions == [], "the batch stays all or nothing"

        persist: WriteBehind[Any, Any] = WriteBehind(store.write, where=store.where)
        persist.put(("agent", "evil"), evil)
        persist.put(("session", "s"), Session("s"))
        await persist.durable(10)
        persist.put(("session", "t"), Session("t"))
        await persist.durable(10)
        snap = await store.load()
        assert sorted(s.session_id for s in snap.sessions) == ["s", "t"]
        assert snap.agents == [] and persist.pending == 0 and persist.failing_since is None
    finally:
        await store.close()


def test_store_urls_are_shown_without_any_secret_and_host_lists_are_taken() -> None:
    """review3 store_url_password_leak, multihost_store_url: a password given as a query
    parameter was shown as is, and a libpq host list made the coordinator refuse to start."""
    from tether.coordinator.store_url import redact, secrets_of

    assert redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db?sslmode=require&password=p%40ss&sslpassword=k") == \
        "postgresql://u@h/db?sslmode=require&password=***&sslpassword=***"
    multi = "postgresql://u:pw@db1:5432,db2:5433/t?target_session_attrs=read-write"
    assert redact(multi) == \
        "postgresql://u:***@db1:5432,db2:5433/t?target_session_attrs=read-write"
    assert secrets_of("postgresql://u@h/db?password=p%40ss") == ["p%40ss", "p@ss"]
    assert secrets_of("postgresql://u@h/db") == []
    # review6: a password with "?" or "/" in it (libpq connects with it) is masked too.
    assert redact("postgresql://u:pa?ss@h/db?sslmode=require") == \
        "postgresql://u:***@h/db?sslmode=require"
    assert redact("postgresql://u:p/w@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert secrets_of("postgresql://u:pa?ss@h/db") == ["pa?ss"]
