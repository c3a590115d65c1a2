"""The plain-Python baseline: Popen in a new session, killpg, waitpid.

What a tool gets with no manager at all: no containment beyond the process group (so a
``setsid`` escapee survives), no exit record, no API. For a tree that ignores SIGTERM it
waits for the grace on pidfds (not a polling loop: ``Popen.wait(timeout)`` sleeps in steps
of up to 50 ms) and then SIGKILLs the process group.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time

from peers.common import StopCall, Workload, mark_for, program_env


class Baseline:
    name = "plain Python"
    key = "base"
    unavailable = ""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def prepare(self, w: Workload) -> None:
        self.finish()

    def start(self, w: Workload, via: str, cycle: str) -> float:
        env = program_env(mark_for(self.key, w.key))
        for _ in range(w.count):
            self.procs.append(subprocess.Popen(
                w.argv, start_new_session=True, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return time.monotonic()

    def stop(self, w: Workload, via: str, cycle: str) -> StopCall:
        procs, self.procs = self.procs, []
        t0 = time.monotonic()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        if w.ignores_term:
            self._kill_after_grace(procs, t0 + w.grace)
        for p in procs:
            p.wait()
        return StopCall(t0, time.monotonic())

    @staticmethod
    def _kill_after_grace(procs: list[subprocess.Popen[bytes]], deadline: float) -> None:
        fds = {os.pidfd_open(p.pid): p for p in procs}
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        alive = dict(fds)
        try:
            while alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for fd, _ in poller.poll(left * 1000):
                    poller.unregister(fd)
                    alive.pop(fd, None)
            for p in alive.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        finally:
            for fd in fds:
                os.close(fd)

    def finish(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.procs.clear()
