"""What every manager's driver shares: workloads as data, the marker scan that finds a
manager's processes without asking the manager, free ports, and the result of one cycle.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness import BENCH_ENV, RUN_ID, sleep_exe

#: Set on every program a manager starts for this benchmark; its value names the run,
#: the manager and the workload, so a /proc scan finds exactly that manager's processes.
MARK_ENV = "BENCH_MARK"

SH = "/bin/sh"


@dataclass(frozen=True)
class Workload:
    key: str            # "w1", "w2", "w3"
    title: str
    argv: tuple[str, ...]
    count: int          # programs (trees) started
    per_tree: int       # processes per tree once started (what the marker scan expects)
    grace: float = 1.0  # stop grace / stopwaitsecs / graceful_timeout
    after: float = 0.0  # also count survivors this long after the manager reported stopped
    ignores_term: bool = False  # only SIGKILL ends it: the stop must escalate after the grace

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def workloads(quick: bool) -> dict[str, Workload]:
    sleep = sleep_exe()
    return {
        "w1": Workload("w1", "W1: 100 cooperative programs (`sleep 1000`)",
                       (sleep, "1000"), 100, 1),
        # Ignored dispositions survive exec, so the shell's `sleep` ignores TERM too.
        "w2": Workload("w2", "W2: 100 trees ignoring SIGTERM (`sh -c 'trap \"\" TERM; sleep "
                       "1000'`), grace 1 s", (SH, "-c", f'trap "" TERM; {sleep} 1000'), 100, 2,
                       ignores_term=True),
        # The escapee sleeps 1001 s so it can be told apart from the tree's own sleep.
        "w3": Workload("w3", "W3: 10 trees with a `setsid` escapee",
                       (SH, "-c", f"setsid {sleep} 1001 & {sleep} 1000; wait"), 10, 3,
                       after=5.0),
    }


def mark_for(manager: str, workload: str) -> str:
    return f"{RUN_ID}-{manager}-{workload}"


def program_env(mark: str) -> dict[str, str]:
    """The environment every benchmark program gets, whichever manager starts it."""
    return {MARK_ENV: mark, BENCH_ENV: RUN_ID, "PATH": "/usr/local/bin:/usr/bin:/bin"}


# ---------------------------------------------------------------- finding processes


def _state(pid: str) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3].decode()


def marked(mark: str) -> list[int]:
    """PIDs of live (not zombie) processes whose environment carries ``BENCH_MARK=mark``."""
    needle = f"{MARK_ENV}={mark}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
            if needle not in env or needle not in env.split(b"\0"):
                continue
            if _state(name) in ("Z", "X"):
                continue
        except OSError:
            continue
        out.append(int(name))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def wait_marked(mark: str, expected: int, timeout: float) -> tuple[list[int], float]:
    """Poll the scan until ``expected`` processes carry the mark; (pids, monotonic time seen)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = marked(mark)
        now = time.monotonic()
        if len(pids) >= expected or now > deadline:
            return pids, now
        time.sleep(0.005)


def kill_marked(mark: str, timeout: float = 10.0) -> int:
    """SIGKILL everything still carrying the mark; wait until none is alive. Returns how many."""
    killed = 0
    deadline = time.monotonic() + timeout
    while True:
        pids = marked(mark)
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pids)} process(es) marked {mark} survive SIGKILL: {pids[:10]}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- results


@dataclass
class StopCall:
    """What a manager's stop call told us: when it was sent and when it returned (monotonic)."""
    t0: float
    t1: float
    details: dict[str, Any] = field(default_factory=dict)


class Manager(Protocol):
    """One manager under test. ``via`` is "api" or "cli"."""

    name: str
    #: Short name used in the process marker.
    key: str
    #: Why this manager cannot run here ("" when it can).
    unavailable: str

    def prepare(self, w: Workload) -> None:
        """Start the manager configured for this workload (its programs not started yet)."""

    def start(self, w: Workload, via: str, cycle: str) -> float:
        """Start the workload's programs; return the monotonic time the call(s) returned."""

    def stop(self, w: Workload, via: str, cycle: str) -> StopCall:
        """Stop them the way a user would; return once the manager says they are stopped."""

    def finish(self) -> None:
        """Stop the manager itself (idempotent; safe after errors)."""
