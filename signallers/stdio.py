"""A local run's standard streams: pipes the agent reads and writes on its event loop.

stdout and stderr are two pipes whose read ends the agent holds, non-blocking, read
when the event loop says they are readable (``add_reader``): the program never waits
for the agent beyond the pipe's buffer, and the agent never waits for the program.
What is read goes to the sink (the group's ring) at once and, when the group has a
``--log``, to a ``LogTee`` that appends it to that file on a thread: a log on a stuck
filesystem holds a thread and its own backlog (bounded: beyond ``TEE_BACKLOG`` the
oldest bytes are dropped from the file, and the file and the readers are told how
many), never the event loop and never another group.

With ``--stdin pipe`` the agent holds the write end of the program's stdin pipe:
``write`` waits (``add_writer``) while the pipe is full, so a program that does not read
slows only the client writing to it.

``finish`` (the run's containment is empty) reads what is still buffered and closes
every end: a process that escaped the group and kept a pipe open gets no more reading
from us (its writes then fail), and the agent holds no descriptor for a group that ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
from typing import Final

from tether.core.errors import Conflict
from tether.core.output import Note, Stream
from tether.signallers.base import OutputSink, PipeEnds, Stdio

log = logging.getLogger(__name__)

#: One read's size: 256 KiB (a fast writer fills a 64 KiB pipe between two loop turns).
READ_SIZE: Final = 256 * 1024
#: ``finish`` reads at most this much more (an escaped process could write forever).
FINISH_MAX: Final = 16 * READ_SIZE
#: Bytes waiting for the log file beyond which the oldest are dropped from it.
TEE_BACKLOG: Final = 8 << 20


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class LogTee:
    """Appends a run's output to its ``--log`` file on a thread, in order, bounded."""

    def __init__(self, fd: int, pool: concurrent.futures.Executor, sink: OutputSink | None,
                 path: str = "") -> None:
        self.fd = fd
        self.path = path
        self._pool = pool
        self._sink = sink
        self._pending = bytearray()
        self._dropped = 0
        self._busy = False
        self._closing = False
        self._failed = False
        #: Done once closed with nothing left to write (``drained``).
        self._drained: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        if self._failed or self.fd < 0:
            return
        self._pending += data
        over = len(self._pending) - TEE_BACKLOG
        if over > 0:
            del self._pending[:over]
            if not self._dropped and self._sink is not None:
                self._sink.note(Note.WARNING, f"log file {self.path} does not keep up (a slow "
                                "or stuck filesystem?): its oldest unwritten output is "
                                "dropped from it; the ring buffer has it")
            self._dropped += over
        if not self._busy:
            self._submit()

    def _submit(self) -> None:
        data, self._pending = self._pending, bytearray()
        if self._dropped:
            data[:0] = (f"[tether: {self._dropped} bytes of output were not written to this "
                        "log: it did not keep up]\n").encode()
            self._dropped = 0
        self._busy = True
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, _write_all, self.fd, data)
        fut.add_done_callback(self._written)

    def _written(self, fut: asyncio.Future[None]) -> None:
        self._busy = False
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None and not self._failed:
            self._failed = True
            self._pending.clear()
            log.warning("cannot append to log file %s: %s; the group's output still goes to "
                        "its ring buffer", self.path, exc)
            if self._sink is not None:
                self._sink.note(Note.WARNING, f"cannot append to log file {self.path} "
                                f"({exc}); its output is no longer written there")
        if self._pending and not self._failed:
            self._submit()
        elif self._closing:
            self._close_fd()

    def close(self) -> None:
        """Write what is pending, then close the file (on the pool: a close may block too)."""
        self._closing = True
        if not self._busy:
            self._close_fd()

    def drained(self) -> asyncio.Future[None] | None:
        """Done once closed and everything is written (or given up on); None if it is."""
        if self.fd < 0 and not self._busy:
            return None
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        return self._drained

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if fd >= 0:
            with contextlib.suppress(RuntimeError):  # the pool is gone: the agent is exiting
                self._pool.submit(os.close, fd)
                return
            os.close(fd)


