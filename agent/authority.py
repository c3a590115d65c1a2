"""The authority: the agent's one door to its groups.

Every group is started (``start.py``), watched (``watch.py``), signalled and
stopped (``stop.py``) through a signaller's ``GroupHandle``; nothing here
branches on the kind of target. States change only through
``Lifecycle.transition`` and the model's table.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterable

from tether.agent.capacity import Capacity
from tether.agent.capture import Attachment, refuse_uncaptured, uncaptured
from tether.agent.groups import Group
from tether.agent.hooks import Hooks
from tether.agent.lifecycle import Lifecycle
from tether.agent.plugins import Plugins
from tether.agent.ports import PortBook
from tether.agent.start import Starter
from tether.agent.stop import Stopper
from tether.agent.supervise import Supervisor
from tether.agent.watch import Watcher
from tether.core.errors import GroupNotFound, InvalidSpec, TetherError
from tether.core.model import (
    Containment,
    EventKind,
    ExitReason,
    ExitRecord,
    GroupEvent,
    GroupSpec,
    GroupState,
    GroupView,
    OrphanPolicy,
    PortOwner,
    RestartMode,
    RunContext,
    SignalOutcome,
    StopOverride,
    StopPolicy,
    Transition,
    UnhealthyAction,
)
from tether.core.output import AttachOpen, LogQuery, OutputBook, OutputChunk
from tether.signallers.base import GroupHandle, RunAs
from tether.signallers.registry import Signallers, split_target

Signals = signal.Signals

#: How often ended groups past retention are dropped from memory.
EXPIRE_EVERY = 30.0


class Authority:
    """Spawns, adopts, watches, signals and stops the groups of one agent."""

    def __init__(self, name: str, signallers: Signallers, hooks: Hooks | None = None,
                 default_grace: float | None = None, *, marker: str = "",
                 capacity: Capacity | None = None, plugins: Plugins | None = None,
                 ports: PortBook | None = None, output: OutputBook | None = None) -> None:
        self.name = name
        self.signallers = signallers
        self.hooks = hooks or Hooks()
        default = StopPolicy() if default_grace is None else StopPolicy(grace=default_grace)
        self.lc = Lifecycle(name, signallers, self.hooks, marker or name)
        if output is not None:
            self.lc.outputs.book = output
        self.watcher = Watcher(self.lc)
        self.stopper = Stopper(self.lc)
        self.ports = ports if ports is not None else PortBook(marker or name, agent=name)
        self.ports.lookup = self._port_lookup
        self.plugins = plugins if plugins is not None else Plugins()
        self.plugins.on_failure = self.hooks.plugin_failure
        self.starter = Starter(self.lc, default, capacity, self._follow, self._stop_now,
                               self.plugins, self.ports)
        self.supervisor = Supervisor(self.lc, self.starter, self.stopper)
        self.watcher.run_ended = self.supervisor.run_ended
        self._expiry: asyncio.Task[None] | None = None

    @property
    def marker(self) -> str:
        return self.lc.marker

    @property
    def epoch_seq(self) -> int:
        return self.lc.events.seq

    async def no_stops_running(self) -> None:
        """Return once no stop is in progress (background work waits for a batch to end)."""
        await self.stopper.idle()

    # ------------------------------------------------------------ queries

    def get(self, group_id: str) -> GroupView:
        return self.lc.table.find(group_id).view()

    def find(self, group_id: str) -> Group:
        return self.lc.table.find(group_id)

    def views(self, session_id: str = "", include_ended: bool = True) -> list[GroupView]:
        return self.lc.table.views(session_id, include_ended)

    def groups(self) -> Iterable[Group]:
        return iter(self.lc.table)

    def live_ids(self) -> set[str]:
        return self.lc.table.live_ids()

    async def member_count(self, group_id: str) -> int:
        g = self.lc.table.find(group_id)
        if g.handle is None or g.state.ended:
            return 0
        try:
            return len(await g.handle.members())
        except TetherError:
            return 0

    def _port_lookup(self, group_id: str) -> tuple[str, str, dict[int, str]] | None:
        try:
            g = self.lc.table.find(group_id)
        except TetherError:
            return None
        return (g.spec.session_id, g.spec.label,
                {p.port: p.name for p in g.context.ports})

    async def list_ports(self, port: int = 0) -> list[PortOwner]:
        """Listening TCP ports on this host (or one) and who owns each: a group of this
        agent (session, group, label) or a process (pid, user, command)."""
        return await self.ports.owners(port)

    def watch(self, accept: Callable[[GroupEvent], bool],
              initial: Iterable[GroupView] = (), since: int = 0) -> AsyncIterator[GroupEvent]:
        """Events as they happen. First either the events after sequence ``since`` (if
        still kept), or a snapshot (``initial``) as ``INITIAL`` events."""
        events = self.lc.events
        first: list[GroupEvent] | None = None
        if since:
            missed = events.missed(since)
            first = [e for e in missed if accept(e)] if missed is not None else None
        if first is None:
            now = time.time()
            first = [GroupEvent(events.seq, EventKind.INITIAL, v, now) for v in initial]
        return events.subscribe(accept, first)

    # ------------------------------------------------------------ actions

    async def spawn(self, spec: GroupSpec, idempotency_key: str = "",
                    group_id: str = "") -> GroupView:
        self._start_expiry()
        return await self.starter.spawn(spec, idempotency_key, group_id)

    async def adopt(self, pid: int, start_time: float | None, spec: GroupSpec) -> GroupView:
        if spec.restart.mode is not RestartMode.NO or (
                spec.liveness is not None
                and spec.liveness.on_unhealthy is UnhealthyAction.RESTART):
            raise InvalidSpec("an adopted group cannot be restarted: tether did not start it, "
                              "so it cannot start it again; adopt it with --restart no and "
                              "--on-unhealthy none or stop", field="restart")
        self._start_expiry()
        return await self.starter.adopt(pid, start_time, spec)

    async def signal(self, group_id: str, sig: Signals) -> SignalOutcome:
        return await self.stopper.signal(group_id, sig)

    async def stop(self, group_id: str, override: StopOverride | StopPolicy | None = None,
                   requested_at: float | None = None) -> GroupView:
        """Stop a group; idempotent, and concurrent stops share one run. The grace runs from
        ``requested_at`` (``time.monotonic()``; default: now)."""
        return await self.stopper.stop(group_id, _override(override), requested_at)

    async def stop_groups(self, stops: Iterable[tuple[str, StopOverride | None]],
                          requested_at: float | None = None
                          ) -> tuple[list[GroupView], dict[str, str]]:
        return await self.stopper.stop_many(stops, requested_at)

    async def stop_many(self, stops: Iterable[tuple[str, StopOverride | StopPolicy | None]],
                        requested_at: float | None = None) -> list[GroupView]:
        views, _ = await self.stopper.stop_many(
            ((gid, _override(o)) for gid, o in stops), requested_at)
        return views

    async def stop_all(self, which: Callable[[Group], bool] = lambda g: True) -> list[GroupView]:
        """Stop many groups at once (used by shutdown and session stops)."""
        return await self.stop_many(
            (g.group_id, None) for g in self.lc.table if not g.state.ended and which(g))

    async def restart(self, group_id: str, override: StopOverride | StopPolicy | None = None
                      ) -> GroupView:
        """End a running group's run and start it again in place (same id and spec, through
        its readiness probe); the old run's record stays in ``runs``. Concurrent restarts of
        one group share one; a stop meanwhile wins."""
        return await self.supervisor.restart(self.lc.table.find(group_id), _override(override))

    def forget(self, group_ids: Iterable[str]) -> tuple[list[str], dict[str, str]]:
        """Drop ended groups from memory now (they leave later snapshots too); live or
        unknown ones are left, with the reason."""
        done: list[str] = []
        errors: dict[str, str] = {}
        for gid in group_ids:
            g = self.lc.table.find(gid) if gid in self.lc.table else None
            if g is None:
                errors[gid] = f"no group {gid!r} on this agent"
            elif not g.state.ended:
                errors[gid] = f"group {gid} is {g.state.value}; only ended groups are forgotten"
            elif self.lc.table.forget(gid):
                done.append(gid)
                self.lc.outputs.forget(gid)
                self.hooks.group_forgotten(gid)
        return done, errors

    def _follow(self, g: Group) -> None:
        """A run's handle was attached: capture its output, watch it, and supervise it
        (liveness)."""
        self.lc.outputs.begin(g)
        self.watcher.start(g)
        self.supervisor.follow(g)

    # ------------------------------------------------------------ output and stdin

    @property
    def output(self) -> OutputBook:
        return self.lc.outputs.book

    def logs(self, query: LogQuery) -> AsyncIterator[OutputChunk]:
        """Captured output (``tether.core.output.OutputBook.read``). An unknown group id is
        ``GroupNotFound`` now; a known group whose ring is not made yet gets one."""
        groups = [self.lc.table.find(gid) for gid in query.group_ids]
        if groups and all(uncaptured(g) for g in groups):
            refuse_uncaptured(groups[0])  # asked for these alone: nothing would ever come
        for g in groups:
            self.lc.outputs.open(g)
        return self.lc.outputs.read(query)

    def attach(self, opened: AttachOpen) -> Attachment:
        """Attach to a group's stdio (see ``agent/capture.py``): raises ``Conflict`` for a
        second writer (naming the holder) or a group without ``--stdin pipe``."""
        g = self.lc.table.find(opened.group_id)
        if opened.session_id and g.spec.session_id != opened.session_id:
            raise GroupNotFound(opened.group_id)
        return self.lc.outputs.attach(g, opened)

    async def _stop_now(self, g: Group, detail: str) -> None:
        await asyncio.shield(self.stopper.begin(g, None, time.monotonic(), detail,
                                                from_start=True))

    async def escalate(self) -> None:
        await self.stopper.escalate()

    async def shutdown(self) -> None:
        """Stop every group whose orphan policy is ``kill``; leave ``keep`` ones running."""
        await self.stop_all(lambda g: g.spec.orphan_policy is OrphanPolicy.KILL)
        if self._expiry is not None:
            self._expiry.cancel()
        await self.lc.tasks.cancel_all()
        self.lc.events.close()
        self.plugins.close()
        self.ports.close()

    # ------------------------------------------------------------ retention

    def _start_expiry(self) -> None:
        if self._expiry is None:
            self._expiry = self.lc.tasks.spawn(self._expire_loop(), "expire")

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            for gid in self.lc.table.expire():
                self.lc.outputs.forget(gid)
                self.hooks.group_forgotten(gid)

    # ------------------------------------------------------------ restart recovery

    def restore_lost(self, group_id: str, spec: GroupSpec, containment: Containment,
                     detail: str) -> GroupView:
        """A group from the state file that vanished while no agent watched it."""
        g = Group(group_id, spec, containment, spec.stop.apply(self.starter.default_policy))
        g.state = GroupState.RUNNING  # as it was recorded: loading, not a transition
        self.lc.table.add(g)
        g.exit = ExitRecord(ExitReason.LOST, ended_at=time.time(), detail=detail)
        self.lc.transition(g, Transition.EXITED)
        return g.view()

    async def restore_running(self, group_id: str, spec: GroupSpec, handle: GroupHandle,
                              context: RunContext | None = None, user: RunAs | None = None
                              ) -> GroupView:
        """Re-adopt a `keep` group that survived the agent (PID and start time checked),
        with what it ran with (its ports are reserved again, its next run launches as its
        first did)."""
        g = Group(group_id, spec, handle.containment,
                  spec.stop.apply(self.starter.default_policy))
        g.state = GroupState.RUNNING  # as it was recorded: loading, not a transition
        context = context or RunContext()
        g.context = context
        g.user = user
        g.readopted = True
        if context.ports:
            self.ports.restore(group_id, context.ports)
            g.on_end.append(lambda: self.ports.release(group_id))
        kind, where = split_target(spec.target)
        await self.starter.restore_launch(g, self.lc.signallers.get(kind), where)
        g.attach(handle)
        self.lc.table.add(g)
        g.log.info("re-adopted after agent restart (leader pid %d)", handle.leader_pid)
        self.lc.emit(g, EventKind.STATE)
        self._follow(g)
        return g.view()


def _override(policy: StopOverride | StopPolicy | None) -> StopOverride | None:
    if isinstance(policy, StopPolicy):
        return StopOverride(policy.signal, policy.grace)
    return policy
