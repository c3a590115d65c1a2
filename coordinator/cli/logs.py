"""`tether logs`: a session's (or some groups') captured output, as written or as JSON.

As a table (the default), output goes where the program wrote it: stdout chunks to
stdout, stderr chunks to stderr, byte for byte (NUL bytes and invalid UTF-8 included).
With several groups each line is prefixed with the group (``web g-1a2b3c4d | ``), a line
written in pieces is printed once it is complete. tether's own notes (run boundaries,
the end, output dropped because this reader fell behind) go to stderr as ``[tether]``
lines. ``-o json``: one object per chunk, ``data`` as text when it is UTF-8, else
``data_base64``.

Written to a terminal, control characters other than newline and tab (escape sequences
that could retitle the window, move the cursor, rewrite earlier lines or fake tether's
own notes) and invalid UTF-8 are shown escaped (``\x1b``), each stream deciding for
itself; written to a pipe or a file, the bytes are exactly as the program wrote them.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import sys
from typing import BinaryIO

from tether.client.aio import AsyncClient, TimedOut
from tether.coordinator.cli.exitcodes import CLIError, ExitCode
from tether.coordinator.cli.output import printable
from tether.core.output import OutputChunk, Stream


def chunk_dict(c: OutputChunk) -> dict[str, object]:
    d: dict[str, object] = {
        "group_id": c.group_id, "label": c.label, "agent": c.agent, "stream": c.stream.value,
        "run": c.run, "at": datetime.datetime.fromtimestamp(c.at, datetime.UTC)
        .isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "offset": c.offset,
    }
    if c.event:
        d["event"] = c.event
    if c.dropped:
        d["dropped"] = c.dropped
    try:
        d["data"] = c.data.decode("utf-8")
    except UnicodeDecodeError:
        d["data"] = None
        d["data_base64"] = base64.b64encode(c.data).decode()
    return d


def terminal_safe(data: bytes) -> bytes:
    """``data`` for a terminal: newlines and tabs as they are, every other control
    character (and invalid UTF-8) escaped, so output cannot drive the terminal."""
    text = data.decode("utf-8", errors="backslashreplace")
    if text.isprintable():
        return data
    return "\n".join("\t".join(printable(part) for part in line.split("\t"))
                     for line in text.split("\n")).encode()


class Printer:
    def __init__(self, output: str, prefixed: bool, out: BinaryIO | None = None,
                 err: BinaryIO | None = None, *, escape_out: bool = False,
                 escape_err: bool = False) -> None:
        self.json = output == "json"
        self.prefixed = prefixed
        self.out = out or sys.stdout.buffer
        self.err = err or sys.stderr.buffer
        #: Escape control characters (``terminal_safe``) written to out, to err.
        self.escape = {id(self.out): escape_out, id(self.err): escape_err}
        #: Incomplete last lines (with the name that prefixes them), per (group, stream),
        #: when lines are prefixed.
        self.partial: dict[tuple[str, Stream], tuple[str, bytes]] = {}

    def _write(self, dest: BinaryIO, data: bytes) -> None:
        dest.write(terminal_safe(data) if self.escape[id(dest)] else data)

    @staticmethod
    def name(c: OutputChunk) -> str:
        return f"{c.label} {c.group_id}" if c.label else c.group_id

    def chunk(self, c: OutputChunk) -> None:
        if self.json:
            self.out.write(json.dumps(chunk_dict(c)).encode() + b"\n")
            self.out.flush()
            return
        if c.dropped:
            self._note(c, f"{c.dropped} bytes of its output were dropped before this point "
                          "(it wrote faster than they were read)")
        if c.stream is Stream.TETHER:
            self._note(c, c.text)
            return
        dest = self.out if c.stream is Stream.STDOUT else self.err
        if not self.prefixed:
            self._write(dest, c.data)
            dest.flush()
            return
        key = (c.group_id, c.stream)
        data = self.partial.pop(key, ("", b""))[1] + c.data
        *lines, rest = data.split(b"\n")
        head = f"{self.name(c)} | ".encode()
        for line in lines:
            self._write(dest, head + line + b"\n")
        if rest:
            self.partial[key] = (self.name(c), rest)
        dest.flush()

    def _note(self, c: OutputChunk, text: str) -> None:
        where = f" {self.name(c)}" if self.prefixed else ""
        self._write(self.err, f"[tether]{where}: {text}\n".encode(errors="replace"))
        self.err.flush()

    def end(self) -> None:
        for (_, stream), (name, rest) in self.partial.items():
            dest = self.out if stream is Stream.STDOUT else self.err
            self._write(dest, f"{name} | ".encode() + rest + b"\n")
        self.partial.clear()
        self.out.flush()
        self.err.flush()


async def cmd_logs(c: AsyncClient, args: argparse.Namespace) -> int:
    if args.tail is not None and args.tail < 0:
        raise CLIError(f"--tail {args.tail}: give a number of lines, 0 or more")
    printer = Printer(args.output, prefixed=len(args.groups) != 1,
                      escape_out=sys.stdout.isatty(), escape_err=sys.stderr.isatty())
    try:
        async for chunk in c.logs(args.session, groups=args.groups, tail=args.tail,
                                  since=args.since, follow=args.follow, timeout=args.timeout):
            printer.chunk(chunk)
    except TimedOut:
        if not args.follow:
            raise
    finally:
        printer.end()
    return ExitCode.OK
