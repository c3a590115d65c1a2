"""The agent's table of groups: one mutable record per group, idempotency keys, retention.

Only the authority's parts change a ``Group``; everybody else sees ``GroupView``
snapshots. Ended groups stay in the table for ``retain`` seconds (so a retried
call, or a coordinator that reconnects, still finds the record), at most
``retain_max`` of them, oldest dropped first.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from tether.core.errors import GroupNotFound, IdempotencyConflict, TetherError
from tether.core.model import (
    RUNS_KEPT,
    Containment,
    ExitRecord,
    GroupSpec,
    GroupState,
    GroupView,
    Probe,
    RunContext,
    RunRecord,
    StopPolicy,
)
from tether.signallers.base import GroupHandle, LaunchSpec, RunAs, Stdio

log = logging.getLogger(__name__)

DEFAULT_RETAIN = 600.0
DEFAULT_RETAIN_MAX = 10000
#: Group ids stopped before their spawn arrived (a session stop racing a spawn in flight).
TOMBSTONES_MAX = 10000


class GroupLog(logging.LoggerAdapter[logging.Logger]):
    """Every line about a group names it: ``[g-1a2b3c4d session=web] ...``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]
                ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        tags = " ".join(f"{k}={v}" for k, v in extra.items() if k != "group" and v)
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}  # fields for JSON logs
        return f"[{extra.get('group')}{' ' + tags if tags else ''}] {msg}", kwargs


class Group:
    """Mutable record of one group, owned by the authority."""

    def __init__(self, group_id: str, spec: GroupSpec, containment: Containment,
                 policy: StopPolicy, fingerprint: str = "") -> None:
        self.group_id = group_id
        self.spec = spec
        self.state = GroupState.STARTING
        self.containment = containment
        self.policy = policy
        self.fingerprint = fingerprint
        self.handle: GroupHandle | None = None
        self.exit: ExitRecord | None = None
        self.started_at = time.time()
        self.ended_at = 0.0
        self.detached = False
        self.unreachable = False
        self.signals_sent: set[int] = set()
        self.start_task: asyncio.Task[None] | None = None
        #: Set when a start ran but its outcome cannot be acknowledged (not recorded).
        self.start_error: TetherError | None = None
        self.stop_task: asyncio.Task[None] | None = None
        self.stop_requested = asyncio.Event()
        self.empty = asyncio.Event()
        self.ended = asyncio.Event()
        self.log = GroupLog(log, {"group": group_id, "session": spec.session_id,
                                  "traceparent": spec.traceparent})
        #: What it runs with beyond its spec (plugin changes, user, ports, limits).
        self.context = RunContext()
        #: The user it runs as (``--user``), resolved on this host.
        self.user: RunAs | None = None
        #: What was launched (probes and hooks run with the same environment and user).
        self.launch: LaunchSpec | None = None
        #: The readiness probe with its port references filled in.
        self.ready: Probe | None = spec.ready
        #: Run once when the group ends (releasing its ports).
        self.on_end: list[Callable[[], None]] = []
        # Supervision (agent/supervise.py): runs, restarts, liveness.
        #: Adopted: tether did not start it, so it cannot start it again.
        self.adopted = False
        #: ``time.time()`` when the current run was launched.
        self.run_started_at = self.started_at
        self.runs: collections.deque[RunRecord] = collections.deque(maxlen=RUNS_KEPT)
        self.restarts = 0
        #: ``time.monotonic()`` of recent automatic restarts (the restart limit's window).
        self.auto_restarts: collections.deque[float] = collections.deque()
        #: Runs in a row that ended before they were stable (the backoff's exponent).
        self.unstable_runs = 0
        #: Why the current run is being ended ("requested", "unhealthy"): it restarts
        #: whatever the restart policy says.
        self.restart_reason = ""
        #: Set to cut a restart's backoff short (a restart request while waiting).
        self.restart_now = asyncio.Event()
        #: Resolved when the restart under way is over (running again, or ended).
        self.restart_cycle: asyncio.Future[None] | None = None
        #: Why the last requested restart could not end the run (empty: it could).
        self.restart_error = ""
        self.next_restart_at = 0.0
        self.unhealthy = False
        self.health = ""
        self.live_task: asyncio.Task[None] | None = None
        # Standard streams (agent/capture.py).
        #: The current run's captured stdio (None between runs, or when not captured).
        self.stdio: Stdio | None = None
        #: Who holds the stdin writer role (an Attach), if anybody.
        self.stdin_writer = ""
        #: Taken back after an agent restart (its output pipes died with that agent).
        self.readopted = False

    def __repr__(self) -> str:
        pid = self.handle.leader_pid if self.handle else "-"
        return f"<Group {self.group_id} {self.state.value} pid={pid} {self.containment.value}>"

    def attach(self, handle: GroupHandle) -> None:
        self.handle = handle
        self.containment = handle.containment
        self.log = GroupLog(log, {"group": self.group_id, "session": self.spec.session_id,
                                  "pid": handle.leader_pid,
                                  "traceparent": self.spec.traceparent})

    def view(self, member_count: int = 0) -> GroupView:
        h = self.handle
        return GroupView(
            group_id=self.group_id, spec=self.spec, state=self.state,
            containment=self.containment, stop=self.policy,
            leader_pid=h.leader_pid if h else 0, pgid=h.pgid if h else 0,
            detached=self.detached, unreachable=self.unreachable, exit=self.exit,
            started_at=self.started_at, member_count=member_count,
            leader_start_time=h.leader_start_time if h else 0.0,
            cgroup=h.cgroup if h else "",
            context=self.context,
            unhealthy=self.unhealthy, health=self.health, restarts=self.restarts,
            runs=tuple(self.runs) if self.runs else (), next_restart_at=self.next_restart_at,
            stdin_open=self.stdio is not None and self.stdio.stdin_open,
            stdin_writer=self.stdin_writer,
        )


