"""Issue 12.7 and 12.8: nothing that can block runs on the event loop, and one group's
slowness (a FIFO log, hung HTTP endpoints) never delays another's."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.adversarial.helpers import kill_leftovers, processes_of, running, serve, wait_for
from tests.plugins.processes import free_port
from tether.client import AsyncClient
from tether.core.sessions import GroupEntry

pytestmark = pytest.mark.slow


def test_a_fifo_log_is_refused_and_freezes_nothing(tmp_path: Path) -> None:
    name = f"fifo-{os.getpid()}"
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    with running(serve(tmp_path, name)) as d:
        res = d.cli("spawn", "--session", "f", "--log", str(fifo), "--", "sleep", "300")
        assert res.returncode == 1, res.stderr
        assert "invalid_spec" in res.stderr and "FIFO" in res.stderr and str(fifo) in res.stderr
        # The daemon answers everything else, and starts groups as before.
        assert d.cli("sessions").returncode == 0
        ok = d.cli("spawn", "--session", "f", "--log", str(tmp_path / "real.log"), "--",
                   "sh", "-c", "echo hello; sleep 300")
        assert ok.returncode == 0, ok.stderr
        wait_for(lambda: "hello" in (tmp_path / "real.log").read_text(), 30, "the log line")
        assert d.json("stop", "f")["complete"]
    # A log: probe reading a FIFO never opens it blocking either.
    assert not processes_of(name)
    kill_leftovers(name)


#: A web server stuck in a deadlock: it listens (the kernel completes connections) but
#: never accepts, reads or answers.
HUNG = ("import socket, sys, time; s = socket.socket(); "
        "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(64); time.sleep(3600)")


def probe_connections(pid: int, ports: set[int]) -> int:
    """Connections the agent process holds to these ports (its HTTP probes)."""
    import psutil

    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.raddr and c.raddr.port in ports)


def test_hung_http_probes_never_delay_a_healthy_groups_probe(tmp_path: Path) -> None:
    name = f"hung-{os.getpid()}"
    ports = {free_port() for _ in range(12)}
    web_port = free_port()
    try:
        with running(serve(tmp_path, name)) as d:
            async def body() -> None:
                async with AsyncClient(d.address) as c:
                    stuck = [asyncio.ensure_future(c.spawn(
                        [sys.executable, "-c", HUNG, str(port)], session="h",
                        label=f"stuck{port}", ready=f"http://127.0.0.1:{port}/",
                        probe_timeout=3600, start_timeout=3600)) for port in ports]
                    await asyncio.get_running_loop().run_in_executor(
                        None, wait_for,
                        lambda: probe_connections(d.proc.pid, ports) >= len(ports), 60,
                        "every stuck probe to hang on its server")
                    # Twelve probes hang; a healthy server's probe passes regardless.
                    web = await c.spawn(
                        [sys.executable, "-m", "http.server", str(web_port),
                         "--bind", "127.0.0.1"], session="h", label="web",
                        ready=f"http://127.0.0.1:{web_port}/", start_timeout=60)
                    assert web.state.value == "running"
                    report = await c.stop("h", timeout=60)
                    assert report.complete and report.clean
                    for s in await asyncio.gather(*stuck, return_exceptions=True):
                        # Stopped while starting: the spawn answers with the stop's record.
                        assert isinstance(s, GroupEntry) and s.state.value == "stopped", s
                # The stopped groups' probes were cancelled: their connections are closed.
                wait_for(lambda: probe_connections(d.proc.pid, ports) == 0, 30,
                         "the hung probes' connections to close")

            asyncio.run(body())
            assert not processes_of(name)
    finally:
        kill_leftovers(name)

