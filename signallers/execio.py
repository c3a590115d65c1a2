"""A docker group's stdout and stderr: its leader's exec stream, read by a thread of its own.

The leader of a docker group is the exec that started it (``ops.sh spawn attach``: the
wrapper prints its handshake, then execs the program with the exec's own stdout and
stderr). The Engine multiplexes both streams over the exec's attached connection;
docker-py demultiplexes it into ``(stdout, stderr)`` pairs, a blocking iterator, read
here by one dedicated thread per group (the Engine's bounded pool is never held by a
long-lived stream). The thread only queues what it reads and wakes the event loop; the
loop hands it to the sink (the group's ring). Nothing ever waits for a reader: the
Engine is read as fast as it delivers.

The stream ends by itself once every process holding the exec's stdout and stderr has
ended, which is, for a group, once its containment is empty: the handle's ``wait``
awaits that end (``drained``, at most ``FINISH_WAIT``, never blocking the event loop)
before it reports the group empty, so a group's last words reach its ring before its
exit does; ``finish`` then hands over what is queued and closes the connection. The Engine keeps running a
process whose attached client went away (its output is then discarded), so closing the
connection never hurts the program.

stdin is not attached (``--stdin pipe`` is local-only).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from typing import Final

from tether.core.output import Note, Stream
from tether.signallers.base import OutputSink, Stdio
from tether.signallers.dockerapi import LiveExec

log = logging.getLogger(__name__)

#: How long ``drained`` waits for the stream's own end (its last bytes in flight).
FINISH_WAIT: Final = 0.5


class ExecStdio(Stdio):
    """``<ExecStdio g-1 reading>``: one exec's demultiplexed output, for one sink."""

    def __init__(self, group_id: str, live: LiveExec) -> None:
        self.group_id = group_id
        self._live = live
        self._queue: collections.deque[tuple[Stream, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._woken = False
        self._sink: OutputSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lost = ""
        self._eof = threading.Event()
        #: Set on the loop once the thread saw the stream's end.
        self._ended: asyncio.Event | None = None
        self._finished = False
        for stream, data in ((Stream.STDOUT, live.out), (Stream.STDERR, live.err)):
            if data:
                self._queue.append((stream, data))

    def __repr__(self) -> str:
        state = "finished" if self._finished else "ended" if self._eof.is_set() else "reading"
        return f"<ExecStdio {self.group_id} {state}>"

    def start(self, sink: OutputSink) -> None:
        if self._sink is not None:
            return
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._ended = asyncio.Event()
        self._drain()
        self._thread = threading.Thread(target=self._read, name=f"tether-out-{self.group_id}",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        """On the thread: the stream to its end (or until ``finish`` closes it)."""
        try:
            for out, err in self._live.stream:
                with self._lock:
                    if out:
                        self._queue.append((Stream.STDOUT, out))
                    if err:
                        self._queue.append((Stream.STDERR, err))
                    wake = not self._woken
                    self._woken = True
                if wake:
                    self._wake()
        except Exception as exc:  # the connection broke (or finish closed it)
            if not self._finished:
                self._lost = f"{type(exc).__name__}: {exc}"
        finally:
            self._live.attached.close()
            self._eof.set()
            self._wake()

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the agent exits
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """On the loop: hand what the thread queued to the sink, in order."""
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
            self._woken = False
        if self._eof.is_set() and self._ended is not None:
            self._ended.set()
        if self._sink is None or self._finished:
            return
        for stream, data in items:
            self._sink.output(stream, data)
        if self._eof.is_set() and self._lost and not self._finished:
            lost, self._lost = self._lost, ""
            self._sink.note(Note.CAPTURE_LOST, f"the Engine's output stream of this group "
                            f"broke ({lost}); its later output is not captured")

    async def drained(self, timeout: float = FINISH_WAIT) -> bool:
        """Wait (at most ``timeout``) until the stream ended and everything read was handed
        to the sink; True if it did."""
        if self._ended is None:
            return self._eof.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)
        self._drain()
        return self._eof.is_set()

    def finish(self) -> None:
        if self._finished:
            return
        self._drain()
        self._finished = True
        if not self._eof.is_set():
            self._live.attached.abort()  # unblocks the thread; it exits on its own
            if self._sink is not None:
                self._sink.note(Note.CAPTURE_LOST, f"the output stream was still open "
                                f"{FINISH_WAIT:g} s after the group ended; what it still "
                                "held is not captured")
        if self._sink is not None:
            self._sink.ended()
