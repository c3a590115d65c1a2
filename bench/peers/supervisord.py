"""supervisord from bench/.venv-peers: one daemon per workload, one program with ``numprocs``
copies, ``stopasgroup``/``killasgroup`` on and ``stopwaitsecs=1`` (its best settings for
process trees). Driven through XML-RPC (``supervisor.startProcessGroup`` /
``stopProcessGroup`` with ``wait=True``) or through ``supervisorctl start|stop all``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from harness import BENCH_ENV, RUN_ID, Lab

from peers import venv
from peers.common import StopCall, Workload, free_port, mark_for, program_env

CALL_TIMEOUT = 120.0


class _Transport(xmlrpc.client.Transport):
    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host: Any) -> Any:
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn


def _config(root: Path, w: Workload, port: int) -> str:
    env = ",".join(f'{k}="{v}"' for k, v in program_env(mark_for('supervisord', w.key)).items())
    return f"""\
[supervisord]
nodaemon = true
user = root
logfile = {root}/supervisord.log
pidfile = {root}/supervisord.pid
childlogdir = {root}
loglevel = info

[inet_http_server]
port = 127.0.0.1:{port}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = http://127.0.0.1:{port}

[program:{w.key}]
command = {w.command.replace("%", "%%")}
numprocs = {w.count}
process_name = %(program_name)s_%(process_num)03d
autostart = false
autorestart = false
startsecs = 0
stopasgroup = true
killasgroup = true
stopwaitsecs = {max(1, round(w.grace))}
stdout_logfile = NONE
stderr_logfile = NONE
environment = {env}
"""


class Supervisord:
    name = "supervisord"
    key = "supervisord"

    def __init__(self, lab: Lab, unavailable: str = "") -> None:
        self.lab = lab
        self.unavailable = unavailable
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = Path()
        self.rpc: Any = None
        self.serial = 0

    def prepare(self, w: Workload) -> None:
        self.finish()
        self.serial += 1
        root = self.lab.root / f"supervisord-{w.key}-{self.serial}"
        root.mkdir(parents=True)
        port = free_port()
        self.conf = root / "supervisord.conf"
        self.conf.write_text(_config(root, w, port))
        with open(root / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(
                [str(venv.bin_path("supervisord")), "-c", str(self.conf)],
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env={**os.environ, BENCH_ENV: RUN_ID})
        self.rpc = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/RPC2",
                                             transport=_Transport(CALL_TIMEOUT))
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.rpc.supervisor.getState()["statename"] == "RUNNING":
                    return
            except (OSError, xmlrpc.client.Error):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not come up; see {root}/stdout.log:\n"
                                   f"{(root / 'stdout.log').read_text(errors='replace')[-800:]}")
            time.sleep(0.05)

    def _ctl(self, *args: str) -> None:
        res = subprocess.run([str(venv.bin_path("supervisorctl")), "-c", str(self.conf), *args],
                             capture_output=True, text=True, timeout=CALL_TIMEOUT, check=False,
                             stdin=subprocess.DEVNULL)
        # supervisorctl exits non-zero when a process was not in the expected state; the
        # benchmark judges by the marker scan, but an unreachable daemon is an error.
        if "refused" in res.stdout + res.stderr or "error" in res.stderr.lower():
            raise RuntimeError(f"supervisorctl {' '.join(args)} -> {res.returncode}: "
                               f"{(res.stdout + res.stderr)[-300:]}")

    def start(self, w: Workload, via: str, cycle: str) -> float:
        if via == "api":
            results = self.rpc.supervisor.startProcessGroup(w.key, True)
            bad = [r for r in results if r.get("status") != 80]  # 80: SUCCESS
            if bad:
                raise RuntimeError(f"supervisord startProcessGroup: {bad[:3]}")
        else:
            self._ctl("start", "all")
        return time.monotonic()

    def stop(self, w: Workload, via: str, cycle: str) -> StopCall:
        t0 = time.monotonic()
        if via == "api":
            results = self.rpc.supervisor.stopProcessGroup(w.key, True)
            t1 = time.monotonic()
            details = {"not_success": len([r for r in results if r.get("status") != 80])}
        else:
            self._ctl("stop", "all")
            t1 = time.monotonic()
            details = {}
        return StopCall(t0, t1, details)

    def status_argv(self) -> list[str]:
        return [str(venv.bin_path("supervisorctl")), "-c", str(self.conf), "status"]

    def footprint_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def finish(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, xmlrpc.client.Error):
                self.rpc.supervisor.shutdown()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
