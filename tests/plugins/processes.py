"""Fixtures for real processes: an in-process authority, a `tether serve` subprocess,
and an independent view of what is alive (by the TETHER_GROUP marker, not by
trusting tether's own report)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tether.agent.authority import Authority
from tether.core.model import MARKER_ENV
from tether.signallers.base import SignallerContext
from tether.signallers.local import LocalSignaller
from tether.signallers.registry import Signallers

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def marked_alive(group_id: str | None = None, prefix: str = "", agent: str = "") -> list[int]:
    """PIDs of live (non-zombie) processes carrying the marker (optionally one group's,
    or one agent's)."""
    out = []
    for p in psutil.process_iter(["status"]):
        if p.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        try:
            value = p.environ().get(MARKER_ENV)
        except psutil.Error:
            continue
        if value is None:
            continue
        if group_id is not None and value != group_id:
            continue
        if prefix and not value.startswith(prefix):
            continue
        if agent:
            try:
                if not of_agent(p.environ().get("TETHER_AGENT", ""), agent):
                    continue
            except psutil.Error:
                continue
        out.append(p.pid)
    return out


def of_agent(marker: str, agent: str) -> bool:
    """TETHER_AGENT is "<name>/<instance>": does it name this agent (any instance)?"""
    return marker == agent or marker.startswith(agent + "/")


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


async def make_authority(name: str, containment: str = "auto") -> tuple[Authority, Signallers]:
    ctx = SignallerContext(name, "", {"containment": containment})
    signallers = Signallers(ctx)
    signallers.add(LocalSignaller(ctx))
    return Authority(name, signallers), signallers


@pytest.fixture
async def authority(request: pytest.FixtureRequest) -> AsyncIterator[Authority]:
    containment = getattr(request, "param", "auto")
    name = f"test-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    auth, signallers = await make_authority(name, containment)
    try:
        yield auth
    finally:
        await auth.stop_all()
        await auth.shutdown()
        await signallers.aclose()
        local = signallers.loaded()
        for s in local:
            base = getattr(s, "cgroup_base", None)
            if base is not None:
                with contextlib.suppress(OSError):
                    base.rmdir()


@dataclass
class Daemon:
    """A tether daemon running as a subprocess."""

    proc: subprocess.Popen[str]
    address: str
    state_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, timeout: float = 60, check: bool = False,
            input_: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TETHER_COORDINATOR": self.address, **self.env}
        res = subprocess.run([sys.executable, "-m", "tether.coordinator.cli", *args],
                             capture_output=True, text=True, timeout=timeout, env=env,
                             input=input_, stdin=None if input_ else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise AssertionError(f"tether {' '.join(args)} -> {res.returncode}\n"
                                 f"stdout: {res.stdout}\nstderr: {res.stderr}")
        return res

    def json(self, *args: str, **kw: Any) -> Any:
        res = self.cli(*args, "-o", "json", **kw)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_daemon(kind: str, args: list[str], state_dir: Path, name: str = "",
                 timeout: float = 20, umask: int = -1,
                 env: dict[str, str] | None = None) -> Daemon:
    """Start `tether KIND ...` and wait for its "listening on" line (stdout). ``umask``:
    the daemon's (default: inherited); ``env``: variables added to the daemon's."""
    log_path = state_dir / f"{name or kind}.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "a")  # noqa: SIM115 - owned by the Daemon
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.coordinator.cli", kind, *args],
        stdout=subprocess.PIPE, stderr=out, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True, umask=umask, env={**os.environ, **env} if env else None)
    out.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line or not line:
            break
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        raise AssertionError(f"tether {kind} did not start: {log_path.read_text()}")
    proc.stdout.close()
    address = line.split("listening on ", 1)[1].split()[0]
    return Daemon(proc, address, state_dir, log_path)


def stop_daemon(d: Daemon) -> None:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Daemon]:
    """A real `tether serve` on a free port, with its own state dir."""
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                               "--agent-name", f"local-{tmp_path.name[-12:]}"], tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


def wait_until(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """For *tests* checking the outside world (not product code): bounded re-checks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def async_wait_until(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def catches(pid: int, sig: int) -> bool:
    """Has ``pid`` installed a handler for ``sig`` (SigCgt in /proc/PID/status)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False
