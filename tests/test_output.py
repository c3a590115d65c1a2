"""Captured output and stdio on the agent, with real processes (issue 17, items 2 and 3).

The rings' rules first, on their own (drop-oldest accounting, tail, since, the shared
budget); then what real programs do to them: bytes that are not text, a writer far faster
than its reader, restarts, a child that closes its stdout, a grandchild that keeps it, a
process outside the group holding it forever; then stdin: one writer, a writer that goes
away, a program that never reads, and the stop ladder that closes stdin first.

Every wait is for an event (the authority's Watch stream, a chunk), never a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.plugins.processes import async_wait_until, make_authority, marked_alive
from tether.agent.authority import Authority
from tether.agent.capture import attach_stream
from tether.core.errors import Conflict, GroupNotFound, InvalidSpec
from tether.core.model import (
    ExitReason,
    GroupSpec,
    GroupState,
    GroupView,
    RestartMode,
    RestartPolicy,
    StdinMode,
    StopPolicy,
)
from tether.core.output import (
    CHUNK_OVERHEAD,
    MIN_RING,
    AttachOpen,
    LogQuery,
    Note,
    OutputBook,
    OutputChunk,
    StdinInput,
    Stream,
)
from tether.signallers import procfs

GRACE = StopPolicy(grace=2.0)


async def until(auth: Authority, gid: str, pred: Callable[[GroupView], bool],
                timeout: float = 30.0) -> GroupView:
    view = auth.get(gid)
    if pred(view):
        return view
    async with asyncio.timeout(timeout):
        async for ev in auth.watch(lambda e: e.group.group_id == gid):
            if pred(ev.group):
                return ev.group
    raise AssertionError("the watch stream ended")


async def read_all(auth: Authority, query: LogQuery, timeout: float = 30.0
                   ) -> list[OutputChunk]:
    out = []
    async with asyncio.timeout(timeout):
        async for c in auth.logs(query):
            out.append(c)
    return out


def data(chunks: list[OutputChunk], stream: Stream | None = None) -> bytes:
    return b"".join(c.data for c in chunks if c.is_output and (stream is None
                                                               or c.stream is stream))


def notes(chunks: list[OutputChunk]) -> list[str]:
    return [c.event for c in chunks if not c.is_output]


@contextlib.asynccontextmanager
async def small_rings(ring: int, total: int) -> AsyncIterator[Authority]:
    auth, signallers = await make_authority(f"out-{os.getpid()}-{time.monotonic_ns() % 10**8}")
    auth.lc.outputs.book = OutputBook(ring, total)
    try:
        yield auth
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()


# ------------------------------------------------------------------ the rings' rules


def chunk_book(ring: int = MIN_RING, total: int = 1 << 30) -> OutputBook:
    book = OutputBook(ring, total)
    book.open("g-00000001", "s")
    book.note("g-00000001", Note.RUN_STARTED, "run 1 started", 1)
    return book


async def drain(book: OutputBook, query: LogQuery) -> list[OutputChunk]:
    return [c async for c in book.read(query)]


async def test_tail_cuts_at_line_starts_and_counts_an_unterminated_last_line() -> None:
    book = chunk_book()
    gid = "g-00000001"
    for piece in (b"one\ntw", b"o\nthree\n", b"fo", b"ur"):
        book.append(gid, Stream.STDOUT, piece)
    last2 = await drain(book, LogQuery((gid,), tail=2))
    assert data(last2) == b"three\nfour"
    assert data(await drain(book, LogQuery((gid,), tail=3))) == b"two\nthree\nfour"
    assert data(await drain(book, LogQuery((gid,), tail=0))) == b""
    everything = await drain(book, LogQuery((gid,), tail=1000))
    assert data(everything) == b"one\ntwo\nthree\nfour"
    assert all(c.dropped == 0 for c in everything), "nothing was dropped"


async def test_since_keeps_what_was_read_at_or_after_it() -> None:
    now = [1000.0]
    book = OutputBook(MIN_RING, 1 << 30, clock=lambda: now[0])
    gid = "g-00000001"
    book.open(gid)
    book.append(gid, Stream.STDOUT, b"old\n")
    now[0] = 2000.0
    book.append(gid, Stream.STDERR, b"new\n")
    got = await drain(book, LogQuery((gid,), since=1500.0))
    assert [(c.stream, c.data) for c in got] == [(Stream.STDERR, b"new\n")]


async def test_a_since_reader_is_told_only_of_drops_at_or_after_its_since() -> None:
    now = [1000.0]
    book = OutputBook(MIN_RING, 1 << 30, clock=lambda: now[0])
    gid = "g-00000001"
    book.open(gid)
    for _ in range(30):  # 300K before since: dropped, but not wanted
        book.append(gid, Stream.STDOUT, b"a" * 10_000)
    now[0] = 2000.0
    for _ in range(10):  # 100K at since: the ring keeps only its newest ~64K
        book.append(gid, Stream.STDOUT, b"b" * 10_000)
    got = await drain(book, LogQuery((gid,), since=2000.0))
    kept = data(got)
    assert set(kept) == {ord("b")} and 0 < len(kept) < 100_000
    assert sum(c.dropped for c in got) == 100_000 - len(kept)
    everything = await drain(book, LogQuery((gid,)))
    assert sum(c.dropped for c in everything) == 400_000 - len(kept)


async def test_drops_are_oldest_first_and_every_reader_is_told_exactly_how_much() -> None:
    book = chunk_book()
    gid = "g-00000001"
    # A follower that read nothing yet while 4 rings' worth was written.
    follower = book.read(LogQuery((gid,), follow=True))
    first = await anext(follower)
    assert first.event == Note.RUN_STARTED
    sizes = [1000 + i for i in range(4 * MIN_RING // 1000)]
    for i, n in enumerate(sizes):
        book.append(gid, Stream.STDOUT, bytes([i % 251]) * n)
    ring = book.ring(gid)
    assert ring.size <= ring.capacity, ring
    book.close(gid, "done")
    rest = [c async for c in follower]
    assert rest[-1].event == Note.OUTPUT_ENDED
    got = sum(len(c.data) for c in rest if c.is_output)
    dropped = sum(c.dropped for c in rest)
    assert dropped > 0 and got + dropped == sum(sizes), "what it got and what it was told " \
        "it missed add up to everything written"
    # A new reader asking for everything is told the same about the past.
    later = await drain(book, LogQuery((gid,)))
    assert sum(len(c.data) for c in later if c.is_output) + \
        sum(c.dropped for c in later) == sum(sizes)


async def test_a_write_larger_than_the_ring_keeps_its_newest_bytes() -> None:
    book = chunk_book()
    gid = "g-00000001"
    big = bytes(range(256)) * (3 * MIN_RING // 256)
    book.append(gid, Stream.STDOUT, big)
    got = await drain(book, LogQuery((gid,)))
    kept = data(got)
    assert big.endswith(kept) and 0 < len(kept) <= MIN_RING - CHUNK_OVERHEAD
    assert sum(c.dropped for c in got) == len(big) - len(kept)


async def test_many_groups_share_the_total_and_the_total_is_a_bound() -> None:
    book = OutputBook(MIN_RING * 4, MIN_RING * 8)
    ids = [f"g-{i:08x}" for i in range(32)]
    for gid in ids:
        book.open(gid)
        book.append(gid, Stream.STDOUT, b"x" * (MIN_RING * 4))
        assert book.held == sum(r.size for r in book.rings.values())
        assert book.held <= book.total, "even 32 running groups at 64K each"
    assert all(book.ring(g).output_bytes > 0 for g in ids), "each keeps its newest bytes"
    for gid in ids[2:]:
        book.forget(gid)
    assert book.ring(ids[0]).capacity == MIN_RING * 4, "freed budget goes back to the rest"


async def test_ended_groups_give_their_output_up_first_oldest_first() -> None:
    total = MIN_RING * 8
    book = OutputBook(MIN_RING, total)
    ended = [f"g-{i:08x}" for i in range(400)]
    for gid in ended:  # short-lived groups, kept for --retain: 400 x 64K = 25 MiB asked
        book.open(gid, "s")
        book.append(gid, Stream.STDOUT, b"e" * MIN_RING)
        book.close(gid, "group exited; its output is complete")
        assert book.held <= total
    assert book.held == sum(r.size for r in book.rings.values())
    live = "g-0000ffff"
    book.open(live, "s")
    book.append(live, Stream.STDOUT, b"L" * (MIN_RING // 2))
    assert book.held <= total
    assert book.ring(live).output_bytes == MIN_RING // 2, "a running group keeps its share"
    assert book.ring(ended[0]).output_bytes == 0, "the oldest ended group went first"
    assert book.ring(ended[-1]).output_bytes > 0, "the newest ended group still has output"
    got = await drain(book, LogQuery((ended[0],)))
    assert sum(c.dropped for c in got) == MIN_RING, "its reader is told exactly"
    assert notes(got)[-1] == Note.OUTPUT_ENDED, "its end is still said"


async def test_several_agents_backlogs_merge_holding_one_chunk_per_agent() -> None:
    from tether.coordinator.output import merge_backlogs

    pulled = {"a": 0, "b": 0}

    async def agent(name: str, times: list[float]) -> AsyncIterator[OutputChunk]:
        for i, at in enumerate(times):
            pulled[name] += 1
            yield OutputChunk(f"g-{name}", Stream.STDOUT, b"x" * 1000, at, seq=i + 1)

    merged = merge_backlogs([agent("a", [1.0, 3.0, *map(float, range(5, 1000))]),
                             agent("b", [2.0, 4.0])])
    first = [await anext(merged) for _ in range(3)]
    assert [(c.group_id, c.at) for c in first] == [("g-a", 1.0), ("g-b", 2.0), ("g-a", 3.0)]
    assert pulled == {"a": 2, "b": 2}, "one chunk ahead per agent, never a whole backlog"
    rest = [c async for c in merged]
    assert len(rest) == 2 + 995 + 2 - 3 and [c.at for c in rest] == sorted(c.at for c in rest)


async def test_a_stalled_follower_holds_a_bounded_number_of_bytes_on_the_coordinator() -> None:
    from tether.coordinator.output import FollowBuffer

    buf = FollowBuffer(limit=1 << 20)
    marker = object()
    buf.put(OutputChunk("g-a", Stream.TETHER, b"run 1 started", 1.0, seq=1,
                        event=Note.RUN_STARTED.value))
    sizes = [64_000 + i for i in range(200)]  # 12 MiB for a follower that reads nothing
    for i, n in enumerate(sizes):
        buf.put(OutputChunk("g-a", Stream.STDOUT, b"x" * n, 2.0, seq=i + 2))
        assert buf.held <= buf.limit
    buf.put(OutputChunk("g-a", Stream.TETHER, b"done", 3.0, seq=999,
                        event=Note.OUTPUT_ENDED.value))
    buf.put(marker)
    got = [await buf.get() for _ in range(len(buf.items))]
    assert got[-1] is marker, "the pumps' markers are never dropped"
    chunks = [c for c in got if isinstance(c, OutputChunk)]
    assert notes(chunks) == [Note.RUN_STARTED, Note.OUTPUT_ENDED], "nor notes"
    assert chunks[0].dropped == 0, "a note from before the gap is not told of it"
    assert sum(len(c.data) for c in chunks if c.is_output) + sum(c.dropped for c in chunks) \
        == sum(sizes), "what it got and what it was told it missed add up"
    assert buf.held == 0 and buf.lost == {}


async def test_a_follower_of_many_rings_waits_on_one_event_set_by_their_appends() -> None:
    book = OutputBook()
    ids = [f"g-{i:08x}" for i in range(200)]
    for gid in ids:
        book.open(gid, "s")
    follower = book.read(LogQuery(tuple(ids), follow=True))
    (waiter,) = {w for gid in ids for w in book.ring(gid).followers}
    wakes = {id(w.wake) for gid in ids for w in book.ring(gid).followers}
    assert len(wakes) == 1, "one wake-up event per follower, whatever it follows"
    waiting = asyncio.ensure_future(anext(follower))
    book.append(ids[137], Stream.STDOUT, b"one of many\n")
    got = await asyncio.wait_for(waiting, 10)
    assert (got.group_id, got.data) == (ids[137], b"one of many\n")
    waiting = asyncio.ensure_future(anext(follower))
    book.append(ids[5], Stream.STDERR, b"another\n")
    assert waiter.dirty == {ids[5]}, "a wake-up looks at the ring that changed, not all 200"
    got = await asyncio.wait_for(waiting, 10)
    assert (got.group_id, got.data) == (ids[5], b"another\n")
    await follower.aclose()  # type: ignore[attr-defined]
    assert all(not book.ring(g).followers for g in ids), "a follower that left is unhooked"


async def test_session_readers_interleave_by_capture_order_and_find_new_groups() -> None:
    book = OutputBook()
    for gid in ("g-0000000a", "g-0000000b"):
        book.open(gid, "s")
    follower = book.read(LogQuery(session_id="s", follow=True))
    order = [("g-0000000a", b"1"), ("g-0000000b", b"2"), ("g-0000000a", b"3")]
    for gid, piece in order:
        book.append(gid, Stream.STDOUT, piece)
    book.open("g-0000000c", "s")
    book.append("g-0000000c", Stream.STDERR, b"4")
    book.open("g-0000000d", "other")
    book.append("g-0000000d", Stream.STDOUT, b"not ours")
    got = [await anext(follower) for _ in range(4)]
    assert [(c.group_id, c.data) for c in got] == [*order, ("g-0000000c", b"4")]
    await follower.aclose()  # type: ignore[attr-defined]
    assert book._waiters == set(), "a follower that left leaves nothing behind"


def test_hostile_queries_are_refused_naming_the_field() -> None:
    for bad, field in ((dict(tail=-1), "tail"), (dict(since=-5.0), "since"),
                       (dict(since=float("nan")), "since"), (dict(since=float("inf")), "since"),
                       (dict(tail=True), "tail")):
        with pytest.raises(InvalidSpec) as info:
            LogQuery(("g-00000001",), **bad)  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(InvalidSpec):
        LogQuery()
    assert LogQuery(("g-00000001",), tail=2**62).tail == 2**62, "a huge tail is harmless"
    with pytest.raises(InvalidSpec):
        OutputBook(1024, 1 << 20)


# ------------------------------------------------------------------ real programs


async def test_a_group_has_ended_only_once_its_log_file_holds_all_it_wrote(
        authority: Authority, tmp_path: Path) -> None:
    """The --log file is appended on a thread: whoever waits for a group's end (tether
    wait, a stop, the exit event) then reads it whole, as when the program wrote it
    itself."""
    log = tmp_path / "big.log"
    size = 6 << 20  # more than one write to the file, still being written at the exit
    view = await authority.spawn(GroupSpec(
        argv=("sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo end"),
        session_id="s", log_path=str(log)))
    await authority.find(view.group_id).ended.wait()
    assert log.stat().st_size == size + 4, "its end came after the log file was whole"
    assert log.read_bytes().endswith(b"xend\n")


async def test_bytes_are_kept_exactly_tagged_by_stream_and_teed_to_the_log(
        authority: Authority, tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    script = ("printf 'a\\000b\\377c\\n'; printf 'oops\\n' >&2; "
              "i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done")
    view = await authority.spawn(GroupSpec(argv=("sh", "-c", script), session_id="s",
                                           log_path=str(log)))
    chunks = await read_all(authority, LogQuery((view.group_id,), follow=True))
    assert notes(chunks)[0] == Note.RUN_STARTED and notes(chunks)[-1] == Note.OUTPUT_ENDED
    out, err = data(chunks, Stream.STDOUT), data(chunks, Stream.STDERR)
    assert out.startswith(b"a\x00b\xffc\n") and out.endswith(b"line 199\n")
    assert err == b"oops\n"
    assert all(c.session_id == "s" and c.run == 1 for c in chunks)
    # The log file gets the same bytes (its interleaving of the two streams is the
    # agent's reading order); it is complete by the time the group's output ended... but
    # written on a thread: wait for that thread, not for a clock.
    await async_wait_until(lambda: len(log.read_bytes()) >= len(out) + len(err),
                           what="the log tee's thread to write everything")
    text = log.read_bytes()
    assert sorted(text.splitlines()) == sorted((out + err).splitlines())


async def test_a_writer_far_faster_than_its_reader_is_never_slowed_and_drops_are_counted(
        ) -> None:
    total = 8 << 20
    async with small_rings(MIN_RING, MIN_RING * 4) as auth:
        view = await auth.spawn(GroupSpec(argv=("head", "-c", str(total), "/dev/zero"),
                                          session_id="s"))
        follower = auth.logs(LogQuery((view.group_id,), follow=True))
        first = await anext(follower)
        # The reader stops reading until the writer is done: everything it did not read
        # in time is dropped, and it is told how much.
        ended = await until(auth, view.group_id, lambda v: v.state.ended)
        assert ended.exit is not None and ended.exit.exit_code == 0
        rest = [first, *[c async for c in follower]]
        got = sum(len(c.data) for c in rest if c.is_output)
        dropped = sum(c.dropped for c in rest)
        assert got + dropped == total, (got, dropped)
        assert dropped >= total - 2 * MIN_RING
        ring = auth.output.ring(view.group_id)
        assert ring.size <= ring.capacity


async def test_restarts_mark_run_boundaries_and_a_follower_stays_across_them(
        authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(
        argv=("sh", "-c", "echo hello; exit 3"), session_id="s", stop=GRACE,
        restart=RestartPolicy(RestartMode.ON_FAILURE, 2, 60)))
    chunks = await read_all(authority, LogQuery((view.group_id,), follow=True), timeout=60)
    ended = authority.get(view.group_id)
    assert ended.state is GroupState.FAILED and ended.exit is not None
    assert ended.exit.reason is ExitReason.RESTART_LIMIT
    marks = [(c.event, c.run) for c in chunks if not c.is_output]
    assert marks == [(Note.RUN_STARTED, 1), (Note.RUN_ENDED, 1), (Note.RUN_STARTED, 2),
                     (Note.RUN_ENDED, 2), (Note.RUN_STARTED, 3), (Note.RUN_ENDED, 3),
                     (Note.OUTPUT_ENDED, 3)], marks
    assert [(c.run, c.data) for c in chunks if c.is_output] == \
        [(1, b"hello\n"), (2, b"hello\n"), (3, b"hello\n")]
    assert "exit code 3" in next(c.text for c in chunks if c.event == Note.RUN_ENDED)


async def test_a_child_that_closes_stdout_keeps_running_and_its_output_so_far_is_kept(
        authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(
        argv=("sh", "-c", "echo before; exec >&- 2>&-; exec sleep 300"), session_id="s",
        stop=GRACE))
    follower = authority.logs(LogQuery((view.group_id,), follow=True))
    assert (await anext(follower)).event == Note.RUN_STARTED
    assert (await anext(follower)).data == b"before\n"
    assert authority.get(view.group_id).state is GroupState.RUNNING
    stopped = await authority.stop(view.group_id)
    assert stopped.exit is not None and stopped.exit.reason is ExitReason.REQUESTED
    assert [c.event async for c in follower] == [Note.OUTPUT_ENDED]


async def test_a_grandchild_that_outlives_the_leader_is_still_captured(
        authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(
        argv=("sh", "-c", "(read x < /dev/null; sleep 0.3; echo late) & echo early"),
        session_id="s"))
    chunks = await read_all(authority, LogQuery((view.group_id,), follow=True))
    assert data(chunks) == b"early\nlate\n"
    assert authority.get(view.group_id).state is GroupState.EXITED


@pytest.mark.parametrize("authority", ["pgid"], indirect=True)
async def test_a_process_outside_the_group_cannot_hold_its_output_open(
        authority: Authority) -> None:
    """pgid containment loses a child that calls setsid and whose parent dies (README):
    it still holds the group's stdout. The group ends; its output ends with it."""
    script = "setsid sh -c 'sleep 0.2; while :; do echo escaped; sleep 0.1; done' & echo bye"
    view = await authority.spawn(GroupSpec(argv=("sh", "-c", script), session_id="s"))
    try:
        chunks = await read_all(authority, LogQuery((view.group_id,), follow=True))
        assert authority.get(view.group_id).state.ended
        assert notes(chunks)[-1] == Note.OUTPUT_ENDED
        assert b"bye\n" in data(chunks)
    finally:
        for pid in marked_alive(view.group_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_unknown_groups_and_forgotten_groups(authority: Authority) -> None:
    with pytest.raises(GroupNotFound):
        authority.logs(LogQuery(("g-00000000",)))
    view = await authority.spawn(GroupSpec(argv=("true",), session_id="s"))
    await until(authority, view.group_id, lambda v: v.state.ended)
    chunks = await read_all(authority, LogQuery((view.group_id,)))
    assert notes(chunks)[-1] == Note.OUTPUT_ENDED
    authority.forget([view.group_id])
    with pytest.raises(GroupNotFound):
        authority.logs(LogQuery((view.group_id,)))
    assert view.group_id not in authority.output.rings


async def test_no_descriptor_outlives_its_group(authority: Authority, tmp_path: Path) -> None:
    before = procfs.open_fds()
    views = [await authority.spawn(GroupSpec(
        argv=("sh", "-c", "echo hi; exec cat"), session_id="fds", stdin=StdinMode.PIPE,
        log_path=str(tmp_path / f"{i}.log"), stop_stdin_grace=0.0, stop=GRACE))
        for i in range(20)]
    during = procfs.open_fds()
    assert during >= before + 20 * 3, "each holds stdout, stderr and stdin"
    await authority.stop_all(lambda g: g.spec.session_id == "fds")
    for v in views:
        assert authority.get(v.group_id).state is GroupState.STOPPED
    # The log tees close their files on a thread once written: wait for that thread.
    await async_wait_until(lambda: procfs.open_fds() <= before,
                           what="every descriptor of the ended groups to be closed")


# ------------------------------------------------------------------ stdin


async def cat_group(auth: Authority, **kw: object) -> GroupView:
    return await auth.spawn(GroupSpec(argv=("cat",), session_id="s", stdin=StdinMode.PIPE,
                                      stop=GRACE, **kw))  # type: ignore[arg-type]


async def next_output(stream: AsyncIterator[OutputChunk]) -> OutputChunk:
    async with asyncio.timeout(10):
        while True:
            c = await anext(stream)
            if c.is_output:
                return c


async def test_one_writer_many_readers_and_the_second_writer_is_told_who_writes(
        authority: Authority) -> None:
    view = await cat_group(authority)
    gid = view.group_id
    writer = authority.attach(AttachOpen(gid, "s", write=True, who="token:aa at peer-1"))
    reader = authority.attach(AttachOpen(gid, "s"))
    with pytest.raises(Conflict) as second:
        authority.attach(AttachOpen(gid, write=True, who="token:bb at peer-2"))
    assert "token:aa at peer-1" in str(second.value)
    assert authority.get(gid).stdin_writer.startswith("token:aa at peer-1")
    out_w, out_r = writer.output(), reader.output()
    assert (await anext(out_w)).data == b"writer"
    assert (await anext(out_r)).data == b"reader"
    await writer.write(b"ping\n")
    assert (await next_output(out_w)).data == b"ping\n"
    assert (await next_output(out_r)).data == b"ping\n"
    with pytest.raises(Conflict):
        await reader.write(b"not mine\n")
    with pytest.raises(GroupNotFound):
        authority.attach(AttachOpen(gid, "another-session"))
    writer.close_stdin()
    assert authority.get(gid).stdin_writer == "" and not authority.get(gid).stdin_open
    ended = await until(authority, gid, lambda v: v.state.ended)
    assert ended.state is GroupState.EXITED and ended.exit is not None
    for out in (out_w, out_r):
        assert [c.event async for c in out][-1] == Note.OUTPUT_ENDED


async def test_a_writer_that_goes_away_leaves_stdin_open_unless_it_asked_otherwise(
        authority: Authority) -> None:
    view = await cat_group(authority)
    gid = view.group_id

    async def said(*items: StdinInput) -> AsyncIterator[StdinInput]:
        for item in items:
            yield item

    async def session(opened: AttachOpen, *items: StdinInput) -> list[OutputChunk]:
        got = []
        stream = attach_stream(authority.attach(opened), said(*items))
        async for c in stream:
            got.append(c)
            if c.is_output:
                break  # the client goes away mid-stream
        await stream.aclose()  # type: ignore[attr-defined]
        return got

    first = await session(AttachOpen(gid, write=True, who="one"), StdinInput(b"one\n"))
    assert data(first) == b"one\n"
    v = authority.get(gid)
    assert v.stdin_open and v.stdin_writer == "" and v.state is GroupState.RUNNING
    second = await session(AttachOpen(gid, write=True, who="two", close_on_detach=True),
                           StdinInput(b"two\n"))
    assert data(second) == b"two\n"
    ended = await until(authority, gid, lambda x: x.state.ended)
    assert ended.exit is not None and ended.exit.reason is ExitReason.NATURAL, \
        "close_on_detach: its going away closed stdin, and cat ended on its own"
    with pytest.raises(Conflict):
        authority.attach(AttachOpen(gid, write=True))


async def test_a_group_without_stdin_pipe_has_no_writer(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(argv=("sleep", "300"), session_id="s", stop=GRACE))
    with pytest.raises(Conflict) as info:
        authority.attach(AttachOpen(view.group_id, write=True))
    assert "--stdin pipe" in str(info.value)
    assert authority.attach(AttachOpen(view.group_id)).writing is False


async def test_a_program_that_never_reads_slows_only_its_writer(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(argv=("sleep", "300"), session_id="s",
                                           stdin=StdinMode.PIPE, stop=GRACE,
                                           stop_stdin_grace=0.0))
    attachment = authority.attach(AttachOpen(view.group_id, write=True))
    blocked = asyncio.ensure_future(attachment.write(b"x" * (4 << 20)))
    other = await authority.spawn(GroupSpec(argv=("echo", "meanwhile"), session_id="s"))
    chunks = await read_all(authority, LogQuery((other.group_id,), follow=True))
    assert data(chunks) == b"meanwhile\n", "the agent goes on while one write waits"
    assert not blocked.done()
    stopped = await authority.stop(view.group_id)
    assert stopped.exit is not None
    with pytest.raises(Conflict):
        await asyncio.wait_for(blocked, 10)


async def test_a_stop_closes_stdin_first_and_a_program_that_takes_the_hint_gets_no_signal(
        authority: Authority) -> None:
    script = "trap 'echo got TERM' TERM; while read line; do echo \"$line\"; done; echo eof"
    view = await authority.spawn(GroupSpec(argv=("sh", "-c", script), session_id="s",
                                           stdin=StdinMode.PIPE, stop_stdin_grace=30,
                                           stop=StopPolicy(grace=30)))
    stopped = await authority.stop(view.group_id)
    rec = stopped.exit
    assert rec is not None and rec.reason is ExitReason.REQUESTED and rec.clean
    assert "stdin was closed first; it ended within" in rec.detail
    chunks = await read_all(authority, LogQuery((view.group_id,)))
    assert data(chunks) == b"eof\n", "no TERM reached it"


async def test_a_program_that_ignores_its_stdin_closing_gets_the_rest_of_the_ladder(
        authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(argv=("sleep", "300"), session_id="s",
                                           stdin=StdinMode.PIPE, stop_stdin_grace=0.2,
                                           stop=StopPolicy(grace=30)))
    stopped = await authority.stop(view.group_id)
    rec = stopped.exit
    assert rec is not None and rec.reason is ExitReason.REQUESTED
    assert rec.signal == signal.SIGTERM
    assert "still ran after" in rec.detail and "--stop-stdin-grace" in rec.detail


async def test_stdin_pipe_is_refused_where_it_cannot_be_held(authority: Authority) -> None:
    with pytest.raises(InvalidSpec) as info:
        GroupSpec(argv=("cat",), stop_stdin_grace=1.0)
    assert info.value.field == "stop_stdin_grace"
    with pytest.raises(InvalidSpec) as negative:
        GroupSpec(argv=("cat",), stdin=StdinMode.PIPE, stop_stdin_grace=-1.0)
    assert negative.value.field == "stop_stdin_grace"
    proc = await asyncio.create_subprocess_exec("sleep", "300")
    try:
        with pytest.raises(InvalidSpec) as adopted:
            await authority.adopt(proc.pid, None, GroupSpec(argv=(f"adopted:{proc.pid}",),
                                                             stdin=StdinMode.PIPE))
        assert "--stdin pipe" in str(adopted.value)
    finally:
        proc.kill()
        await proc.wait()


# ------------------------------------------------------------------ tether logs' printer


def printed(printer_kw: dict[str, bool], chunks: list[OutputChunk]) -> tuple[bytes, bytes]:
    from tether.coordinator.cli.logs import Printer

    out, err = io.BytesIO(), io.BytesIO()
    p = Printer("table", printer_kw.pop("prefixed"), out, err, **printer_kw)
    for c in chunks:
        p.chunk(c)
    p.end()
    return out.getvalue(), err.getvalue()


def test_an_unterminated_last_line_is_prefixed_like_every_other_line() -> None:
    out, _ = printed({"prefixed": True}, [
        OutputChunk("g-0000000a", Stream.STDOUT, b"full\nno-new", 1.0, label="web"),
        OutputChunk("g-0000000a", Stream.STDOUT, b"line", 2.0, label="web"),
    ])
    assert out == b"web g-0000000a | full\nweb g-0000000a | no-newline\n"


def test_logs_to_a_terminal_escapes_control_characters_and_to_a_pipe_keeps_the_bytes() -> None:
    hostile = (b"\x1b]0;pwned\x07\x1b[2K\r[tether] fake note\n\tindented \xff\xfe caf\xc3\xa9\n")
    chunks = [OutputChunk("g-0000000a", Stream.STDOUT, hostile, 1.0, label="web"),
              OutputChunk("g-0000000a", Stream.STDERR, b"\x1b[31mred\n", 2.0, label="web")]
    out, err = printed({"prefixed": False, "escape_out": True, "escape_err": True}, chunks)
    assert out == (b"\\x1b]0;pwned\\x07\\x1b[2K\\r[tether] fake note\n"
                   b"\tindented \\xff\\xfe caf\xc3\xa9\n"), "newline, tab and UTF-8 stay"
    assert err == b"\\x1b[31mred\n"
    raw_out, raw_err = printed({"prefixed": False}, chunks)
    assert (raw_out, raw_err) == (hostile, b"\x1b[31mred\n"), "a pipe gets the bytes as written"
    prefixed, _ = printed({"prefixed": True, "escape_out": True}, chunks)
    assert b"\x1b" not in prefixed and b"\r" not in prefixed
