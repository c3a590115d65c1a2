"""The agent's side of groups' standard streams: one ring per group, a sink per run, and
the stdin writer role.

A group's ring (``tether.core.output``) is opened when the group is first known and
kept until the group leaves the agent's memory. Each run's output goes in through a
``RunSink`` from the handle's ``Stdio`` (``begin``); the run's end (``end_run``: a
restart follows; ``end``: the group ended) first reads what the pipes still hold, so
a group's last words are in the ring before its exit event goes out, then notes it.
A run whose output this agent cannot read (adopted; re-adopted after an agent restart;
a target that does not capture) says so in the ring instead.

Attach (``Attachment``): any number of attachments read; one at a time writes the
program's stdin (``--stdin pipe``). A second writer is refused naming the holder. A
writer whose request stream ends without ``close_stdin`` gives the role up and leaves
stdin open, so another client (an editor reconnecting) can go on; with
``close_on_detach`` its going away closes stdin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tether.agent.groups import Group
from tether.agent.keeper import PipeKeeper
from tether.core.errors import Conflict
from tether.core.model import ExitRecord, OrphanPolicy, StdinMode
from tether.core.output import (
    AttachOpen,
    LogQuery,
    Note,
    OutputBook,
    OutputChunk,
    StdinInput,
    Stream,
    capture_gap,
)
from tether.signallers.base import OutputSink


class RunSink(OutputSink):
    """One run's output into its group's ring."""

    def __init__(self, book: OutputBook, group_id: str, run: int) -> None:
        self.book = book
        self.group_id = group_id
        self.run = run

    def output(self, stream: Stream, data: bytes) -> None:
        self.book.append(self.group_id, stream, data, self.run)

    def note(self, event: Note, text: str) -> None:
        self.book.note(self.group_id, event, text, self.run)

    def ended(self) -> None:
        return None


def describe_end(rec: ExitRecord | None) -> str:
    if rec is None:
        return "status unknown"
    parts = [rec.reason.value]
    if rec.failure is not None:
        parts.append(rec.failure.value)
    if rec.signal is not None:
        parts.append(f"signal {rec.signal}")
    elif rec.exit_code is not None:
        parts.append(f"exit code {rec.exit_code}")
    return ", ".join(parts)


class Outputs:
    """Rings and runs of every group of one agent."""

    def __init__(self, book: OutputBook | None = None,
                 changed: Callable[[Group], None] | None = None) -> None:
        self.book = book if book is not None else OutputBook()
        #: A group's stdin state changed (a writer came or went): re-emit its view.
        self.changed = changed
        #: Hands keep groups' pipes to the guardian (``agent/keeper.py``), when there is one.
        self.keeper: PipeKeeper | None = None

    def open(self, g: Group) -> None:
        if g.group_id not in self.book.rings:
            self.book.open(g.group_id, g.spec.session_id, g.spec.label)

    # -- runs

    def begin(self, g: Group) -> None:
        """A run's handle was attached (a start, a restart, an adoption, a re-adoption)."""
        h = g.handle
        assert h is not None
        self.open(g)
        run = g.restarts + 1
        gid = g.group_id
        self.book.note(gid, Note.RUN_STARTED, f"run {run} started (pid {h.leader_pid})", run)
        stdio = h.stdio
        if stdio is None:
            why = ("it was adopted: tether did not start it, so its stdout and stderr go "
                   "where they went before" if g.adopted else
                   "it was re-adopted after an agent restart: its stdout and stderr pipes "
                   "belonged to the previous agent (its guardian appends them to --log, if "
                   "any)" if g.readopted else
                   uncaptured(g)
                   or f"target {g.spec.target} does not capture output")
            self.book.note(gid, Note.NOT_CAPTURED, f"output of run {run} is not captured: "
                           f"{why}", run)
            return
        g.stdio = stdio
        stdio.start(RunSink(self.book, gid, run))
        ends = stdio.pipe_ends()
        if self.keeper is not None and ends is not None \
                and g.spec.orphan_policy is OrphanPolicy.KEEP:
            self.keeper.hold(gid, ends)

    def _finish(self, g: Group) -> asyncio.Future[None] | None:
        stdio, g.stdio = g.stdio, None
        if self.keeper is not None:
            self.keeper.release(g.group_id)
        flushed = None
        if stdio is not None:
            stdio.finish()
            flushed = stdio.flushed()
        if g.stdin_writer and self.changed is not None:
            self.changed(g)
        return flushed

    def end_run(self, g: Group, record: ExitRecord) -> None:
        """The current run ended and another may start (restarts)."""
        self._finish(g)
        self.open(g)
        self.book.note(g.group_id, Note.RUN_ENDED,
                       f"run {g.restarts + 1} ended ({describe_end(record)})", g.restarts + 1)

    def end(self, g: Group) -> asyncio.Future[None] | None:
        """The group ended: its last output is read, and its ring says nothing more comes.
        Returns what is done once that output is in its ``--log`` file too (None: it is)."""
        flushed = self._finish(g)
        self.open(g)
        self.book.close(g.group_id, f"group {g.state.value} ({describe_end(g.exit)}); its "
                        "output is complete")
        return flushed

    def forget(self, group_id: str) -> None:
        self.book.forget(group_id)

    # -- reading

    def read(self, query: LogQuery) -> AsyncIterator[OutputChunk]:
        return self.book.read(query)

    # -- attaching

    def attach(self, g: Group, opened: AttachOpen) -> Attachment:
        refuse_uncaptured(g)
        if opened.write:
            if g.spec.stdin is not StdinMode.PIPE:
                raise Conflict(f"group {g.group_id} was not started with --stdin pipe: its "
                               "stdin is /dev/null, so nobody can write it; attach without "
                               "writing, or spawn it again with --stdin pipe")
            if g.state.ended:
                raise Conflict(f"group {g.group_id} is {g.state.value}: it has no stdin any "
                               "more")
            if g.stdin_writer:
                raise Conflict(f"group {g.group_id}'s stdin already has a writer: "
                               f"{g.stdin_writer}; one writer at a time (attach without "
                               "writing, or retry once it detached)")
            g.stdin_writer = f"{opened.who or 'unknown'} since {_clock()}"
            if self.changed is not None:
                self.changed(g)
        self.open(g)
        return Attachment(self, g, opened)


