"""Output and stdio through the coordinator: ``Logs`` fanned out to the agents holding a
session's groups, ``Attach`` passed through to the agent holding the group.

``Logs`` asks each agent for its groups by id (never by session: the coordinator knows
which groups a session has, and a per-group stream ends by itself once the group's
output is complete). A session followed as a whole also picks up groups spawned after
the call began (from the session's own events), and ends once the session is stopped
and every group's output is complete. Chunks of one agent arrive in that agent's order
of capture, passed straight through; the backlogs of several agents are merged by
capture time (their clocks) holding one chunk per agent, their live output in the order
it arrives. One credential may have at most ``--max-logs-streams`` Logs calls open.
Between the agents and one follower sit at most ``FOLLOW_BYTES`` of output
(``FollowBuffer``): a follower that does not keep up loses its oldest output there (the
next chunk of that group tells it how many bytes, ``dropped``), never slowing a group
or the agents' streams. An agent that cannot be asked is said so, per group, in a ``tether`` note.

Groups whose output no agent captures (``tether.core.output.capture_gap``: docker and
ssh groups with ``--log`` or orphan policy ``keep``) are never asked for: a read of
only such groups, and an Attach to one, is refused (``Conflict``) saying why; a wider
read gives one ``not_captured`` note for each, so silence is never mistaken for output.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Final

from tether.core.errors import (
    AgentNotFound,
    Conflict,
    GroupNotFound,
    InvalidSpec,
    ResourceExhausted,
    TetherError,
)
from tether.core.model import EventKind, OrphanPolicy
from tether.core.output import (
    CHUNK_OVERHEAD,
    AttachOpen,
    LogQuery,
    Note,
    OutputChunk,
    StdinInput,
    Stream,
    capture_gap,
)
from tether.core.sessions import GroupEntry, GroupSelector, SessionEvent, SessionState

if TYPE_CHECKING:
    from tether.coordinator.core import Coordinator
    from tether.coordinator.model import TrackedGroup

#: Output bytes (chunk overhead counted) held between the agents' streams and one follower.
FOLLOW_BYTES: Final = 4 << 20
_DONE: Final = object()


class OutputRoutes:
    def __init__(self, c: Coordinator) -> None:
        self.c = c
        #: Logs calls open, per credential (``admit``/``leave``).
        self._streams: dict[str, int] = {}

    # ------------------------------------------------------------ Logs

    def logs(self, query: LogQuery, selector: GroupSelector) -> AsyncIterator[OutputChunk]:
        """See the module docstring. Raises now (not at the first chunk) for an unknown
        session, or a group or label the session does not have."""
        if not query.session_id:
            raise InvalidSpec("Logs through the coordinator needs the session", field="session_id")
        chosen = self.c.fanout.select(query.session_id, selector)
        # Groups whose output no agent captures (their target): said once, never asked for.
        gaps = [t for t in chosen if _gap(t)]
        if gaps and len(gaps) == len(chosen) and not selector.everything:
            raise Conflict(f"group {gaps[0].group_id} ({gaps[0].spec.target}): {_gap(gaps[0])}")
        chosen = [t for t in chosen if not _gap(t)]
        if query.follow:
            chunks = self._follow(query, chosen, selector.everything)
        else:
            chunks = self._backlog(query, chosen)
        return _prefixed([_uncaptured(t) for t in gaps], chunks) if gaps else chunks

    def _ask(self, agent: str, gids: list[str], query: LogQuery
             ) -> AsyncIterator[OutputChunk]:
        link = self.c.agents.links.get(agent)
        if link is None:
            raise AgentNotFound(agent, list(self.c.agents.links))
        return self.c.agents.client(link).logs(LogQuery(tuple(gids), tail=query.tail,
                                                         since=query.since,
                                                         follow=query.follow))

    async def _answers(self, agent: str, gids: list[str], query: LogQuery
                       ) -> AsyncIterator[OutputChunk]:
        """One agent's chunks as they come (no copy), or notes saying it could not answer."""
        chunks: AsyncIterator[OutputChunk] | None = None
        try:
            chunks = self._ask(agent, gids, query)
            async for chunk in chunks:
                yield replace(chunk, agent=agent)
        except TetherError as exc:
            for gid in gids:
                yield _trouble(agent, gid, exc)
        finally:
            if chunks is not None:
                await chunks.aclose()  # type: ignore[attr-defined]

    def _backlog(self, query: LogQuery, chosen: list[TrackedGroup]
                 ) -> AsyncIterator[OutputChunk]:
        return merge_backlogs([self._answers(agent, gids, query)
                               for agent, gids in _by_agent(chosen).items()])

    # -- how many Logs calls one credential may have open

    def admit(self, credential: str) -> None:
        """Count a new Logs call, or refuse it past ``--max-logs-streams``."""
        limit = self.c.config.max_logs_streams_per_credential
        if self._streams.get(credential, 0) >= limit:
            raise ResourceExhausted(
                f"this credential ({credential}) already has {self._streams[credential]} Logs "
                f"calls open, the most one credential may (--max-logs-streams {limit}); "
                "close some (a follower that is no longer read), or read a whole session "
                "in one call")
        self._streams[credential] = self._streams.get(credential, 0) + 1

    def leave(self, credential: str) -> None:
        n = self._streams.get(credential, 0) - 1
        if n > 0:
            self._streams[credential] = n
        else:
            self._streams.pop(credential, None)

    async def _follow(self, query: LogQuery, chosen: list[TrackedGroup], whole: bool
                      ) -> AsyncIterator[OutputChunk]:
        session = query.session_id
        queue = FollowBuffer()
        tasks: set[asyncio.Task[None]] = set()
        asked: set[tuple[str, str]] = set()
        state = {"running": 0, "stopped": False}

        def ask(agent: str, gids: list[str], q: LogQuery) -> None:
            asked.update((agent, g) for g in gids)
            state["running"] += 1
            tasks.add(asyncio.ensure_future(self._pump(agent, gids, q, queue)))

        def session_done() -> bool:
            s = self.c.session(session)
            return s.state is SessionState.STOPPED and not self.c.busy(session)

        events = self.c.watch_session(session, initial=False) if whole else None
        if whole:
            state["stopped"] = session_done()
        for agent, gids in _by_agent(chosen).items():
            ask(agent, gids, query)
        if events is not None:
            tasks.add(asyncio.ensure_future(self._newcomers(events, asked, ask, query,
                                                            queue, session_done)))
        try:
            while True:
                if state["running"] == 0 and (not whole or state["stopped"]):
                    return
                item = await queue.get()
                if item is _DONE:
                    state["running"] -= 1
                elif item is _STOPPED:
                    state["stopped"] = True
                else:
                    assert isinstance(item, OutputChunk)
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if events is not None:
                await events.aclose()  # type: ignore[attr-defined]

    async def _pump(self, agent: str, gids: list[str], query: LogQuery,
                    queue: FollowBuffer) -> None:
        try:
            async for chunk in self._ask(agent, gids, query):
                queue.put(replace(chunk, agent=agent))
        except TetherError as exc:
            for note in (_trouble(agent, gid, exc) for gid in gids):
                queue.put(note)
        queue.put(_DONE)  # (a cancelled pump: the reader is gone, nobody counts)

    @staticmethod
    async def _newcomers(events: AsyncIterator[SessionEvent], asked: set[tuple[str, str]],
                         ask: Callable[[str, list[str], LogQuery], None], query: LogQuery,
                         queue: FollowBuffer, session_done: Callable[[], bool]
                         ) -> None:
        """Groups spawned into a followed session after the call began, and its end."""
        async for ev in events:
            group = ev.group
            if group is not None and (group.agent, group.view.group_id) not in asked \
                    and capture_gap(group.view.spec.target, group.view.spec.log_path,
                                group.view.spec.orphan_policy is OrphanPolicy.KEEP):
                asked.add((group.agent, group.view.group_id))
                queue.put(_uncaptured(group))
            elif group is not None and (group.agent, group.view.group_id) not in asked:
                # Everything it wrote: it began after the reader did.
                ask(group.agent, [group.view.group_id], replace(query, tail=None, since=0.0))
            if ev.kind is EventKind.SESSION_STOPPED or session_done():
                queue.put(_STOPPED)

    # ------------------------------------------------------------ Attach

    def attach(self, opened: AttachOpen, inputs: AsyncIterator[StdinInput]
               ) -> AsyncIterator[OutputChunk]:
        if not opened.session_id:
            raise InvalidSpec("Attach through the coordinator needs the group's session",
                              field="session_id")
        found = self.c.fanout.select(opened.session_id, GroupSelector((opened.group_id,)))
        t = found[0]
        if _gap(t):
            raise Conflict(f"group {t.group_id} ({t.spec.target}): {_gap(t)}")
        link = self.c.agents.links.get(t.agent)
        if link is None:
            raise AgentNotFound(t.agent, list(self.c.agents.links))
        client = self.c.agents.client(link)
        return _with_agent(t.agent, client.attach(opened, inputs))


