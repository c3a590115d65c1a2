"""The audit log: who did what to which session or group, and how it ended.

One JSON object per line in ``<state dir>/audit.jsonl`` (private: 0600 in a 0700
directory, created so), and the same line at log level INFO (logger
``tether.audit``). Lines are written by a thread of the log's own, never on the
event loop: ``record`` only queues. The file is rotated by size
(``audit.jsonl.1`` ... ``.N``, oldest dropped).

What goes in is decided by the caller (``tether.rpc.auth`` builds entries from a
whitelist of request fields); this module never sees a request, so environment
values cannot reach it by accident.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.core.private import open_private, private_dir

log = logging.getLogger(__name__)

MAX_BYTES = 16 * 1024 * 1024
BACKUPS = 5
#: At most this many entries are returned by one read.
MAX_READ = 100_000

_STOP = object()


@dataclass(frozen=True)
class AuditEntry:
    """One audited call, as the API and the SDK return it (the file holds it as JSON)."""

    time: float
    method: str
    role: str
    credential: str
    result: str
    proof: str = ""
    peer: str = ""
    message: str = ""
    session: str = ""
    group: str = ""
    agent: str = ""
    details: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditEntry:
        details = d.get("details")
        return cls(parse_time(str(d["time"])), str(d.get("method", "")), str(d.get("role", "")),
                   str(d.get("credential", "")), str(d.get("result", "")),
                   str(d.get("proof", "")), str(d.get("peer", "")), str(d.get("message", "")),
                   str(d.get("session", "")), str(d.get("group", "")), str(d.get("agent", "")),
                   {str(k): str(v) for k, v in details.items()}
                   if isinstance(details, Mapping) else {})

    def to_dict(self) -> dict[str, Any]:
        """As in the file: ``time`` in ISO 8601 UTC, empty fields left out."""
        out: dict[str, Any] = {"time": timestamp(self.time)}
        for name in ("method", "role", "credential", "proof", "peer", "result", "session",
                     "group", "agent", "message"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.details:
            out["details"] = dict(self.details)
        return out


def timestamp(at: float) -> str:
    """``2024-05-01T10:00:00.123Z``: UTC, milliseconds."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


class AuditLog:
    """Queue entries from the event loop; a thread appends them, rotating by size.

    ``path`` None: entries go to the log only (an agent without a state directory)."""

    def __init__(self, path: str | Path | None, *, max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS) -> None:
        self.path = Path(path) if path is not None else None
        self.max_bytes = max_bytes
        self.backups = backups
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.write_errors = 0
        if self.path is not None:
            private_dir(self.path.parent)
            # Created now, on the caller's thread, so a bad directory fails the start-up.
            os.close(open_private(self.path))
            self._thread = threading.Thread(target=self._run, name="tether-audit", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return f"<AuditLog {self.path or 'log only'}>"

    # ------------------------------------------------------------ writing (event loop)

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one entry (``time`` is added if missing). Never blocks."""
        entry.setdefault("time", timestamp(time.time()))
        line = json.dumps(entry, separators=(",", ":"), sort_keys=False, ensure_ascii=True)
        log.info("audit %s", line)
        if self._thread is not None and not self._closed:
            self._queue.put(line)

    async def flushed(self) -> None:
        """Return once every entry recorded before this call is in the file."""
        if self._thread is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(settle)

        self._queue.put(wake)
        await done

    async def aclose(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        assert self.path is not None
        fd = -1
        size = 0
        while True:
            item = self._queue.get()
            lines: list[str] = []
            wakes = []
            stop = False
            while True:  # everything queued so far, in one write
                if item is _STOP:
                    stop = True
                elif callable(item):
                    wakes.append(item)
                else:
                    lines.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                chunk = bytearray()
                for line in lines:
                    data = (line + "\n").encode()
                    if fd < 0:
                        fd = open_private(self.path)
                        size = os.fstat(fd).st_size
                    if size + len(chunk) and size + len(chunk) + len(data) > self.max_bytes:
                        _write_all(fd, bytes(chunk))  # what fits, then a new file
                        os.fsync(fd)
                        os.close(fd)
                        fd = -1
                        chunk.clear()
                        self._rotate()
                        fd = open_private(self.path)
                        size = 0
                    chunk += data
                if chunk:
                    _write_all(fd, bytes(chunk))
                    size += len(chunk)
            except OSError as exc:
                self.write_errors += 1
                log.error("cannot write the audit log %s: %s; %d entries are only in this "
                          "log; free space or fix the state directory", self.path,
                          exc.strerror, len(lines))
                if fd >= 0:
                    os.close(fd)
                    fd = -1
            for wake in wakes:
                wake()
            if stop:
                if fd >= 0:
                    os.fsync(fd)
                    os.close(fd)
                return

    def _rotate(self) -> None:
        assert self.path is not None
        for n in range(self.backups - 1, 0, -1):
            older = self._backup(n)
            if older.exists():
                os.replace(older, self._backup(n + 1))
        if self.backups > 0:
            os.replace(self.path, self._backup(1))
        else:
            os.unlink(self.path)

    def _backup(self, n: int) -> Path:
        assert self.path is not None
        return self.path.with_name(f"{self.path.name}.{n}")

    # ------------------------------------------------------------ reading

    def files(self) -> list[Path]:
        """Oldest first."""
        if self.path is None:
            return []
        older = [self._backup(n) for n in range(self.backups, 0, -1)]
        return [p for p in [*older, self.path] if p.exists()]

    async def read(self, since: float = 0.0, limit: int = 0) -> list[dict[str, Any]]:
        """The most recent ``limit`` entries (0: ``MAX_READ``) at or after ``since`` (seconds
        since the epoch), oldest first; read on a thread, after pending writes."""
        await self.flushed()
        return await asyncio.to_thread(self._read, since, limit or MAX_READ)

    def _read(self, since: float, limit: int) -> list[dict[str, Any]]:
        return list(collections.deque(read_entries(self.files(), since), maxlen=limit))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_entries(files: list[Path], since: float = 0.0) -> Iterator[dict[str, Any]]:
    """Entries of audit files (oldest file first) at or after ``since``; lines that are not
    entries (a torn last line after a crash) are skipped."""
    # Entries carry millisecond times: compare whole milliseconds, so that a time copied
    # from an entry (through float seconds and protobuf nanoseconds) still finds it.
    since_ms = round(since * 1000)
    for path in files:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            continue  # rotated away meanwhile
        with f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                    at = parse_time(entry["time"]) if isinstance(entry, dict) else None
                except (ValueError, KeyError, TypeError):
                    continue
                if at is not None and round(at * 1000) >= since_ms:
                    yield entry