def uncaptured(g: Group) -> str:
    """Why this agent never captures the group's output (its target, ...); "" if it does."""
    return capture_gap(g.spec.target, g.spec.log_path, g.spec.orphan_policy is OrphanPolicy.KEEP)


def refuse_uncaptured(g: Group) -> None:
    """``Conflict`` for a group whose output this agent never captures."""
    gap = uncaptured(g)
    if gap:
        raise Conflict(f"group {g.group_id} ({g.spec.target}): {gap}")


def _clock() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Attachment:
    """One client attached to a group's stdio: its output (``output``) and, for the writer,
    its stdin (``write``, ``close_stdin``); ``detach`` when the client goes."""

    def __init__(self, outputs: Outputs, g: Group, opened: AttachOpen) -> None:
        self._outputs = outputs
        self._g = g
        self.opened = opened
        self.writing = opened.write
        self._closed_stdin = False
        self._holder = g.stdin_writer

    @property
    def group(self) -> Group:
        return self._g

    def output(self) -> AsyncIterator[OutputChunk]:
        """An ``attached`` note, then the replayed tail, then output as it comes, until the
        group's output ended."""
        g = self._g
        book = self._outputs.book
        stream = book.read(LogQuery((g.group_id,), tail=self.opened.tail if self.opened.tail
                                    is not None else 0, follow=True))
        ring = book.rings[g.group_id]
        hello = OutputChunk(g.group_id, Stream.TETHER,
                            b"writer" if self.writing else b"reader", time.time(), ring.run,
                            ring.end, 0, event=Note.ATTACHED.value, session_id=ring.session_id,
                            label=ring.label)
        return _prefixed(hello, stream)

    def note(self, event: Note, text: str) -> OutputChunk:
        """A note for this attachment alone (never in the ring)."""
        g = self._g
        ring = self._outputs.book.rings.get(g.group_id)
        return OutputChunk(g.group_id, Stream.TETHER, text.encode(), time.time(),
                           ring.run if ring else 0, ring.end if ring else 0, 0,
                           event=event.value, session_id=g.spec.session_id,
                           label=g.spec.label)

    def _own(self) -> None:
        if not self.writing or self._g.stdin_writer != self._holder:
            raise Conflict(f"this attachment does not hold group {self._g.group_id}'s stdin "
                           "(attach with write to take it)")

    async def write(self, data: bytes) -> None:
        self._own()
        stdio = self._g.stdio
        if stdio is None or not stdio.stdin_open:
            raise Conflict(f"group {self._g.group_id} has no open stdin now (it is "
                           f"{self._g.state.value}; a run's stdin closes with the run, or "
                           "when a writer closed it)")
        if data:
            await stdio.write(data)

    def close_stdin(self) -> None:
        self._own()
        self._closed_stdin = True
        stdio = self._g.stdio
        if stdio is not None:
            stdio.close_stdin()
        self._release()

    def stop_writing(self) -> None:
        """The writer's request stream ended: give the role up; stdin stays open unless
        ``close_on_detach``."""
        if self.writing and self.opened.close_on_detach and not self._closed_stdin:
            stdio = self._g.stdio
            if stdio is not None and self._g.stdin_writer == self._holder:
                stdio.close_stdin()
        self._release()

    def detach(self) -> None:
        self.stop_writing()

    def _release(self) -> None:
        if self.writing and self._g.stdin_writer == self._holder:
            self._g.stdin_writer = ""
            if self._outputs.changed is not None:
                self._outputs.changed(self._g)
        self.writing = False