class PipeStdio(Stdio):
    """``<PipeStdio stdout stderr stdin>``: the ends this side still holds."""

    def __init__(self, stdout: int, stderr: int, stdin: int = -1, log_fd: int = -1,
                 log_path: str = "", pool: concurrent.futures.Executor | None = None) -> None:
        self._fds: dict[Stream, int] = {Stream.STDOUT: stdout, Stream.STDERR: stderr}
        for fd in (stdout, stderr, stdin):
            if fd >= 0:
                os.set_blocking(fd, False)
        self._stdin = stdin
        self._log_fd = log_fd
        self._log_path = log_path
        self._pool = pool
        self._sink: OutputSink | None = None
        self._tee: LogTee | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = asyncio.Lock()
        self._write_wait: asyncio.Future[None] | None = None
        self._ended = False

    def __repr__(self) -> str:
        held = [s.value for s, fd in self._fds.items() if fd >= 0]
        if self._stdin >= 0:
            held.append("stdin")
        return f"<PipeStdio {' '.join(held) or 'closed'}>"

    def flushed(self) -> asyncio.Future[None] | None:
        return self._tee.drained() if self._tee is not None else None

    def pipe_ends(self) -> PipeEnds | None:
        tee = self._tee.fd if self._tee is not None else self._log_fd
        return PipeEnds(self._fds[Stream.STDOUT], self._fds[Stream.STDERR], self._stdin, tee)

    def fds(self) -> list[int]:
        """Every descriptor held (a launch that is abandoned closes them)."""
        return [fd for fd in (*self._fds.values(), self._stdin, self._log_fd) if fd >= 0]

    # -- output

    def start(self, sink: OutputSink) -> None:
        if self._sink is not None:
            return
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        if self._log_fd >= 0 and self._pool is not None:
            self._tee = LogTee(self._log_fd, self._pool, sink, self._log_path)
            self._log_fd = -1
        for stream, fd in self._fds.items():
            if fd >= 0:
                self._loop.add_reader(fd, self._readable, stream)

    def _readable(self, stream: Stream) -> None:
        fd = self._fds[stream]
        if fd < 0:
            return
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("reading %s of a group: %s", stream.value, exc)
            data = b""
        if not data:
            self._close_stream(stream)
            return
        self._deliver(stream, data)

    def _deliver(self, stream: Stream, data: bytes) -> None:
        if self._sink is not None:
            self._sink.output(stream, data)
        if self._tee is not None:
            self._tee.write(data)

    def _close_stream(self, stream: Stream) -> None:
        fd = self._fds[stream]
        if fd < 0:
            return
        self._fds[stream] = -1
        if self._loop is not None:
            self._loop.remove_reader(fd)
        os.close(fd)
        if all(f < 0 for f in self._fds.values()):
            self._output_ended()

    def _output_ended(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._tee is not None:
            self._tee.close()
        if self._sink is not None:
            self._sink.ended()

    def finish(self) -> None:
        for stream, fd in self._fds.items():
            if fd < 0:
                continue
            budget = FINISH_MAX
            while budget > 0 and self._sink is not None:
                try:
                    data = os.read(fd, READ_SIZE)
                except OSError:
                    break  # EAGAIN: nothing more buffered (an escapee holds it open)
                if not data:
                    break
                budget -= len(data)
                self._deliver(stream, data)
            self._close_stream(stream)
        self.close_stdin()
        if self._log_fd >= 0:  # never started: the tee never took it
            os.close(self._log_fd)
            self._log_fd = -1
        self._output_ended()

    # -- stdin

    @property
    def stdin_open(self) -> bool:
        return self._stdin >= 0

    async def write(self, data: bytes) -> None:
        async with self._writing:
            view = memoryview(data)
            while view:
                fd = self._stdin
                if fd < 0:
                    raise Conflict("the group's stdin is closed (closed by a writer, or the run "
                                   "it belonged to ended); nothing more can be written to it")
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    await self._writable(fd)
                    continue
                except BrokenPipeError:
                    self.close_stdin()
                    raise Conflict("the program closed its stdin (or exited): the bytes "
                                   "were not delivered") from None
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    self.close_stdin()
                    raise Conflict(f"writing the group's stdin failed: {exc.strerror}") from exc
                view = view[n:]

    async def _writable(self, fd: int) -> None:
        """Until the pipe takes more, or stdin is closed meanwhile."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._write_wait = ready
        loop.add_writer(fd, _resolve, ready)
        try:
            await ready
        finally:
            self._write_wait = None
            if self._stdin == fd:
                loop.remove_writer(fd)

    def close_stdin(self) -> None:
        fd, self._stdin = self._stdin, -1
        if fd < 0:
            return
        with contextlib.suppress(RuntimeError):  # no loop: nothing was registered
            asyncio.get_running_loop().remove_writer(fd)
        os.close(fd)
        if self._write_wait is not None:
            _resolve(self._write_wait)  # a writer waiting for room learns it is closed


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
