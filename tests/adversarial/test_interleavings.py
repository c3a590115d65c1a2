"""Issue 12, the property: for any interleaving of spawn, stop, signal, a client that
gives up mid-call and an agent restart, no process outside tether's groups is ever
signalled, and every group reaches a terminal state with a record.

Real processes, a real authority (the local signaller, the host's strongest
containment), and canaries: processes of nobody's, in their own sessions, that write
down every signal they ever receive.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.plugins.processes import make_authority, marked_alive
from tether.agent.authority import Authority
from tether.core.errors import TetherError
from tether.core.model import GroupSpec, GroupView, Probe, StopOverride
from tether.signallers.registry import Signallers

CANARY = ("import signal, sys, time\n"
          "log = open(sys.argv[1], 'a', buffering=1)\n"
          "def seen(n, f): log.write(signal.Signals(n).name + '\\n')\n"
          "for s in signal.valid_signals():\n"
          "    try: signal.signal(s, seen)\n"
          "    except (OSError, ValueError, RuntimeError): pass\n"
          "print('ready', flush=True)\n"
          "while True: time.sleep(3600)\n")

PROGRAMS = {
    "sleep": ("sleep", "300"),
    "tree": ("sh", "-c", "sleep 300 & setsid sleep 300 & sleep 300"),
    "deaf": ("sh", "-c", "trap '' TERM INT; sleep 300 & sleep 300"),
    "crash": ("sh", "-c", "exit 3"),
    "brief": ("sh", "-c", "sleep 0.05"),
}


class Interleavings(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"interleave-{os.getpid()}-{id(self)}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.canaries = []
        for i in range(2):
            log = self.tmp / f"canary{i}.log"
            p = subprocess.Popen([sys.executable, "-c", CANARY, str(log)], start_new_session=True,
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 env={"PATH": os.environ["PATH"]})
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
            p.stdout.close()
            self.canaries.append((p, log))
        self.generation = 0
        self.authority, self.signallers = self._new()
        self.pending: list[asyncio.Task[GroupView]] = []
        self.groups: dict[str, Authority] = {}

    def _new(self) -> tuple[Authority, Signallers]:
        self.generation += 1
        made = self.loop.run_until_complete(
            make_authority(f"prop-{os.getpid()}-{id(self) % 10000}-{self.generation}"))
        self.authorities = [*getattr(self, "authorities", []), made[0]]
        return made

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _settle(self) -> None:
        """Let pending spawns make progress; collect the ones that finished."""
        self._run(asyncio.sleep(0.02))
        for t in [t for t in self.pending if t.done()]:
            self.pending.remove(t)
            if not t.cancelled() and t.exception() is None:
                self.groups[t.result().group_id] = self.authority

    @rule(kind=st.sampled_from(sorted(PROGRAMS)), probe=st.booleans())
    def spawn(self, kind: str, probe: bool) -> None:
        spec = GroupSpec(argv=PROGRAMS[kind], stop=StopOverride(grace=0.3),
                         ready=Probe.parse("exec:true") if probe else None)
        self.pending.append(self.loop.create_task(self.authority.spawn(spec)))
        self._settle()

    @rule()
    def client_gives_up(self) -> None:
        if self.pending:
            self.pending[-1].cancel()  # the caller leaves; the start must finish anyway
        self._settle()

    # Which group is drawn as an index, always, whatever is live: what is live depends on
    # timing, and hypothesis needs the same draws for the same choices (else it reports
    # FlakyStrategyDefinition, a failure of the test, not of tether).
    @rule(pick=st.integers(0, 15), grace=st.sampled_from([None, 0.0, 0.2]))
    def stop(self, pick: int, grace: float | None) -> None:
        self._settle()
        live = sorted(self.groups)
        if live:
            gid = live[pick % len(live)]
            view = self._run(self.groups[gid].stop(gid, StopOverride(grace=grace)))
            assert view.state.ended and view.exit is not None

    @rule(pick=st.integers(0, 15), sig=st.sampled_from([signal.SIGTERM, signal.SIGUSR1,
                                                        signal.SIGCONT, signal.SIGSTOP]))
    def signal_group(self, pick: int, sig: signal.Signals) -> None:
        self._settle()
        live = sorted(self.groups)
        if live:
            gid = live[pick % len(live)]
            try:
                self._run(self.groups[gid].signal(gid, sig))
            except TetherError:
                pass

    @rule()
    def agent_restart(self) -> None:
        """The agent shuts down (ordered: its kill groups stop) and a new one starts."""
        self._settle()
        for t in self.pending:
            self._run(asyncio.gather(asyncio.shield(t), return_exceptions=True))
        self._settle()
        self._run(self.authority.shutdown())
        self._run(self.signallers.aclose())
        for view in self.authority.views():  # cancelled callers' groups included
            assert view.state.ended and view.exit is not None, view
        self.authority, self.signallers = self._new()

    @invariant()
    def no_stranger_was_signalled(self) -> None:
        for p, log in self.canaries:
            assert p.poll() is None, "a canary died"
            assert log.read_text() == "", f"a canary was signalled: {log.read_text()!r}"

    def teardown(self) -> None:
        try:
            for t in self.pending:
                self._run(asyncio.gather(asyncio.shield(t), return_exceptions=True))
            self._settle()
            self._run(self.authority.stop_all())
            for authority in self.authorities:  # every group any of them ever had
                for view in authority.views():
                    gid = view.group_id
                    assert view.state.ended, f"{gid} never ended: {view.state}"
                    assert view.exit is not None, f"{gid} ended without a record"
                    assert marked_alive(gid) == [], f"{gid} left processes behind"
            self.no_stranger_was_signalled()
        finally:
            self._run(self.authority.shutdown())
            self._run(self.signallers.aclose())
            self.loop.close()
            for p, _ in self.canaries:
                p.kill()
                p.wait()


Interleavings.TestCase.settings = settings(
    max_examples=int(os.environ.get("TETHER_INTERLEAVINGS", "8")), stateful_step_count=10,
    deadline=None, suppress_health_check=list(HealthCheck))
TestInterleavings = pytest.mark.slow(Interleavings.TestCase)
