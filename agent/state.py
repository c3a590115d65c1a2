"""The agent's local state file (SQLite): enough to re-adopt or clean up after a crash.

One row per live group: leader pid and start time (PID-reuse guard), cgroup
directory, orphan policy, state, and the spec. A group's row is deleted once it
has ended (its record lives on in the coordinator and in the agent's memory).

Acknowledged means durable: writes happen on one thread of their own (never on
the event loop), in one transaction per batch of changes; ``durable()`` returns
once everything reported so far is committed, and a spawn waits for it before it
starts anything and again before it answers. A failed write (disk full, I/O
error) keeps the pending changes, is counted
(``tether_state_write_errors_total``) and retried with backoff; a caller waiting
on ``durable()`` gets ``StateUnwritable`` at its deadline.

The file, its directory and SQLite's WAL files are private (0600/0700): specs hold
environment values.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tether.agent.hooks import Hooks
from tether.agent.statefile import SCHEMA, GroupRecord, to_record
from tether.core.errors import StateFileError, StateUnwritable
from tether.core.model import GroupView, spec_to_dict
from tether.core.private import private_dir, touch_private

log = logging.getLogger(__name__)

RETRY_FIRST = 0.1
RETRY_MAX = 5.0

ADVICE = ("move it aside (e.g. `mv {path} {path}.broken`) and start the agent again: it then "
          "starts with no record, and processes its earlier run left (keep groups included) "
          "are found as orphans and killed, or only reported with --orphan-reaping report")


def row_of(view: GroupView) -> tuple[Any, ...]:
    exit_ = {}
    if view.exit is not None:
        exit_ = {"reason": view.exit.reason.value, "detail": view.exit.detail}
    return (view.group_id, view.state.value, view.spec.orphan_policy.value, view.leader_pid,
            view.leader_start_time, view.pgid, view.cgroup, view.containment.value,
            view.spec.target, view.spec.session_id, json.dumps(spec_to_dict(view.spec)),
            json.dumps(exit_))


class AgentStore(Hooks):
    """Persists every group change; a ``Hooks`` implementation for the authority."""

    def __init__(self, path: Path | str,
                 on_error: Callable[[], None] = lambda: None) -> None:
        self.path = str(path)
        self.on_error = on_error
        private_dir(Path(self.path).parent)
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tether-state")
        self._pending: dict[str, tuple[int, GroupView]] = {}
        self._version = 0
        self._written = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.last_error = ""
        try:
            self.db = self._io.submit(self._open).result()
        except sqlite3.DatabaseError as exc:
            self._io.shutdown()
            raise StateFileError(self.path, str(exc), ADVICE.format(path=self.path)) from exc

    def _open(self) -> sqlite3.Connection:
        touch_private(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            db.execute("SELECT count(*) FROM groups").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # -- Hooks

    def group_changed(self, view: GroupView) -> None:
        """Queued; written at the end of this event-loop turn with every other change."""
        self._version += 1
        self._pending[view.group_id] = (self._version, view)
        self._schedule()

    def _schedule(self, delay: float = 0.0) -> None:
        if self._flushing is None or self._flushing.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (closing): close() writes what is left
            self._flushing = loop.create_task(self._flush_loop(delay), name="state-flush")

    async def durable(self, timeout: float) -> None:
        target = self._version
        if self._written >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._schedule()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            raise StateUnwritable(self.path, self.last_error or "the write did not finish "
                                  f"within {timeout:g} s") from None

    # -- writing

    async def _flush_loop(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        backoff = RETRY_FIRST
        if delay:
            await asyncio.sleep(delay)
        while self._pending:
            batch = dict(self._pending)
            upto = self._version  # every change up to here is in the batch or written
            try:
                await loop.run_in_executor(self._io, self._write, list(batch.values()))
            except Exception as exc:  # sqlite3.Error, OSError: whatever it is, keep the data
                self.last_error = str(exc) or type(exc).__name__
                self.on_error()
                log.error("cannot write state file %s: %s; keeping %d change(s), retrying in "
                          "%.1f s", self.path, exc, len(batch), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            self.last_error = ""
            backoff = RETRY_FIRST
            for gid, (version, _) in batch.items():
                if self._pending.get(gid, (0,))[0] == version:
                    del self._pending[gid]
            self._written = upto
            done = [(t, f) for t, f in self._waiters if t <= self._written]
            self._waiters = [(t, f) for t, f in self._waiters if t > self._written]
            for _, fut in done:
                if not fut.done():
                    fut.set_result(None)

    def _write(self, items: list[tuple[int, GroupView]]) -> None:
        live = [row_of(v) for _, v in items if not v.state.ended]
        ended = [(v.group_id,) for _, v in items if v.state.ended]
        with self.db:
            self.db.execute("BEGIN")
            if live:
                self.db.executemany(
                    "INSERT OR REPLACE INTO groups VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", live)
            if ended:
                self.db.executemany("DELETE FROM groups WHERE group_id = ?", ended)

    # -- reading (start-up)

    def _read(self) -> list[GroupRecord]:
        return [to_record(r) for r in self.db.execute("SELECT * FROM groups").fetchall()]

    async def records(self) -> list[GroupRecord]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._io, self._read)
        except (sqlite3.DatabaseError, ValueError, KeyError) as exc:
            raise StateFileError(self.path, str(exc), ADVICE.format(path=self.path)) from exc

    async def forget_ended(self) -> None:
        def delete() -> None:
            self.db.execute("DELETE FROM groups WHERE state IN ('stopped', 'exited', 'failed')")

        await asyncio.get_running_loop().run_in_executor(self._io, delete)

    def close(self) -> None:
        """Write what is pending (one last try) and close."""
        items = list(self._pending.values())

        def final() -> None:
            if items:
                try:
                    self._write(items)
                except sqlite3.Error as exc:
                    log.error("state file %s: %d change(s) could not be written at shutdown: "
                              "%s", self.path, len(items), exc)
            self.db.close()

        if self._flushing is not None:
            self._flushing.cancel()
        self._io.submit(final).result()
        self._io.shutdown()