async def _prefixed(first: OutputChunk, rest: AsyncIterator[OutputChunk]
                    ) -> AsyncIterator[OutputChunk]:
    try:
        yield first
        async for c in rest:
            yield c
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def attach_stream(attachment: Attachment, inputs: AsyncIterator[StdinInput]
                        ) -> AsyncIterator[OutputChunk]:
    """Run one attachment: the writer's inputs go to stdin in order (a full pipe makes the
    next input wait, so a program that does not read slows only its writer), the group's
    output comes back, until its output ended. Once stdin is closed at the writer's
    request a ``stdin_closed`` note goes back to it (what its ``close_stdin`` waits for).
    A write that fails (stdin closed, a reader trying to write) ends the call with that
    error. However it ends, the attachment detaches: the writer role is given up, stdin
    left open unless ``close_on_detach``."""
    out = attachment.output()
    acks: asyncio.Queue[OutputChunk] = asyncio.Queue()
    pump = asyncio.ensure_future(_pump(attachment, inputs, acks))
    nxt: asyncio.Future[OutputChunk] | None = None
    ack: asyncio.Future[OutputChunk] | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(anext(out))
            if ack is None:
                ack = asyncio.ensure_future(acks.get())
            waits: set[asyncio.Future[Any]] = {nxt, ack} if pump.done() else {nxt, ack, pump}
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if pump in done and not pump.cancelled() and pump.exception() is not None:
                raise pump.exception()  # type: ignore[misc]
            if ack in done:
                chunk, ack = ack.result(), None
                yield chunk
            if nxt in done:
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    return
                nxt = None
                yield chunk
    finally:
        pump.cancel()
        pending = [f for f in (nxt, ack) if f is not None]
        for f in pending:
            f.cancel()
        await asyncio.gather(pump, *pending, return_exceptions=True)
        attachment.detach()
        await out.aclose()  # type: ignore[attr-defined]


async def _pump(attachment: Attachment, inputs: AsyncIterator[StdinInput],
                acks: asyncio.Queue[OutputChunk]) -> None:
    async for item in inputs:
        if item.data:
            await attachment.write(item.data)
        if item.close:
            attachment.close_stdin()
            acks.put_nowait(attachment.note(Note.STDIN_CLOSED, "stdin closed"))
    attachment.stop_writing()  # the request stream ended: the role goes, stdin stays
