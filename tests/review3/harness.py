"""Harness for review3 reproductions: a private PostgreSQL, `tether coordinator`s on it,
agents, the CLI; daemons are subprocesses killed by their own pid only.

Each reproduction's main() returns 0 when tether behaves as it promises, 1 when the
defect reproduces.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.plugins.postgres import PgCluster, remove_cluster, start_cluster

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class D:
    """A tether daemon (subprocess, own session). ``pre``: python code run before the CLI
    (e.g. to shift the process's wall clock)."""

    def __init__(self, kind: str, args: list[str], log: Path, env: dict[str, str] | None = None,
                 pre: str = "", wait: bool = True, timeout: float = 30) -> None:
        self.log_path = log
        cmd = [PY, "-m", "tether.coordinator.cli", kind, *args]
        if pre:
            cmd = [PY, "-c", pre + "\nimport sys, runpy\nsys.argv = ['tether', *sys.argv[1:]]\n"
                   "runpy.run_module('tether.coordinator.cli', run_name='__main__')",
                   kind, *args]
        self.err = open(log, "a")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.err,
                                     stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self.address = ""
        self.line = ""
        if wait:
            self.wait_listening(timeout)

    def wait_listening(self, timeout: float = 30) -> None:
        result: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if "listening on" in line:
                    result.append(line)
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        deadline = time.monotonic() + timeout
        while t.is_alive() and time.monotonic() < deadline and self.proc.poll() is None:
            t.join(0.1)
        t.join(0.5)
        if not result and not t.is_alive():  # stdout closed: it is exiting, reap it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if not result and self.proc.poll() is not None:
            raise TimeoutError(f"exited with {self.proc.returncode}: {self.log()[-3000:]}")
        if not result:
            raise TimeoutError(f"did not start within {timeout} s: {self.log()[-3000:]}")
        self.line = result[0]
        self.address = result[0].split("listening on ", 1)[1].split()[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdout.close()


class Cluster:
    """Coordinators on one PostgreSQL database, agents registered with them."""

    def __init__(self, prefix: str, ttl: float = 2.0, agent_ttl: float = 3.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"r3-{prefix}-"))
        os.chmod(self.root, 0o755)
        self.pg: PgCluster = start_cluster()
        self.db = self.pg.create_database()
        self.url = self.pg.url(self.db)
        self.ttl = ttl
        self.agent_ttl = agent_ttl
        self.coordinators: list[D] = []
        self.agents: list[D] = []
        self.n = 0

    def coordinator(self, url: str | None = None, *extra: str, pre: str = "",
                    env: dict[str, str] | None = None, name: str = "") -> D:
        self.n += 1
        name = name or f"c{self.n}"
        d = D("coordinator", ["--listen", "127.0.0.1:0", "--state-dir", str(self.root / name),
                              "--leader-ttl", str(self.ttl), "--agent-ttl", str(self.agent_ttl),
                              *extra],
              self.root / f"{name}.log", env={"TETHER_STORE": url or self.url, **(env or {})},
              pre=pre)
        self.coordinators.append(d)
        return d

    @property
    def addresses(self) -> str:
        return ",".join(d.address for d in self.coordinators)

    def agent(self, name: str, *extra: str, coordinators: str = "") -> D:
        d = D("agent", ["--listen", "127.0.0.1:0", "--coordinator",
                        coordinators or self.addresses, "--name", name, "--state-dir",
                        str(self.root / f"agent-{name}"), *extra],
              self.root / f"agent-{name}.log")
        self.agents.append(d)
        return d

    def cli(self, *args: str, addresses: str = "", timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "tether.coordinator.cli", *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env={**os.environ,
                                   "TETHER_COORDINATOR": addresses or self.addresses})

    def views(self, addresses: str = "") -> list[dict[str, Any]]:
        res = self.cli("coordinators", "-o", "json", addresses=addresses, timeout=30)
        try:
            return list(json.loads(res.stdout)["coordinators"])
        except (ValueError, KeyError):
            return []

    def leader(self) -> D | None:
        views = [v for v in self.views() if v.get("role") != "unreachable"]
        leading = [v["address"] for v in views if v.get("role") == "leader"]
        if len(leading) != 1:
            return None
        return next((d for d in self.coordinators if d.address == leading[0]), None)

    def wait_leader(self, timeout: float = 30, other_than: D | None = None) -> D:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = self.leader()
            if d is not None and d is not other_than:
                return d
            time.sleep(0.1)
        raise TimeoutError("no leader")

    def wait_agent_up(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.cli("agents", "-o", "json")
            if res.returncode == 0 and any(a["name"] == name and a["state"] == "up"
                                           for a in json.loads(res.stdout)["agents"]):
                return
            time.sleep(0.2)
        raise TimeoutError(f"agent {name} not up")

    def psql(self, sql: str) -> str:
        return self.pg.psql(sql, self.db)

    def close(self) -> None:
        for d in [*self.agents, *self.coordinators]:
            d.stop()
        remove_cluster(self.pg)


@contextlib.contextmanager
def cluster(prefix: str, **kw: Any) -> Iterator[Cluster]:
    c = Cluster(prefix, **kw)
    try:
        yield c
    finally:
        c.close()


def marked(group_id: str) -> list[int]:
    """PIDs of live processes whose environment carries TETHER_GROUP=group_id (read from
    /proc, not from tether's word)."""
    out = []
    needle = f"TETHER_GROUP={group_id}".encode()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            env = Path(f"/proc/{p}/environ").read_bytes()
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if needle in env.split(b"\0") and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            out.append(int(p))
    return out


class Proxy:
    """A TCP proxy (to PostgreSQL) that can be cut like a network partition: once
    ``tripped``, nothing more is forwarded either way and no socket is closed (the far
    end sees silence, as with dropped packets). ``trip_on``: bytes that, once seen in the
    client-to-server stream and forwarded, trip it (the statement reaches the server, then
    the link goes dark)."""

    def __init__(self, target_port: int, trip_on: bytes = b"", hold_on: bytes = b"") -> None:
        self.target = target_port
        self.trip_on = trip_on
        #: Once seen upstream (and armed), the server's answers are held back until
        #: ``release()``: the caller's transaction is known to be open meanwhile.
        self.hold_on = hold_on
        self.held = threading.Event()
        self._release = threading.Event()
        self.armed = False
        self.tripped = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._held.append(c)
            if self.tripped.is_set():
                continue  # accepted, never answered (a partition)
            try:
                s = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            self._held.append(s)
            threading.Thread(target=self._pump, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                if not self.tripped.is_set():
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                return
            if self.tripped.is_set():
                continue  # dropped
            if not upstream and self.held.is_set() and not self._release.is_set():
                self._release.wait()
            try:
                dst.sendall(data)
            except OSError:
                return
            if upstream and self.armed and self.trip_on and self.trip_on in data:
                self.tripped.set()
            if upstream and self.armed and self.hold_on and self.hold_on in data \
                    and not self.held.is_set():
                self.held.set()

    def release(self) -> None:
        self._release.set()

    def cut(self) -> None:
        self.tripped.set()

    def url(self, cl: Cluster) -> str:
        return cl.url.replace(f":{cl.pg.port}/", f":{self.port}/")


def create_session(addresses: str, name: str, ttl: float = 0.0, timeout: float = 20) -> str:
    """CreateSession through the SDK; returns "ok" or the error (it may not answer)."""
    from tether.client import Client

    try:
        with Client(addresses, failover=timeout, timeout=timeout) as c:
            c.create_session(name, ttl=ttl)
        return "ok"
    except Exception as exc:  # the point is the write it causes, not its answer
        return f"{type(exc).__name__}: {exc}"
