"""Captured output: what groups wrote to stdout and stderr, in bounded rings, for readers.

Every group of an agent has one ring (``OutputRing``) holding its most recent output as
chunks: the bytes as they were read (NUL bytes and invalid UTF-8 included), when, from
which stream, and from which run. The ring survives restarts (a ``run_started`` note
marks each new run) and goes when the group leaves the agent's memory.

One rule for memory, the same everywhere: a ring holds at most its capacity (the
agent's ``--output-buffer``, 1 MiB by default, less when the agent's total budget
``--output-total`` is shared by many groups); appending past it drops the oldest chunks.
All rings together hold at most ``--output-total``: ended groups' rings give up their
output first (``OutputBook._bound``).
Nothing ever waits for a reader: a writer faster than its readers loses its oldest
output, never its speed, and each reader is told how many bytes it will not see
(``OutputChunk.dropped``), exactly, when a follower falls behind.

Readers (``OutputBook.read``) hold no copy and no queue: a cursor per ring (the last
sequence number delivered, the next byte offset expected). Every chunk of an agent has
one sequence number, so a session's groups interleave in the order their output was
read. Nothing here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import enum
import heapq
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Final

from tether.core.errors import GroupNotFound, InvalidSpec

#: Default capacity of one group's ring (``--output-buffer``).
DEFAULT_RING: Final = 1 << 20
#: Default budget of all rings of an agent together (``--output-total``).
DEFAULT_TOTAL: Final = 128 << 20
#: A ring never shrinks below this to share the total among many groups.
MIN_RING: Final = 64 << 10
#: What one chunk costs beyond its bytes (the object, the deque slot): counted, so a group
#: writing one byte at a time cannot hold a thousand times its capacity.
CHUNK_OVERHEAD: Final = 160
#: Times of drops a ring remembers for ``since`` readers (exact up to this many).
DROP_INDEX: Final = 1024
#: The most lines ``tail`` may ask for (more than any ring holds).
MAX_TAIL: Final = 1 << 31


class Stream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"
    #: A note from tether itself (run boundaries, capture changes), UTF-8 text.
    TETHER = "tether"


class Note(enum.StrEnum):
    """What a ``TETHER`` chunk says (its ``event``)."""

    RUN_STARTED = "run_started"
    RUN_ENDED = "run_ended"
    #: This run's output is not captured (an adopted or re-adopted group, a target that
    #: cannot).
    NOT_CAPTURED = "not_captured"
    #: Capture of this run ended before the run did (an SSH connection dropped).
    CAPTURE_LOST = "capture_lost"
    #: Something about the output the reader should know (the --log tee fell behind).
    WARNING = "warning"
    #: The group ended and every byte it wrote has been read: nothing more will come.
    OUTPUT_ENDED = "output_ended"
    #: Attach only: the attachment is in place (data: "writer" or "reader").
    ATTACHED = "attached"
    #: Attach only, to the writer: the program's stdin is closed (every byte written
    #: before was handed to the pipe): the acknowledgement ``close_stdin`` waits for.
    STDIN_CLOSED = "stdin_closed"


@dataclass(frozen=True)
class OutputChunk:
    group_id: str
    stream: Stream
    data: bytes
    #: ``time.time()`` when it was read.
    at: float
    #: 1 for the first run, 2 after the first restart, ...
    run: int = 1
    #: Position of ``data[0]`` in the group's output (stdout and stderr bytes ever
    #: captured, all runs); notes do not advance it.
    offset: int = 0
    #: Agent-wide order of capture (interleaving of a session's groups).
    seq: int = 0
    #: For this reader: bytes of this group's output older than this chunk that it
    #: wanted and will never get (dropped oldest-first: a ring that overflowed).
    dropped: int = 0
    #: For ``TETHER`` chunks: what happened (a ``Note`` value).
    event: str = ""
    session_id: str = ""
    label: str = ""
    #: Filled in by the coordinator.
    agent: str = ""

    @property
    def is_output(self) -> bool:
        return self.stream is not Stream.TETHER

    @property
    def text(self) -> str:
        """The bytes as text (invalid UTF-8 replaced): for people, never for programs."""
        return self.data.decode("utf-8", errors="replace")


def capture_gap(target: str, log_path: str = "", keep: bool = False) -> str:
    """Why the agent does not capture the output of a group on ``target`` ("": it does).
    Local groups always; docker and ssh groups without ``--log`` (with one, the program's
    output goes to that file on the target) whose orphan policy is kill (``keep``: a
    docker group's exec ends at its next write once its attached reader is gone; an ssh
    group's spool would grow on its host with nobody to read or remove it once its agent
    is gone), so a group whose output the agent read could not outlive the agent."""
    kind = (target or "local").partition(":")[0]
    if kind == "local" or (kind in ("docker", "ssh") and not log_path and not keep):
        return ""
    if kind == "docker":
        where = (f"its output goes to its --log {log_path} inside the container" if log_path
                 else "its output is discarded (give it a --log inside the container)")
        why = ("tether captures a docker group's output only when it has no --log"
               if log_path else "a keep group must outlive its agent, and the Engine ends "
               "an exec at its next write once its attached reader is gone")
        return f"{where}; {why}"
    if kind == "ssh":
        where = (f"its output goes to its --log {log_path} on that host" if log_path
                 else "its output is discarded (give it a --log on that host)")
        why = ("tether captures an ssh group's output only when it has no --log"
               if log_path else "a keep group must outlive its agent, and its spool on the "
               "host would then have nobody to read or remove it")
        return f"{where}; {why}"
    return (f"target {target} does not capture output: its stdout and stderr go to its "
            f"--log{f' ({log_path})' if log_path else ', and it has none: nowhere'}")


def check_tail(tail: int | None) -> int | None:
    if tail is None:
        return None
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < 0:
        raise InvalidSpec(f"tail {tail!r} is not a number of lines; give 0 or more",
                          field="tail")
    return min(tail, MAX_TAIL)


def check_since(since: float) -> float:
    if isinstance(since, bool) or not isinstance(since, int | float) or math.isnan(since) \
            or since < 0 or math.isinf(since):
        raise InvalidSpec(f"since {since!r} is not a time; give seconds since the epoch (0: "
                          "everything kept)", field="since")
    return float(since)


@dataclass(frozen=True)
class LogQuery:
    """Which output a reader wants: the groups (ids, or every group of a session), the
    backlog (``tail`` lines of each group, or what was read at or after ``since``;
    neither: everything kept), and whether to follow new output."""

    group_ids: tuple[str, ...] = ()
    session_id: str = ""
    tail: int | None = None
    since: float = 0.0
    follow: bool = False

    def __post_init__(self) -> None:
        check_tail(self.tail)
        check_since(self.since)
        if not self.group_ids and not self.session_id:
            raise InvalidSpec("name a group or a session whose output to read", field="group_id")

    def wants(self, ring: OutputRing) -> bool:
        if self.group_ids:
            return ring.group_id in self.group_ids
        return ring.session_id == self.session_id


# ---------------------------------------------------------------- one group's ring


class OutputRing:
    """The recent output of one group. See the module docstring."""

    def __init__(self, group_id: str, capacity: int, session_id: str = "",
                 label: str = "") -> None:
        self.group_id = group_id
        self.session_id = session_id
        self.label = label
        self.capacity = capacity
        self.chunks: collections.deque[OutputChunk] = collections.deque()
        #: Bytes held, chunk overhead included.
        self.size = 0
        #: Output bytes ever captured (the next chunk's offset).
        self.end = 0
        #: Output bytes dropped so far (the offset of the oldest byte still held, unless
        #: every byte was dropped).
        self.dropped = 0
        #: The newest time of a dropped chunk (0: none dropped).
        self.dropped_until = 0.0
        #: When dropped output was read: (time, offset of its first byte), oldest first,
        #: for ``since`` readers (thinned to every other entry past ``DROP_INDEX``).
        self._drops: list[tuple[float, int]] = []
        self.run = 0
        #: The group ended and its last output was read: nothing more comes.
        self.closed = False
        #: The followers reading this ring: told on every append and on close (each
        #: marks the ring as having news and sets its one wake-up event).
        self.followers: set[_Waiter] = set()

    def __repr__(self) -> str:
        return (f"<OutputRing {self.group_id} {self.size}/{self.capacity} bytes "
                f"{len(self.chunks)} chunks dropped={self.dropped}"
                f"{' closed' if self.closed else ''}>")

    @property
    def output_bytes(self) -> int:
        return self.end - self.dropped

    def add(self, chunk: OutputChunk) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk.data) + CHUNK_OVERHEAD
        if chunk.is_output:
            self.end += len(chunk.data)
        self.trim()
        self._wake()

    def _wake(self) -> None:
        for w in self.followers:
            w.dirty.add(self.group_id)
            w.wake.set()

    def trim(self) -> int:
        """Drop the oldest bytes until the ring fits its capacity; returns bytes freed. A
        chunk only partly in the way loses only its oldest bytes (a note never does: it
        goes whole)."""
        freed = 0
        while self.size > self.capacity and self.chunks:
            old = self.chunks[0]
            over = self.size - self.capacity
            if old.is_output and len(old.data) > over:
                kept = replace(old, data=old.data[over:], offset=old.offset + over)
                self.chunks[0] = kept
                self.size -= over
                freed += over
                self._dropping(old)
                self.dropped += over
                self.dropped_until = max(self.dropped_until, old.at)
                break
            if len(self.chunks) == 1 and not old.is_output:
                break  # a lone note bigger than the ring (never, at 64 KiB): keep it
            self.chunks.popleft()
            cost = len(old.data) + CHUNK_OVERHEAD
            self.size -= cost
            freed += cost
            if old.is_output:
                self._dropping(old)
                self.dropped += len(old.data)
                self.dropped_until = max(self.dropped_until, old.at)
        return freed

    def _dropping(self, chunk: OutputChunk) -> None:
        drops = self._drops
        if drops and drops[-1][0] >= chunk.at:
            return  # read at the same time as the last one noted: its offset is earlier
        if len(drops) >= DROP_INDEX:
            del drops[1::2]  # coarser: a since reader may then be told slightly less
        drops.append((chunk.at, chunk.offset))

    def dropped_since(self, since: float) -> int:
        """Dropped output bytes that were read at or after ``since``."""
        i = bisect.bisect_left(self._drops, since, key=lambda d: d[0])
        if i == len(self._drops):
            return 0
        return self.dropped - self._drops[i][1]

    def close(self) -> None:
        self.closed = True
        self._wake()

    # -- reading

    def backlog(self, tail: int | None, since: float) -> tuple[list[OutputChunk], int]:
        """The chunks a new reader gets first, and the bytes it wanted that were dropped."""
        chunks = [c for c in self.chunks if c.at >= since] if since else list(self.chunks)
        if tail is not None:
            chunks, complete = _last_lines(chunks, tail)
            if complete:
                return chunks, 0
        if not self.dropped or (since and self.dropped_until < since):
            return chunks, 0
        # Every dropped byte is older than every kept one, and the reader asked for output
        # from before the oldest kept byte (with ``since``: only what was read at or after
        # it).
        return chunks, self.dropped_since(since) if since else self.dropped

    def after(self, seq: int) -> list[OutputChunk]:
        """Chunks with a sequence number above ``seq``, oldest first."""
        out: list[OutputChunk] = []
        for c in reversed(self.chunks):
            if c.seq <= seq:
                break
            out.append(c)
        out.reverse()
        return out


def _last_lines(chunks: list[OutputChunk], n: int) -> tuple[list[OutputChunk], bool]:
    """The chunks holding the last ``n`` lines of output (a line ends with a newline; an
    unterminated last line counts), the first of them cut where its line starts; notes
    among them are kept. ``complete``: the chunks held ``n`` lines or more."""
    if n == 0:
        return [], True
    count = 0
    final = True  # the last output byte of all: a newline there ends a line, not a break
    for i in range(len(chunks) - 1, -1, -1):
        c = chunks[i]
        if not c.is_output:
            continue
        data = c.data
        pos = len(data)
        if final:
            final = False
            if data.endswith(b"\n"):
                pos -= 1
        while (nl := data.rfind(b"\n", 0, pos)) >= 0:
            count += 1
            if count == n:
                cut = nl + 1
                head = replace(c, data=data[cut:], offset=c.offset + cut)
                return ([head] if head.data else []) + chunks[i + 1:], True
            pos = nl
    return chunks, False


# ---------------------------------------------------------------- every ring of an agent


@dataclass
class _Cursor:
    ring: OutputRing
    #: The last sequence number delivered.
    seq: int = 0
    #: The offset of the next output byte this reader expects.
    offset: int = 0
    done: bool = False


@dataclass(eq=False)
class _Waiter:
    """One follower: its wake-up event, and what woke it (so a wake-up costs what
    changed, not every ring followed)."""

    query: LogQuery
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Followed groups with news (an append, the end, forgotten) since the last look.
    dirty: set[str] = field(default_factory=set)
    #: Rings of a followed session opened since the last look.
    fresh: list[OutputRing] = field(default_factory=list)
    #: Followed groups whose output has not ended yet.
    live: int = 0


class OutputBook:
    """Every group's ring on one agent, within one memory budget; appends and reads."""

    def __init__(self, ring_capacity: int = DEFAULT_RING, total: int = DEFAULT_TOTAL,
                 clock: Callable[[], float] = time.time) -> None:
        if ring_capacity < MIN_RING:
            raise InvalidSpec(f"output buffer {ring_capacity} bytes is too small; give at "
                              f"least {MIN_RING // 1024} KiB", field="output_buffer")
        if total < ring_capacity:
            raise InvalidSpec(f"output total {total} bytes is less than one group's buffer "
                              f"({ring_capacity}); raise it", field="output_total")
        self.ring_capacity = ring_capacity
        self.total = total
        self.clock = clock
        self.rings: dict[str, OutputRing] = {}
        self.seq = 0
        self._waiters: set[_Waiter] = set()
        #: Bytes held by every ring together (the sum of their sizes), kept as it changes.
        self._held = 0
        #: Rings of ended groups that still hold output, oldest end first: what goes first
        #: when the rings together would hold more than the total.
        self._ended: collections.OrderedDict[str, OutputRing] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.rings)

    @property
    def held(self) -> int:
        """Bytes held by every ring together (chunk overhead included)."""
        return self._held

    @property
    def dropped(self) -> int:
        return sum(r.dropped for r in self.rings.values())

    def _share(self) -> int:
        return max(MIN_RING, min(self.ring_capacity, self.total // max(1, len(self.rings))))

    def _rebalance(self) -> None:
        share = self._share()
        for ring in self.rings.values():
            ring.capacity = share
            if ring.size > share:
                ring.trim()
        self._held = sum(r.size for r in self.rings.values())
        self._bound()

    def _bound(self) -> None:
        """Keep every ring together within the total: the floor of 64 KiB per ring would
        let many groups (ended ones kept for ``--retain``) hold far more. Ended groups'
        rings give up their oldest output first, oldest ended group first; if that is not
        enough, every ring's share goes below the floor. A ring always keeps its newest
        note (its end), so readers are still told what was dropped."""
        while self._held > self.total and self._ended:
            gid, ring = next(iter(self._ended.items()))
            before = ring.size
            ring.capacity = max(0, ring.size - (self._held - self.total))
            ring.trim()
            self._held -= before - ring.size
            if ring.capacity == 0 or ring.size > ring.capacity:
                del self._ended[gid]  # nothing more to give (its last note at most)
        if self._held > self.total:
            share = self.total // max(1, len(self.rings))
            for ring in self.rings.values():
                if ring.size > share:
                    before = ring.size
                    ring.capacity = share
                    ring.trim()
                    self._held -= before - ring.size

    def ring(self, group_id: str) -> OutputRing:
        ring = self.rings.get(group_id)
        if ring is None:
            raise GroupNotFound(group_id)
        return ring

    def open(self, group_id: str, session_id: str = "", label: str = "") -> OutputRing:
        """The group's ring, made on first use (a new group: waiting session readers see
        it)."""
        ring = self.rings.get(group_id)
        if ring is not None:
            return ring
        ring = OutputRing(group_id, self._share(), session_id, label)
        self.rings[group_id] = ring
        self._rebalance()
        for w in self._waiters:
            if w.query.wants(ring):
                w.fresh.append(ring)
                w.wake.set()
        return ring

    def forget(self, group_id: str) -> None:
        """The group left the agent's memory: its ring goes (a follower's stream ends)."""
        ring = self.rings.pop(group_id, None)
        if ring is not None:
            self._ended.pop(group_id, None)
            ring.close()
            self._rebalance()

    def _add(self, ring: OutputRing, chunk: OutputChunk) -> None:
        before = ring.size
        ring.add(chunk)
        self._held += ring.size - before
        if self._held > self.total:
            self._bound()

    def append(self, group_id: str, stream: Stream, data: bytes, run: int = 0) -> None:
        ring = self.rings.get(group_id)
        if ring is None or not data:
            return
        self.seq += 1
        self._add(ring, OutputChunk(group_id, stream, data, self.clock(), run or ring.run,
                                    ring.end, self.seq, session_id=ring.session_id,
                                    label=ring.label))

    def note(self, group_id: str, event: Note, text: str, run: int = 0) -> None:
        ring = self.rings.get(group_id)
        if ring is None:
            return
        if event is Note.RUN_STARTED:
            ring.run = run
            ring.closed = False
            if self._ended.pop(group_id, None) is not None or ring.capacity < self._share():
                ring.capacity = self._share()  # running again: its share back
        self.seq += 1
        self._add(ring, OutputChunk(group_id, Stream.TETHER, text.encode(errors="replace"),
                                    self.clock(), run or ring.run, ring.end, self.seq,
                                    event=event.value, session_id=ring.session_id,
                                    label=ring.label))

    def close(self, group_id: str, text: str) -> None:
        """The group ended and its last output was read: say so, then nothing more."""
        ring = self.rings.get(group_id)
        if ring is None or ring.closed:
            return
        self.note(group_id, Note.OUTPUT_ENDED, text)
        ring.close()
        self._ended[group_id] = ring
        if self._held > self.total:
            self._bound()

    # -- readers

    def _selected(self, query: LogQuery) -> list[OutputRing]:
        if query.group_ids:
            missing = [g for g in query.group_ids if g not in self.rings]
            if missing:
                raise GroupNotFound(missing[0])
            return [self.rings[g] for g in query.group_ids]
        return [r for r in self.rings.values() if r.session_id == query.session_id]

    def read(self, query: LogQuery) -> AsyncIterator[OutputChunk]:
        """The backlog ``query`` asks for, the groups interleaved in capture order; then,
        with ``follow``, new output as it is read, until every followed group's output
        has ended (a session: until the reader leaves; groups started later are
        followed too). Raises ``GroupNotFound`` now, not at the first read, for a group id
        this agent does not hold."""
        rings = self._selected(query)
        waiter = _Waiter(query) if query.follow else None
        cursors: dict[str, _Cursor] = {}
        first: list[OutputChunk] = []
        for ring in rings:
            chunks, lost = ring.backlog(query.tail, query.since)
            cursor = _Cursor(ring, seq=ring.chunks[-1].seq if ring.chunks else 0,
                             offset=ring.end)
            cursors[ring.group_id] = cursor
            if waiter is not None:
                ring.followers.add(waiter)
                waiter.dirty.add(ring.group_id)  # looked at once at least (ended already?)
                waiter.live += 1
            if chunks and lost:
                # Dropping is oldest-first: every kept chunk is newer than every dropped one.
                chunks[0] = replace(chunks[0], dropped=lost)
            first.extend(chunks)
        first.sort(key=lambda c: c.seq)
        if waiter is not None:
            self._waiters.add(waiter)  # before any await: nothing falls between
        return self._stream(query, cursors, first, waiter)

    async def _stream(self, query: LogQuery, cursors: dict[str, _Cursor],
                      first: list[OutputChunk], waiter: _Waiter | None
                      ) -> AsyncIterator[OutputChunk]:
        try:
            for c in first:
                yield c
            if waiter is None:
                return
            while True:
                batch = self._collect(cursors, waiter)
                if batch:
                    for c in batch:
                        yield c
                    continue
                if query.group_ids and not waiter.live:
                    return
                # One event for this follower, set by any followed ring's append or close
                # (and by a new group of a followed session): no task per ring per wait.
                waiter.wake.clear()  # nothing awaited since _collect found nothing new
                await waiter.wake.wait()
        finally:
            if waiter is not None:
                self._waiters.discard(waiter)
                for cur in cursors.values():
                    cur.ring.followers.discard(waiter)

    def _collect(self, cursors: dict[str, _Cursor], waiter: _Waiter) -> list[OutputChunk]:
        """New chunks of the followed rings with news since each cursor, merged by
        sequence; a ring the cursor fell behind reports how much it missed on its first
        new chunk."""
        for ring in waiter.fresh:  # groups of the session started since
            if ring.group_id not in cursors and self.rings.get(ring.group_id) is ring:
                cursors[ring.group_id] = _Cursor(ring)
                ring.followers.add(waiter)
                waiter.dirty.add(ring.group_id)
                waiter.live += 1
        waiter.fresh.clear()
        lists: list[list[OutputChunk]] = []
        news, waiter.dirty = waiter.dirty, set()
        for gid in news:
            cur = cursors.get(gid)
            if cur is None or cur.done:
                continue
            ring = cur.ring
            if self.rings.get(gid) is not ring or (ring.closed and not ring.after(cur.seq)):
                cur.done = True  # forgotten meanwhile, or its output ended and was read
                waiter.live -= 1
                continue
            new = ring.after(cur.seq)
            if not new:
                continue
            out: list[OutputChunk] = []
            for c in new:
                if c.offset > cur.offset:  # a note's offset is the output before it
                    c = replace(c, dropped=c.offset - cur.offset)
                cur.offset = max(cur.offset, c.offset + (len(c.data) if c.is_output else 0))
                out.append(c)
            cur.seq = new[-1].seq
            lists.append(out)
            if ring.closed:
                waiter.dirty.add(gid)  # looked at again next time: it ends there
        if len(lists) == 1:
            return lists[0]
        return list(heapq.merge(*lists, key=lambda c: c.seq))


def ring_sizes(book: OutputBook) -> Iterable[tuple[str, int, int]]:
    """(group, bytes held, bytes dropped) per ring: for metrics and status."""
    for gid, ring in book.rings.items():
        yield gid, ring.size, ring.dropped


# ---------------------------------------------------------------- attaching to stdio


@dataclass(frozen=True)
class AttachOpen:
    """The first message of an ``Attach``: which group, and in which role."""

    group_id: str
    session_id: str = ""
    #: Take the writer role (one at a time per group).
    write: bool = False
    #: Replay the last N lines first (None: only output from now on).
    tail: int | None = None
    #: Close the program's stdin when this writer goes away without closing it.
    close_on_detach: bool = False
    #: Who attaches (credential and peer), as shown to others.
    who: str = ""

    def __post_init__(self) -> None:
        check_tail(self.tail)


@dataclass(frozen=True)
class StdinInput:
    """A writer's later message: bytes for stdin, then optionally the end of it."""

    data: bytes = b""
    close: bool = False
