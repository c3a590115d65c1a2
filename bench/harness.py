"""Benchmark plumbing: tether daemons as subprocesses, baseline children, an
independent view of when processes are gone (pidfds polled in a thread), and a
cleanup that leaves nothing behind (daemons, their groups, guardians, cgroups).

Nothing here asserts on timing; it only measures.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: Every process the benchmark asks tether (or Popen) to start carries this variable,
#: so the final sweep can find anything that escaped, independently of tether.
BENCH_ENV = "TETHER_BENCH"
RUN_ID = f"b{os.getpid()}"


def tether_exe() -> str:
    """The real console script next to this interpreter (not a pyenv shim)."""
    beside = Path(sys.executable).parent / "tether"
    if beside.exists():
        return str(beside)
    found = shutil.which("tether")
    if found is None:
        raise SystemExit("the `tether` console script is not installed (pip install -e .)")
    return found


def byte_compile_tether() -> None:
    """Write tether's .pyc files, as `pip install` does. An editable install under
    PYTHONDONTWRITEBYTECODE (set on some machines) would otherwise recompile every module
    on every CLI start, while the peers, installed by pip, start from bytecode."""
    import compileall
    import importlib.util

    for name in ("tether", "tether.agent", "tether.coordinator", "tether.signallers"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for d in spec.submodule_search_locations:
                compileall.compile_dir(d, quiet=1)


def sleep_exe() -> str:
    return shutil.which("sleep") or "/bin/sleep"


def cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    return None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return percentile(values, 50)


@dataclass
class Daemon:
    kind: str
    name: str
    proc: subprocess.Popen[str]
    address: str
    log_path: Path


@dataclass
class Lab:
    """Owns every process and directory the benchmark creates; ``close`` undoes all of it."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tether-bench-")))
    daemons: list[Daemon] = field(default_factory=list)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agent_names: list[str] = field(default_factory=list)
    keep_logs: bool = False
    #: Containment level the local signaller picked, as the first daemon logged it.
    containment: str = ""

    # ------------------------------------------------------------ daemons

    def start(self, kind: str, *args: str, name: str = "", timeout: float = 30.0) -> Daemon:
        """Run ``tether KIND ARGS`` and wait for its "listening on HOST:PORT" line."""
        label = name or kind
        log_path = self.root / f"{label}.log"
        env = {**os.environ}
        env.pop("TETHER_COORDINATOR", None)
        with open(log_path, "a") as err:
            proc = subprocess.Popen(
                [tether_exe(), kind, *args], stdout=subprocess.PIPE, stderr=err,
                stdin=subprocess.DEVNULL, text=True, start_new_session=True, env=env)
        daemon = Daemon(kind, label, proc, "", log_path)
        self.daemons.append(daemon)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                if "listening on" in line or not line:
                    break
            elif proc.poll() is not None:
                break
        if "listening on" not in line:
            self.stop_daemon(daemon)
            raise RuntimeError(f"tether {kind} did not start within {timeout:g} s:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        proc.stdout.close()
        daemon.address = line.split("listening on ", 1)[1].split()[0]
        if not self.containment:
            found = re.search(r"containment (\w+)", line + log_path.read_text(errors="replace"))
            self.containment = found.group(1) if found else ""
        return daemon

    def wait_log(self, d: Daemon, text: str, timeout: float = 15.0) -> None:
        """Wait until the daemon's log (stderr) contains ``text``."""
        deadline = time.monotonic() + timeout
        while text not in d.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline or d.proc.poll() is not None:
                raise RuntimeError(f"{d.name}: no {text!r} in its log within {timeout:g} s")
            time.sleep(0.02)

    def serve(self, name: str) -> Daemon:
        self.agent_names.append(name)
        return self.start("serve", "--listen", "127.0.0.1:0", "--state-dir",
                          str(self.root / name), "--agent-name", name, name=name)

    def agent(self, name: str, coordinator: str = "") -> Daemon:
        self.agent_names.append(name)
        args = ["--listen", "127.0.0.1:0", "--state-dir", str(self.root / name), "--name", name]
        if coordinator:
            args += ["--coordinator", coordinator]
        d = self.start("agent", *args, name=name)
        # `tether agent` answers RPCs before its start-up orphan sweep has run, and that
        # sweep kills a group spawned meanwhile (see bench/README.md); the guardian starts
        # right after the sweep.
        self.wait_log(d, "guardian started")
        return d

    def coordinator(self, name: str) -> Daemon:
        return self.start("coordinator", "--listen", "127.0.0.1:0", "--state-dir",
                          str(self.root / name), name=name)

    def stop_daemon(self, d: Daemon, timeout: float = 30.0) -> None:
        """SIGTERM (the daemon stops its groups in order), then SIGKILL its process group."""
        if d.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(d.proc.pid, signal.SIGKILL)
        if d in self.daemons:
            self.daemons.remove(d)

    # ------------------------------------------------------------ baseline children

    def popen(self, argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={BENCH_ENV: RUN_ID})
        self.children.append(p)
        return p

    def forget_children(self) -> None:
        self.children = [p for p in self.children if p.returncode is None]

    # ------------------------------------------------------------ cleanup

    def close(self) -> list[str]:
        """Stop everything; return what had to be killed by the sweep (should be empty)."""
        notes: list[str] = []
        for p in self.children:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.children.clear()
        # Agents before coordinators, newest first.
        for d in sorted(reversed(self.daemons), key=lambda d: d.kind == "coordinator"):
            self.stop_daemon(d)
        notes += sweep(self.agent_names)
        mount = cgroup2_mount()
        if mount is not None:
            for name in self.agent_names:
                base = mount / f"tether.{name}"
                if base.is_dir():
                    for child in sorted(base.glob("**/"), key=lambda p: -len(p.parts)):
                        with contextlib.suppress(OSError):
                            child.rmdir()
        if not self.keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)
        return notes


