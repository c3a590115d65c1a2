"""The agent's local state file (SQLite): enough to re-adopt or clean up after a crash.

One row per live group: leader pid and start time (PID-reuse guard), cgroup
directory, orphan policy, state, and the spec. A group's row is deleted once it
has ended (its record lives on in the coordinator and in the agent's memory).

Acknowledged means durable: changes are written behind (``core/writebehind.py``) on
one thread of their own, never on the event loop; a spawn waits on ``durable()``
before it starts anything and again before it answers. A failed write (disk full,
I/O error) keeps the changes, is counted (``tether_state_write_errors_total``) and
retried.

The file, its directory and SQLite's WAL files are private (0600/0700): specs hold
environment values.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tether.agent.hooks import Hooks
from tether.agent.statefile import SCHEMA, GroupRecord, to_record
from tether.core.errors import StateFileError
from tether.core.model import GroupView, context_to_dict, spec_to_dict
from tether.core.private import private_dir, touch_private
from tether.core.writebehind import WriteBehind

log = logging.getLogger(__name__)

ADVICE = ("move it aside (e.g. `mv {path} {path}.broken`) and start the agent again: it then "
          "starts with no record, and processes its earlier run left (keep groups included) "
          "are found as orphans and killed, or only reported with --orphan-reaping report")


def row_of(view: GroupView) -> tuple[Any, ...]:
    exit_ = {}
    if view.exit is not None:
        exit_ = {"reason": view.exit.reason.value, "detail": view.exit.detail}
    spec = spec_to_dict(view.spec)
    if view.context:
        # What it ran with (ports to reserve again after a restart); spec_from_dict ignores it.
        spec["run_context"] = context_to_dict(view.context)
    return (view.group_id, view.state.value, view.spec.orphan_policy.value, view.leader_pid,
            view.leader_start_time, view.pgid, view.cgroup, view.containment.value,
            view.spec.target, view.spec.session_id, json.dumps(spec), json.dumps(exit_))


class AgentStore(Hooks):
    """Persists every group change; a ``Hooks`` implementation for the authority."""

    def __init__(self, path: Path | str, on_error: Callable[[], None] = lambda: None) -> None:
        self.path = str(path)
        private_dir(Path(self.path).parent)
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tether-state")
        try:
            self.db = self._io.submit(self._open).result()
        except sqlite3.DatabaseError as exc:
            self._io.shutdown()
            raise StateFileError(self.path, str(exc), ADVICE.format(path=self.path)) from exc
        self._behind: WriteBehind[str, GroupView] = WriteBehind(
            self._write, where=f"state file {self.path}", on_error=on_error)

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
        self._behind.put(view.group_id, view)

    async def durable(self, timeout: float) -> None:
        await self._behind.durable(timeout)

    # -- writing, on the store's own thread

    async def _write(self, batch: Mapping[str, GroupView]) -> None:
        live = [row_of(v) for v in batch.values() if not v.state.ended]
        ended = [(v.group_id,) for v in batch.values() if v.state.ended]
        await asyncio.get_running_loop().run_in_executor(self._io, self._commit, live, ended)

    def _commit(self, live: list[tuple[Any, ...]], ended: list[tuple[str]]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            if live:
                self.db.executemany(
                    "INSERT OR REPLACE INTO groups VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", live)
            if ended:
                self.db.executemany("DELETE FROM groups WHERE group_id = ?", ended)

    # -- reading (start-up)

    async def records(self) -> list[GroupRecord]:
        def read() -> list[GroupRecord]:
            return [to_record(r) for r in self.db.execute("SELECT * FROM groups").fetchall()]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._io, read)
        except (sqlite3.DatabaseError, ValueError, KeyError) as exc:
            raise StateFileError(self.path, str(exc), ADVICE.format(path=self.path)) from exc

    async def forget_ended(self) -> None:
        def delete() -> None:
            self.db.execute("DELETE FROM groups WHERE state IN ('stopped', 'exited', 'failed')")

        await asyncio.get_running_loop().run_in_executor(self._io, delete)

    async def aclose(self) -> None:
        """Write what is pending (one last try) and close."""
        await self._behind.drain()
        await asyncio.get_running_loop().run_in_executor(self._io, self.db.close)
        self._io.shutdown()

    def close_now(self) -> None:
        """Close without writing (a start that failed before anything happened)."""
        self._io.submit(self.db.close).result()
        self._io.shutdown()