_STOPPED: Final = object()


class FollowBuffer:
    """What the agents' streams answered for one follower and it has not taken yet: at
    most ``limit`` bytes of output (each chunk's bytes and ``CHUNK_OVERHEAD``). Past it
    the oldest output chunk goes; the next chunk of its group taken after it tells the
    reader (``dropped``).
    Notes and the pumps' markers are never dropped."""

    def __init__(self, limit: int = FOLLOW_BYTES) -> None:
        self.limit = limit
        self.items: collections.deque[object] = collections.deque()
        #: Bytes held (what ``limit`` bounds).
        self.held = 0
        #: Per group: bytes dropped here not yet told to the reader, and the sequence
        #: number of the newest chunk dropped (a note held from before it is not told).
        self.lost: dict[str, tuple[int, int]] = {}
        self._ready = asyncio.Event()

    def put(self, item: object) -> None:
        self.items.append(item)
        if isinstance(item, OutputChunk) and item.is_output:
            self.held += len(item.data) + CHUNK_OVERHEAD
            while self.held > self.limit:
                self._drop_oldest()
        self._ready.set()

    def _drop_oldest(self) -> None:
        for i, old in enumerate(self.items):
            if isinstance(old, OutputChunk) and old.is_output:
                del self.items[i]
                self.held -= len(old.data) + CHUNK_OVERHEAD
                n, _ = self.lost.get(old.group_id, (0, 0))
                self.lost[old.group_id] = (n + len(old.data) + old.dropped, old.seq)
                return

    async def get(self) -> object:
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        item = self.items.popleft()
        if isinstance(item, OutputChunk):
            if item.is_output:
                self.held -= len(item.data) + CHUNK_OVERHEAD
            n, seq = self.lost.get(item.group_id, (0, 0))
            if n and (item.seq > seq or not item.seq):
                del self.lost[item.group_id]
                item = replace(item, dropped=item.dropped + n)
        return item