def sweep(agent_names: list[str], wait: float = 5.0) -> list[str]:
    """Kill anything of this run still alive: marked children, and guardians of our agents."""
    notes: list[str] = []
    deadline = time.monotonic() + wait
    while True:
        found: list[psutil.Process] = []
        for p in psutil.process_iter(["status", "cmdline"]):
            if p.pid == os.getpid() or p.info["status"] in (psutil.STATUS_ZOMBIE,
                                                            psutil.STATUS_DEAD):
                continue
            cmd = p.info["cmdline"] or []
            if "tether.agent.guardian" in cmd and any(n in cmd for n in agent_names):
                found.append(p)
                continue
            try:
                if p.environ().get(BENCH_ENV) == RUN_ID:
                    found.append(p)
            except psutil.Error:
                continue
        if not found:
            return notes
        if time.monotonic() >= deadline:
            for p in found:
                notes.append(f"swept pid {p.pid}: {' '.join(p.info['cmdline'] or [])[:80]}")
                with contextlib.suppress(psutil.Error):
                    p.kill()
            return notes
        time.sleep(0.1)  # guardians exit on their own shortly after their agent


def live_marked(group_ids: set[str]) -> list[int]:
    """PIDs of live processes of these tether groups (by TETHER_GROUP, not tether's report)."""
    out = []
    for p in psutil.process_iter(["status"]):
        if p.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if env.get(BENCH_ENV) == RUN_ID and env.get("TETHER_GROUP") in group_ids:
            out.append(p.pid)
    return out


class GoneWatcher:
    """When did each of these PIDs exit? pidfds polled in a thread, independent of tether.

    A zombie counts as gone (a pidfd becomes readable when its process exits).
    """

    def __init__(self, pids: list[int]) -> None:
        self.expected = len(set(pids))
        self.fds: dict[int, int] = {}
        self.gone_at: dict[int, float] = {}
        for pid in pids:
            try:
                self.fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                self.gone_at[pid] = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gone-watcher")
        self._stop = False

    def __enter__(self) -> GoneWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(2)
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        remaining = len(self.fds)
        while remaining and not self._stop:
            for fd, _ in poller.poll(200):
                now = time.monotonic()
                poller.unregister(fd)
                self.gone_at[self.fds[fd]] = now
                remaining -= 1

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def all_gone(self) -> bool:
        return len(self.gone_at) == self.expected

    def last(self) -> float:
        return max(self.gone_at.values())
