"""Keep groups' output pipes in the guardian's hands too.

A group writes to pipes the agent reads. A ``keep`` group outlives its agent, and a
pipe nobody reads any more kills its writer at the next write (SIGPIPE), or fails it
(EPIPE). So for each run of a keep group the agent sends copies of its pipe ends
(``PipeEnds``, over a SOCK_SEQPACKET socketpair, SCM_RIGHTS) to its guardian, which
never reads them while the agent lives. When the agent dies the guardian drains them
into the group's ``--log`` (or nowhere) until the group is gone; a new agent re-adopts
the group but does not capture it. A run that ends is released (the guardian closes its
copies). A guardian started anew (the last one died) is given every live hold again.

The write end of a ``--stdin pipe`` is never handed over: the agent's copy must be the
only one, so closing it (``close_stdin``, the stdin-first step of a stop) makes the
program read end-of-file. So when the agent dies, a keep group's stdin reads end-of-file
too (nothing could write it any more anyway; a new agent does not capture it).

Messages: ``hold GROUP MASK`` with the descriptors MASK names, in order (``o`` stdout,
``e`` stderr, ``l`` log; ``i`` stdin is still understood from an older agent), and
``drop GROUP``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket

from tether.signallers.base import PipeEnds

log = logging.getLogger(__name__)


def encode(group_id: str, ends: PipeEnds) -> tuple[bytes, list[int]]:
    mask, fds = "", []
    # Never stdin (see the module docstring): a second write end would keep the program
    # from ever reading end-of-file.
    for letter, fd in (("o", ends.stdout), ("e", ends.stderr), ("l", ends.log)):
        if fd >= 0:
            mask += letter
            fds.append(fd)
    return f"hold {group_id} {mask or '-'}".encode(), fds


class PipeKeeper:
    """The agent's side of the link to its guardian."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._held: dict[str, PipeEnds] = {}
        self._pending: collections.deque[tuple[str, bytes]] = collections.deque()
        self._writer = False

    @property
    def held(self) -> int:
        return len(self._held)

    def connect(self) -> socket.socket:
        """A new link (a new guardian): returns the guardian's end, to pass to it; every
        live hold is sent again."""
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self._sock = ours
        for gid in self._held:
            self._pending.append((gid, b""))
        self._flush()
        return theirs

    def hold(self, group_id: str, ends: PipeEnds) -> None:
        self._held[group_id] = ends
        self._pending.append((group_id, b""))
        self._flush()

    def release(self, group_id: str) -> None:
        if self._held.pop(group_id, None) is not None:
            self._pending.append((group_id, f"drop {group_id}".encode()))
            self._flush()

    def _flush(self) -> None:
        sock = self._sock
        while sock is not None and self._pending:
            gid, msg = self._pending[0]
            fds: list[int] = []
            if not msg:  # a hold: sent only while it is still held (its fds still open)
                ends = self._held.get(gid)
                if ends is None:
                    self._pending.popleft()
                    continue
                msg, fds = encode(gid, ends)
            try:
                socket.send_fds(sock, [msg], fds)
            except BlockingIOError:
                self._wait_writable(sock)
                return
            except OSError as exc:  # the guardian is gone: a new one gets everything
                log.warning("cannot hand group %s's pipes to the guardian: %s", gid, exc)
                self._pending.clear()
                return
            self._pending.popleft()

    def _wait_writable(self, sock: socket.socket) -> None:
        if self._writer:
            return
        loop = asyncio.get_running_loop()
        self._writer = True

        def ready() -> None:
            loop.remove_writer(sock.fileno())
            self._writer = False
            self._flush()

        loop.add_writer(sock.fileno(), ready)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._pending.clear()
        if sock is not None:
            if self._writer:
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().remove_writer(sock.fileno())
                self._writer = False
            sock.close()