def _gap(t: TrackedGroup) -> str:
    return capture_gap(t.spec.target, t.spec.log_path,
                       t.spec.orphan_policy is OrphanPolicy.KEEP)


def _uncaptured(t: TrackedGroup | GroupEntry) -> OutputChunk:
    view = t.view
    gap = capture_gap(view.spec.target, view.spec.log_path,
                      view.spec.orphan_policy is OrphanPolicy.KEEP)
    return OutputChunk(view.group_id, Stream.TETHER, f"not captured: {gap}".encode(),
                       time.time(), event=Note.NOT_CAPTURED.value, session_id=view.spec.session_id,
                       label=view.spec.label, agent=t.agent)


async def _prefixed(first: list[OutputChunk], rest: AsyncIterator[OutputChunk]
                    ) -> AsyncIterator[OutputChunk]:
    try:
        for c in first:
            yield c
        async for c in rest:
            yield c
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _with_agent(agent: str, chunks: AsyncIterator[OutputChunk]
                      ) -> AsyncIterator[OutputChunk]:
    try:
        async for chunk in chunks:
            yield replace(chunk, agent=agent)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def merge_backlogs(streams: list[AsyncIterator[OutputChunk]]
                         ) -> AsyncIterator[OutputChunk]:
    """Several agents' backlogs merged by capture time (their clocks), holding one chunk
    per agent at a time (each agent's stream waits, by gRPC flow control, until its head
    was sent); one agent's passes straight through, in its own order of capture."""
    if len(streams) == 1:
        only = streams[0]
        try:
            async for chunk in only:
                yield chunk
        finally:
            await only.aclose()  # type: ignore[attr-defined]
        return
    heads: dict[int, OutputChunk] = {}
    try:
        firsts = await asyncio.gather(*(anext(s, None) for s in streams))
        heads = {i: c for i, c in enumerate(firsts) if c is not None}
        while heads:
            i = min(heads, key=lambda k: (heads[k].at, heads[k].seq))
            yield heads.pop(i)
            nxt = await anext(streams[i], None)
            if nxt is not None:
                heads[i] = nxt
    finally:
        for s in streams:
            with contextlib.suppress(RuntimeError):  # mid-read when cancelled: it closes itself
                await s.aclose()  # type: ignore[attr-defined]


def _by_agent(chosen: list[TrackedGroup]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in chosen:
        out.setdefault(t.agent, []).append(t.group_id)
    return out


def _trouble(agent: str, gid: str, exc: TetherError) -> OutputChunk:
    why = (f"agent {agent!r} no longer holds this group's output (it ended and was dropped "
           "from the agent's memory, or the agent restarted)" if isinstance(exc, GroupNotFound)
           else f"agent {agent!r} could not be asked: {exc}")
    return OutputChunk(gid, Stream.TETHER, f"{why}; this group's output may be incomplete"
                       .encode(), time.time(), event=Note.CAPTURE_LOST.value, agent=agent)
