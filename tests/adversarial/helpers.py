"""What the adversarial tests share: real `tether serve` daemons and a few probes of the
outside world (never tether's own word)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from tests.plugins.processes import Daemon, of_agent, start_daemon, stop_daemon

UNIFIED = Path("/sys/fs/cgroup/unified")


def serve(tmp_path: Path, name: str, *extra: str, state: Path | None = None,
          port: str = "0") -> Daemon:
    d = start_daemon("serve", ["--listen", f"127.0.0.1:{port}", "--state-dir",
                               str(state or tmp_path / f"state-{name}"), "--agent-name", name,
                               *extra], tmp_path, name=name)
    d.env["TETHER_TEST_AGENT"] = name
    return d


def spawn(d: Daemon, session: str, argv: list[str], *opts: str,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    res = d.cli("spawn", "--session", session, *opts, "--", *argv)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def gid(res: subprocess.CompletedProcess[str]) -> str:
    return res.stdout.strip().splitlines()[-1]


PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit


def _exiting(pid: int) -> bool:
    """The task is exiting: it has left its cgroup (which then reports empty) but is not
    a zombie yet. As dead as a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return bool(int(fields[6]) & PF_EXITING)  # field 9 of stat: flags
    except (OSError, ValueError, IndexError):
        return True  # gone


def processes_of(agent: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["status"]):
        if p.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) or _exiting(p.pid):
            continue
        with contextlib.suppress(psutil.Error):
            if of_agent(p.environ().get("TETHER_AGENT", ""), agent):
                out.append(p)
    return out


def kill_leftovers(*agents: str) -> None:
    for agent in agents:
        for p in processes_of(agent):
            with contextlib.suppress(psutil.Error):
                p.kill()


def trees(agent: str) -> list[Path]:
    """cgroup trees of an agent's instances (tether.<name>.<instance>), wherever they are."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in agent)
    prefix = f"tether.{safe}."
    found: list[Path] = []
    for root, dirs, _ in os.walk(UNIFIED):  # other tests' trees come and go meanwhile
        found += [Path(root, d) for d in dirs if d.startswith(prefix)]
    return sorted(found)


@contextlib.contextmanager
def running(d: Daemon) -> Iterator[Daemon]:
    try:
        yield d
    finally:
        stop_daemon(d)


def stranger(*argv: str) -> subprocess.Popen[bytes]:
    """A process tether has nothing to do with: its own session, no marker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    return subprocess.Popen(list(argv) or ["sleep", "300"], start_new_session=True, env=env,
                            stdin=subprocess.DEVNULL)


def reap(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()


def metric(address: str, name: str, labels: str = "") -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels) if labels else "")) and not \
                line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


def wait_for(pred: Any, timeout: float, what: str, every: float = 0.05) -> Any:
    """Re-check the outside world until ``pred()`` is truthy (a liveness bound, not a
    timing assertion: a pass never depends on how fast it happens)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def tether(*args: str, env: dict[str, str] | None = None, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether.coordinator.cli", *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def as_json(res: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(res.stdout)