class GroupTable:
    def __init__(self, retain: float = DEFAULT_RETAIN,
                 retain_max: int = DEFAULT_RETAIN_MAX) -> None:
        self.retain = retain
        self.retain_max = retain_max
        self._groups: dict[str, Group] = {}
        self._keys: dict[str, str] = {}
        self._key_of: dict[str, str] = {}
        self._ended: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[Group]:
        return iter(list(self._groups.values()))

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._groups

    def add(self, g: Group, key: str = "") -> None:
        self._groups[g.group_id] = g
        if key:
            self._keys[key] = g.group_id
            self._key_of[g.group_id] = key

    def find(self, group_id: str) -> Group:
        try:
            return self._groups[group_id]
        except KeyError:
            raise GroupNotFound(group_id) from None

    def by_key(self, key: str, fingerprint: str) -> Group | None:
        """The group a key was used for, if the request matches; raises on a mismatch."""
        gid = self._keys.get(key) if key else None
        if gid is None:
            return None
        g = self._groups.get(gid)
        if g is None:
            del self._keys[key]  # forgotten by retention: the key is free again
            return None
        if g.fingerprint != fingerprint:
            raise IdempotencyConflict(key, gid)
        return g

    def live_ids(self) -> set[str]:
        return {gid for gid, g in self._groups.items() if not g.state.ended}

    def views(self, session_id: str = "", include_ended: bool = True) -> list[GroupView]:
        return [g.view() for g in self._groups.values()
                if (not session_id or g.spec.session_id == session_id)
                and (include_ended or not g.state.ended)]

    # -- tombstones: stops that arrived before their spawn

    def bury(self, group_id: str, why: str) -> None:
        self._tombstones[group_id] = why
        while len(self._tombstones) > TOMBSTONES_MAX:
            self._tombstones.popitem(last=False)

    def buried(self, group_id: str) -> str | None:
        return self._tombstones.get(group_id)

    # -- retention

    def ended(self, g: Group) -> None:
        g.ended_at = time.monotonic()
        self._ended[g.group_id] = g.ended_at

    def expire(self, now: float | None = None) -> list[str]:
        """Drop ended groups past retention; returns their ids."""
        now = time.monotonic() if now is None else now
        dropped = []
        while self._ended:
            gid, at = next(iter(self._ended.items()))
            if now - at < self.retain and len(self._ended) <= self.retain_max:
                break
            self._ended.popitem(last=False)
            self._groups.pop(gid, None)
            key = self._key_of.pop(gid, None)
            if key is not None:
                self._keys.pop(key, None)
            dropped.append(gid)
        return dropped

    def forget(self, group_id: str) -> bool:
        """Drop an ended group now (``tether forget``), as retention would later. A live
        group is never dropped: returns False."""
        g = self._groups.get(group_id)
        if g is None or not g.state.ended:
            return False
        self._ended.pop(group_id, None)
        del self._groups[group_id]
        key = self._key_of.pop(group_id, None)
        if key is not None:
            self._keys.pop(key, None)
        return True

    def restore(self, groups: Iterable[Group]) -> None:
        for g in groups:
            self.add(g)
            if g.state.ended:
                self.ended(g)
