"""Readiness probes: is a freshly started group ready to serve?

A probe is retried until it passes or the start timeout ends. Probing is
inherently asking again (a port cannot announce it is listening), so the
retry interval backs off from 10 ms to 200 ms; process state itself is never
polled (the agent races the probe against the group's exit event).

Outcome classes: a probe that got a definite "no" on its last attempt (HTTP
status outside 2xx/3xx, exec probe exiting non-zero) ends as
``readiness_failed``; one that never got an answer (connection refused, no
log match, exec probe timing out) as ``readiness_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from tether.agent.model import Probe, ProbeKind

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


async def _tcp(probe: Probe) -> ProbeAttempt:
    try:
        async with asyncio.timeout(probe.timeout):
            _, writer = await asyncio.open_connection(probe.host, probe.port)
    except (OSError, TimeoutError) as exc:
        return ProbeAttempt(False, detail=f"tcp {probe.host}:{probe.port}: {exc or 'timeout'}")
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ProbeAttempt(True)


def _http_once(url: str, timeout: float) -> ProbeAttempt:
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("GET", path)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return ProbeAttempt(False, detail=f"GET {url}: {exc}")
    finally:
        conn.close()
    if 200 <= status < 400:
        return ProbeAttempt(True)
    return ProbeAttempt(False, answered=True, detail=f"GET {url} answered {status}")


class _LogWatcher:
    def __init__(self, path: str, pattern: str) -> None:
        self.path = path
        self.regex = re.compile(pattern)
        self.offset = 0
        self.tail = ""

    def check(self) -> ProbeAttempt:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
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
            return await asyncio.to_thread(_http_once, p.url, p.timeout)
        if p.kind is ProbeKind.LOG:
            assert self._log is not None
            return self._log.check()
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

