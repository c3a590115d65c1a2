"""circus from bench/.venv-peers: one circusd per workload, one watcher with
``numprocesses`` copies and ``graceful_timeout=1`` (other options at their defaults, so
``stop_children`` is off), endpoints on 127.0.0.1 at free ports, multicast discovery off.
Driven through circus's own client (``circus.client.CircusClient``, in a helper process
running the venv's Python, see circus_rpc.py) with ``waiting: true``, or through
``circusctl start|stop NAME --waiting``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from harness import BENCH_ENV, RUN_ID, Lab

from peers import venv
from peers.common import StopCall, Workload, free_port, mark_for, program_env

CALL_TIMEOUT = 120.0
HELPER = Path(__file__).resolve().parent / "circus_rpc.py"


def _config(w: Workload, endpoint: str, pubsub: str) -> str:
    env = "\n".join(f"{k} = {v}" for k, v in program_env(mark_for('circus', w.key)).items())
    args = w.command.split(" ", 1)
    return f"""\
[circus]
endpoint = {endpoint}
pubsub_endpoint = {pubsub}
multicast_endpoint =
statsd = false
check_delay = 5

[watcher:{w.key}]
cmd = {args[0]}
args = {args[1] if len(args) > 1 else ""}
numprocesses = {w.count}
graceful_timeout = {w.grace:g}
autostart = false
copy_env = false

[env:{w.key}]
{env}
"""


class Circus:
    name = "circus"
    key = "circus"

    def __init__(self, lab: Lab, unavailable: str = "") -> None:
        self.lab = lab
        self.unavailable = unavailable
        self.proc: subprocess.Popen[bytes] | None = None
        self.helper: subprocess.Popen[str] | None = None
        self.endpoint = ""
        self.root = Path()
        self.serial = 0

    def prepare(self, w: Workload) -> None:
        self.finish()
        self.serial += 1
        self.root = self.lab.root / f"circus-{w.key}-{self.serial}"
        self.root.mkdir(parents=True)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        ini = self.root / "circus.ini"
        ini.write_text(_config(w, self.endpoint, f"tcp://127.0.0.1:{free_port()}"))
        env = {**os.environ, BENCH_ENV: RUN_ID}
        with open(self.root / "circusd.log", "ab") as out:
            self.proc = subprocess.Popen([str(venv.bin_path("circusd")), str(ini)],
                                         start_new_session=True, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, env=env)
        self.helper = subprocess.Popen(
            [str(venv.python()), "-I", str(HELPER), self.endpoint, str(CALL_TIMEOUT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
            env=env)
        deadline = time.monotonic() + 30
        while True:
            reply = self.call({"command": "list", "properties": {}}, timeout=5)
            if reply["error"] is None and reply["reply"].get("status") == "ok":
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"circusd did not come up: {reply}\n"
                                   f"{(self.root / 'circusd.log').read_text(errors='replace')[-800:]}")
            time.sleep(0.1)

    def call(self, msg: dict[str, Any], timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        assert self.helper is not None and self.helper.stdin and self.helper.stdout
        self.helper.stdin.write(json.dumps(msg) + "\n")
        self.helper.stdin.flush()
        ready, _, _ = select.select([self.helper.stdout], [], [], timeout + 5)
        if not ready:
            raise RuntimeError(f"circus client: no answer to {msg['command']} in {timeout:g} s")
        line = self.helper.stdout.readline()
        if not line:
            raise RuntimeError("circus client helper exited")
        out: dict[str, Any] = json.loads(line)
        return out

    def _api(self, command: str, w: Workload) -> dict[str, Any]:
        reply = self.call({"command": command, "properties": {"name": w.key, "waiting": True}})
        if reply["error"] is not None or reply["reply"].get("status") != "ok":
            raise RuntimeError(f"circus {command}: {reply}")
        return reply

    def _ctl(self, *args: str) -> None:
        res = subprocess.run([str(venv.bin_path("circusctl")), "--endpoint", self.endpoint,
                              "--timeout", f"{CALL_TIMEOUT:g}", *args], capture_output=True,
                             text=True, timeout=CALL_TIMEOUT + 10, check=False,
                             stdin=subprocess.DEVNULL)
        if res.returncode != 0 or "ok" not in res.stdout:
            raise RuntimeError(f"circusctl {' '.join(args)} -> {res.returncode}: "
                               f"{(res.stdout + res.stderr)[-300:]}")

    def start(self, w: Workload, via: str, cycle: str) -> float:
        if via == "api":
            self._api("start", w)
        else:
            self._ctl("start", w.key, "--waiting")
        return time.monotonic()

    def stop(self, w: Workload, via: str, cycle: str) -> StopCall:
        if via == "api":
            reply = self._api("stop", w)
            return StopCall(reply["t0"], reply["t1"])
        t0 = time.monotonic()
        self._ctl("stop", w.key, "--waiting")
        return StopCall(t0, time.monotonic())

    def status_argv(self) -> list[str]:
        return [str(venv.bin_path("circusctl")), "--endpoint", self.endpoint, "status"]

    def footprint_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def finish(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.helper is not None:
            with contextlib.suppress(Exception):
                self.call({"command": "quit", "properties": {"waiting": True}}, timeout=15)
        if self.helper is not None:
            with contextlib.suppress(OSError):
                assert self.helper.stdin is not None
                self.helper.stdin.close()
            try:
                self.helper.wait(5)
            except subprocess.TimeoutExpired:
                self.helper.kill()
                self.helper.wait()
            if self.helper.stdout is not None:
                self.helper.stdout.close()
            self.helper = None
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None
