"""Readiness probes: is a freshly started group ready to serve?

A probe is retried until it passes or the start timeout ends. Probing is
inherently asking again (a port cannot announce it is listening), so the
retry interval backs off from 10 ms to 200 ms; process state itself is never
polled (the agent races the probe against the group's exit event).

Every probe is a coroutine on the event loop (HTTP included: a small HTTP/1.1
client over asyncio streams), so a hung endpoint holds no thread, is cancelled
the moment its group's start ends, and can never delay another group's probe.

Outcome classes: a probe that got a definite "no" on its last attempt (HTTP
status outside 2xx/3xx, exec probe exiting non-zero) ends as
``readiness_failed``; one that never got an answer (connection refused, no
log match, exec probe timing out) as ``readiness_timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import errno
import os
import re
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from tether.core.model import Probe, ProbeKind, public_url

BACKOFF_START = 0.01
BACKOFF_MAX = 0.2


@dataclass
class ProbeAttempt:
    ok: bool
    # A definite negative answer (as opposed to no answer at all).
    answered: bool = False
    detail: str = ""


ExecRunner = Callable[[tuple[str, ...], float], Awaitable[tuple[int | None, str]]]
"""Runs an exec probe as its own contained tree: (exit code or None on timeout, detail)."""


async def port_in_use(probe: Probe) -> bool:
    """Before start: does something already answer on the probe's TCP port?"""
    if probe.kind not in (ProbeKind.TCP, ProbeKind.HTTP):
        return False
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(probe.host, probe.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _why(exc: BaseException, probe: Probe) -> str:
    """An exception as a reason (a timeout's own text is empty)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within the {probe.timeout:g} s timeout"
    return str(exc) or type(exc).__name__


def _literal(host: str, port: int) -> tuple[int, Any] | None:
    """An IP address as (family, address): no lookup, no thread."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family, (host, port) if family == socket.AF_INET else (host, port, 0, 0)
    return None


async def _lookup(host: str, port: int) -> tuple[int, Any]:
    """A host name, looked up off the loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return infos[0][0], infos[0][4]


async def _tcp(probe: Probe) -> ProbeAttempt:
    """Connect and close: a bare non-blocking socket, no streams and no timeout context
    (liveness checks of many groups run this often; a transport and two stream objects per
    check cost ten times the connect)."""
    try:
        found = _literal(probe.host, probe.port)
        if found is None:
            found = await asyncio.wait_for(_lookup(probe.host, probe.port), probe.timeout)
        family, address = found
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await _connect(sock, address, probe.timeout)
    except (OSError, TimeoutError) as exc:
        return ProbeAttempt(False, detail=f"tcp {probe.host}:{probe.port}: {_why(exc, probe)}")
    return ProbeAttempt(True)


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


async def _connect(sock: socket.socket, address: Any, timeout: float) -> None:
    """A non-blocking connect: done at once, or when the socket turns writable (its
    SO_ERROR says how), or ``TimeoutError`` after ``timeout``."""
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        loop.add_writer(fd, _settle, done, None)
        timer = loop.call_later(timeout, _settle, done, TimeoutError())
        try:
            await done
        finally:
            timer.cancel()
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def basic_auth(username: str | None, password: str | None) -> str:
    """The ``Authorization`` header line for a URL's ``user:password@`` (percent-decoded,
    UTF-8, as RFC 7617 allows), or "" when the URL has none."""
    if username is None and password is None:
        return ""
    pair = f"{unquote(username or '')}:{unquote(password or '')}".encode()
    return f"Authorization: Basic {base64.b64encode(pair).decode('ascii')}\r\n"


async def _http(probe: Probe) -> ProbeAttempt:
    """GET the probe's URL; any 2xx/3xx status is ready. Runs on the event loop. A
    ``user:password@`` in the URL goes out as Basic authentication; details name the URL
    without it, nor its query string (``public_url``): they end up in records, events,
    /status and logs."""
    url = probe.url
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname or "127.0.0.1"
    shown = public_url(url)
    writer = None
    try:
        async with asyncio.timeout(probe.timeout):
            context = ssl.create_default_context() if parts.scheme == "https" else None
            reader, writer = await asyncio.open_connection(
                host, probe.port, ssl=context, server_hostname=host if context else None)
            netloc = parts.netloc.rpartition("@")[2]
            request = (f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\nConnection: close\r\n"
                       "User-Agent: tether-probe\r\n").encode("latin-1", "replace")
            writer.write(request + basic_auth(parts.username, parts.password).encode()
                         + b"\r\n")
            await writer.drain()
            line = await reader.readline()
    except (OSError, TimeoutError, ssl.SSLError, UnicodeError) as exc:
        return ProbeAttempt(False, detail=f"GET {shown}: {_why(exc, probe)}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    words = line.split()
    if len(words) < 2 or not words[0].startswith(b"HTTP/") or not words[1].isdigit():
        return ProbeAttempt(False, detail=f"GET {shown}: not an HTTP answer ({line[:60]!r})")
    status = int(words[1])
    if 200 <= status < 400:
        return ProbeAttempt(True)
    return ProbeAttempt(False, answered=True, detail=f"GET {shown} answered {status}")


#: Reads of log files for log: probes (a file on a stuck network mount must not hold the
#: event loop, nor threads that other work needs).
FILE_READS = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="tether-logprobe")


def read_from(path: str, offset: int, limit: int = 1 << 20) -> bytes:
    """Up to ``limit`` bytes of a regular file from ``offset``; never opens a FIFO for
    reading (that would wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        return os.pread(fd, limit, offset)
    finally:
        os.close(fd)


class _LogWatcher:
    def __init__(self, path: str, pattern: str) -> None:
        self.path = path
        self.regex = re.compile(pattern)
        self.offset = 0
        self.tail = ""

    async def check(self) -> ProbeAttempt:
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(FILE_READS, read_from, self.path, self.offset)
        except OSError as exc:
            return ProbeAttempt(False, detail=f"log {self.path}: {exc.strerror}")
        self.offset += len(data)
        text = self.tail + data.decode(errors="replace")
        if self.regex.search(text):
            return ProbeAttempt(True)
        self.tail = text[-4096:]
        return ProbeAttempt(False, detail=f"no line matching {self.regex.pattern!r} in {self.path}")


class Prober:
    """One readiness run. ``last`` holds the latest attempt for the failure message."""

    def __init__(self, probe: Probe, log_path: str, run_exec: ExecRunner,
                 log_start: int = 0) -> None:
        self.probe = probe
        self.run_exec = run_exec
        self.last = ProbeAttempt(False, detail="the probe has not run yet")
        self._log = _LogWatcher(log_path, probe.pattern) if probe.kind is ProbeKind.LOG else None
        if self._log is not None:
            self._log.offset = log_start

    async def attempt(self) -> ProbeAttempt:
        p = self.probe
        if p.kind is ProbeKind.TCP:
            return await _tcp(p)
        if p.kind is ProbeKind.HTTP:
            return await _http(p)
        if p.kind is ProbeKind.LOG:
            assert self._log is not None
            return await self._log.check()
        code, detail = await self.run_exec(p.argv, p.timeout)
        if code == 0:
            return ProbeAttempt(True)
        if code is None:
            return ProbeAttempt(False, detail=detail or f"exec probe timed out after {p.timeout} s")
        return ProbeAttempt(False, answered=True, detail=detail or f"exec probe exited {code}")

    async def run(self) -> None:
        delay = BACKOFF_START
        while True:
            self.last = await self.attempt()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Python 3.11 can swallow a cancellation that races a finishing await.
                raise asyncio.CancelledError
            if self.last.ok:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

