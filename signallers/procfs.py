"""This host's process table, read from ``/proc``: one module for the local signaller,
the orphan finder and the guardian.

Reads are small (two syscalls per file) and never block on disk: /proc is kernel
state. Start times are kept in clock ticks since boot (``/proc/PID/stat`` field
22), the unit the membership rule compares; ``start_time`` converts to seconds
since the epoch the way psutil does (``btime + ticks / HZ``), so values from either
agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Final

from tether.core.model import AGENT_ENV, MARKER_ENV
from tether.signallers.membership import Proc, parse_stat

HZ: Final = os.sysconf("SC_CLK_TCK")


def read_small(path: str) -> bytes:
    """Read a small /proc or /sys file with two syscalls (pathlib costs more than the read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


@cache
def boot_time() -> int:
    """Seconds since the epoch at boot (``btime`` in /proc/stat), as psutil reads it."""
    for line in read_small("/proc/stat").decode().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    return 0


def now_ticks() -> int:
    """Clock ticks since boot, now (the clock /proc start times are measured on)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * HZ)


def ticks_to_epoch(ticks: int) -> float:
    return boot_time() + ticks / HZ


def epoch_to_ticks(seconds: float) -> int:
    return round((seconds - boot_time()) * HZ)


def stat(pid: int) -> Proc | None:
    """One process's row, or None if it does not exist.

    Only "no such process" means gone: any other failure (no fds left, /proc not
    mounted) raises, because reading it as "gone" would let a stop report an empty
    group that still runs."""
    try:
        return parse_stat(read_small(f"/proc/{pid}/stat"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """Exists and is not a zombie (zombies count as dead)."""
    p = stat(pid)
    return p is not None and p.alive


def start_time(pid: int) -> float | None:
    """Start time of ``pid`` in seconds since the epoch, or None if it does not exist."""
    p = stat(pid)
    return None if p is None else ticks_to_epoch(p.start)


def same_process(pid: int, start: float) -> bool:
    """``pid`` still names the process that started at ``start`` (to the clock tick)."""
    p = stat(pid)
    return p is not None and p.start == epoch_to_ticks(start)


def environ(pid: int) -> bytes:
    """The raw environment block of ``pid``, with a NUL before every entry (so
    ``b"\\0NAME="`` finds a variable), or b"" if unreadable. Zombies and kernel threads
    have none."""
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"\0" + b"".join(chunks)
    except OSError:
        return b""
    finally:
        os.close(fd)


def env_value(block: bytes, name: str) -> str | None:
    key = b"\0" + name.encode() + b"="
    at = block.find(key)
    if at < 0:
        return None
    start = at + len(key)
    end = block.find(b"\0", start)
    return block[start:end if end >= 0 else None].decode(errors="replace")


def carries(block: bytes, agent_marker: str, group_id: str | None = None) -> bool:
    """The environment carries this agent instance's marker (and the group's, if given)."""
    if (b"\0" + f"{AGENT_ENV}={agent_marker}".encode() + b"\0") not in block + b"\0":
        return False
    return group_id is None or (
        (b"\0" + f"{MARKER_ENV}={group_id}".encode() + b"\0") in block + b"\0")


def pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def snapshot(marker: tuple[str, str] | None = None) -> dict[int, Proc]:
    """Every process but this one. With ``marker`` = (agent marker, group id), live
    processes whose environment carries both are ``marked``."""
    me = os.getpid()
    out: dict[int, Proc] = {}
    for pid in pids():
        if pid == me:
            continue
        p = stat(pid)
        if p is None:
            continue
        if marker is not None and p.alive and carries(environ(pid), *marker):
            p = Proc(p.pid, p.ppid, p.pgid, p.sid, p.start, p.state, p.comm, True)
        out[pid] = p
    return out


def cmdline(pid: int, limit: int = 200) -> str:
    try:
        raw = read_small(f"/proc/{pid}/cmdline")
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")[:limit]


def children_of_self() -> list[int]:
    found: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            found.extend(int(p) for p in read_small(f"/proc/self/task/{task}/children").split())
    return found


def open_fds() -> int:
    """File descriptors this process holds now."""
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------- pidfds


def signal_pid_safely(pid: int, sigs: signal.Signals | Sequence[signal.Signals],
                      check: Callable[[int], bool]) -> bool:
    """Signal ``pid`` only if, with a pidfd held, ``check(pid)`` still says it is ours.
    Several signals go out in order through the same pidfd."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not check(pid):
            return False
        for s in (sigs,) if isinstance(sigs, signal.Signals) else sigs:
            signal.pidfd_send_signal(pidfd, s)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


async def wait_pidfds(pids: Iterable[int], timeout: float | None) -> bool:
    """Wait until every pid in ``pids`` has exited (pidfd readable). False on timeout."""
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    futs: list[asyncio.Future[None]] = []
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue  # already gone
            fds.append(fd)
            fut: asyncio.Future[None] = loop.create_future()
            futs.append(fut)

            def ready(f: asyncio.Future[None] = fut, fd: int = fd) -> None:
                loop.remove_reader(fd)
                if not f.done():
                    f.set_result(None)

            loop.add_reader(fd, ready)
        if not futs:
            return True
        _, pending = await asyncio.wait(futs, timeout=timeout)
        return not pending
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)
