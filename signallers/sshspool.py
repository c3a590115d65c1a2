"""An ssh group's stdout and stderr: two spool files on its host, read from byte offsets.

An ssh group starts detached, so that it outlives a dropped connection: nothing of ours
holds its output pipes. A captured group (``kill`` policy, no ``--log``) is started by
``ops.sh spawn spool``: its stdout and stderr are appended to ``out`` and ``err`` in a
private directory on the host (``mktemp -d``, mode 0700, under the remote ``$TMPDIR`` or
``/tmp``). The agent reads them with ``ops.sh spool DIR OUTOFF ERROFF ...``, a short
command per round (backoff from ``POLL_FIRST`` to ``POLL_MAX`` while nothing comes, back
to ``POLL_FIRST`` when something did), each answering what the files hold past the
offsets already delivered. A dropped connection loses nothing: the program keeps
writing to the files, and the next round, over a new connection, goes on from the same
offsets (a ``warning`` note says capture paused while the host was unreachable).

Once the group is empty (``SSHGroup.wait``), ``drained`` reads what is left and removes
the directory, so a group's last words reach its ring before its exit does. A group
whose output could not be read to the end (``finish`` without ``drained``: the agent
gave up on it) gets a ``capture_lost`` note, and ``discard`` removes the directory.

The spool is capped: bytes already delivered are freed on disk (``fallocate
--punch-hole``, every ``PUNCH_EVERY`` bytes, where the tool and the filesystem allow it;
the files' apparent size still grows), and when more than ``SPOOL_CAP`` bytes of a
stream are unread (a long outage) the older ones are skipped with a ``warning`` note
(the ring keeps only ``DEFAULT_RING`` bytes anyway). While the agent cannot reach the
host, the files grow with the output. A directory is left behind only when the agent
dies without ending the group (a ``kill`` group is ended by the next agent).

Order between stdout and stderr is that of the reads (two files, as two pipes are).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from tether.core.errors import TargetUnreachable
from tether.core.output import Note, Stream
from tether.signallers.base import OutputSink, Stdio
from tether.signallers.remote.wire import OPS
from tether.signallers.sshconn import Pool, SSHTarget

log = logging.getLogger("tether.signallers.ssh")

POLL_FIRST: Final = 0.02
POLL_MAX: Final = 0.5
#: Bytes of one stream read in one round.
READ_MAX: Final = 1 << 20
#: More unread bytes than this in one stream: the older ones are skipped.
SPOOL_CAP: Final = 8 << 20
#: Delivered bytes are freed on disk each time this many more were read.
PUNCH_EVERY: Final = 4 << 20

_TAGS: Final = {"o": Stream.STDOUT, "e": Stream.STDERR}


class SpoolError(Exception):
    """An answer of ``ops.sh spool`` that does not parse (the files changed under it)."""


def parse_spool(raw: bytes) -> tuple[list[tuple[str, int, bytes]], set[str]]:
    """``([(tag, offset, data)], flags)`` from a ``spool`` answer: tag o/e with data, or
    k (skipped to offset) with no data; flags R (removed), G (gone), Z (complete)."""
    head = b"tether-spool 1\n"
    at = raw.find(head)
    if at < 0:
        raise SpoolError(f"no spool answer: {raw[:200]!r}")
    pos = at + len(head)
    items: list[tuple[str, int, bytes]] = []
    flags: set[str] = set()
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        if end < 0:
            raise SpoolError(f"unterminated line {raw[pos:pos + 80]!r}")
        words = raw[pos:end].decode("ascii", errors="replace").split()
        pos = end + 1
        if len(words) == 3 and words[0] in _TAGS and words[1].isdigit() and words[2].isdigit():
            n = int(words[2])
            data = raw[pos:pos + n]
            if len(data) != n:
                raise SpoolError(f"{n} bytes announced, {len(data)} came")
            items.append((words[0], int(words[1]), data))
            pos += n
        elif len(words) == 3 and words[0] == "k" and words[1] in _TAGS and words[2].isdigit():
            items.append((f"k{words[1]}", int(words[2]), b""))
        elif len(words) == 1 and words[0] in ("R", "G", "Z"):
            flags.add(words[0])
        else:
            raise SpoolError(f"unexpected line {raw[pos:end][:80]!r}")
    if "Z" not in flags:
        raise SpoolError("the answer was cut short")
    return items, flags


class SpoolStdio(Stdio):
    """``<SpoolStdio g-1 /tmp/tether-out.x out=12 err=0>``: one run's spooled output."""

    def __init__(self, group_id: str, pool: Pool, target: SSHTarget, spool: str) -> None:
        self.group_id = group_id
        self.pool = pool
        self.target = target
        self.spool = spool
        self.offsets = {Stream.STDOUT: 0, Stream.STDERR: 0}
        self._sink: OutputSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._punched = 0
        self._paused = False
        #: Everything was read and the directory removed (or found gone).
        self._complete = False
        self._removed = False
        self._finished = False
        self._lost = ""

    def __repr__(self) -> str:
        return (f"<SpoolStdio {self.group_id} {self.spool} "
                f"out={self.offsets[Stream.STDOUT]} err={self.offsets[Stream.STDERR]}>")

    def start(self, sink: OutputSink) -> None:
        if self._sink is not None:
            return
        self._sink = sink
        self._task = asyncio.ensure_future(self._poll())

    async def _round(self, final: int) -> bool:
        """One ``spool`` command; delivers what it read. True if anything came."""
        out, err = self.offsets[Stream.STDOUT], self.offsets[Stream.STDERR]
        punch = min(out, err) >= self._punched + PUNCH_EVERY or \
            max(out, err) >= self._punched + 2 * PUNCH_EVERY
        done = await self.pool.run(
            self.target, OPS, ["spool", self.spool, str(out), str(err), str(READ_MAX),
                               str(SPOOL_CAP), str(final), "1" if punch else "0"],
            what=f"reading the output of group {self.group_id}",
            timeout=self.pool.opts.command_timeout, encoding="latin-1")
        if done.status != 0:
            raise SpoolError(f"exit {done.status}: {done.err.strip()[:200]}")
        items, flags = parse_spool(done.out.encode("latin-1"))
        if punch:
            self._punched = max(out, err)
        got = False
        for tag, offset, data in items:
            if tag.startswith("k"):
                stream = _TAGS[tag[1]]
                skipped = offset - self.offsets[stream]
                self.offsets[stream] = offset
                self._say(Note.WARNING, f"{skipped} bytes of {stream.value} were skipped: "
                          f"more than {SPOOL_CAP} were waiting in the spool on {self.target}")
                continue
            stream = _TAGS[tag]
            if offset != self.offsets[stream]:
                raise SpoolError(f"{stream.value} answered from byte {offset}, not "
                                 f"{self.offsets[stream]}")
            self.offsets[stream] += len(data)
            if data and self._sink is not None and not self._finished:
                self._sink.output(stream, data)
                got = True
        if "G" in flags or "R" in flags:
            self._removed = True
            self._complete = self._complete or ("R" in flags and final != 2)
            if "G" in flags and final != 2:
                self._lost = f"its spool directory {self.spool} on {self.target} is gone"
        return got

    def _say(self, event: Note, text: str) -> None:
        if self._sink is not None and not self._finished:
            self._sink.note(event, text)

    async def _poll(self) -> None:
        delay = POLL_FIRST
        while not self._removed:
            try:
                got = await self._round(0)
            except TargetUnreachable as exc:
                if not self._paused:
                    self._paused = True
                    self._say(Note.WARNING, f"output capture paused: {exc.why}; the program "
                              "writes on into its spool there, read from where it stopped "
                              "once the host answers")
                delay = POLL_MAX * 4
                await asyncio.sleep(delay)
                continue
            except Exception as exc:  # SpoolError, or a bug: said, never silently lost
                self._lost = f"its spool on {self.target} could not be read ({exc})"
                log.warning("ssh %s: group %s: %s", self.target, self.group_id, self._lost)
                return
            if self._paused:
                self._paused = False
                self._say(Note.WARNING, "output capture resumed: nothing the program wrote "
                          "meanwhile was lost")
            delay = POLL_FIRST if got else min(delay * 2, POLL_MAX)
            await asyncio.sleep(delay)

    async def _stop_polling(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def drained(self) -> None:
        """The group is empty: read what is left and remove the spool. Raises
        ``TargetUnreachable`` (the caller's wait is retried, and this goes on from the same
        offsets)."""
        await self._stop_polling()
        while not self._removed and not self._finished:
            try:
                await self._round(1)
            except SpoolError as exc:
                self._lost = f"its spool on {self.target} could not be read ({exc})"
                return

    def finish(self) -> None:
        if self._finished:
            return
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._sink is not None:
            if self._lost or not self._complete:
                self._sink.note(Note.CAPTURE_LOST, f"output capture ended before the output "
                                f"did: {self._lost or 'the rest was not read'}")
            self._sink.ended()
        self._finished = True

    async def discard(self) -> None:
        """Remove the spool if it is still there (best effort; the group has ended)."""
        await self._stop_polling()
        if self._removed:
            return
        try:
            await self._round(2)
        except (TargetUnreachable, SpoolError) as exc:
            log.warning("ssh %s: spool %s of group %s left in place: %s", self.target,
                        self.spool, self.group_id, exc)
