"""A real PostgreSQL for the coordinator's shared store, from Debian's package.

``pg_cluster`` (session scope) runs ``initdb`` and ``pg_ctl`` on a private directory
(as the ``postgres`` user when the tests run as root: PostgreSQL refuses to run as
root), listening on a loopback port of its own and a private unix socket directory,
never on the system cluster's 5432. Each test that asks for ``pg_url`` gets a database
of its own, dropped afterwards. ``private_cluster()`` starts a cluster for one test
(one it may stop and restart under load without disturbing the others).

Local connections are trusted; TCP connections need the password (scram-sha-256), so
a wrong one is refused as it would be in production. Outside CI a missing PostgreSQL
skips with the reason; under TETHER_REQUIRE_ALL=1 it fails (``tests.plugins.common``).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.common import require

USER = "tether"
PASSWORD = "tether-test-pw-7f3c"
_databases = itertools.count(1)


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    root: Path
    port: int
    run_as: dict[str, Any]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def _ctl(self, *args: str, timeout: float = 60) -> None:
        ctl = pg_bin("pg_ctl")
        assert ctl is not None
        res = subprocess.run([ctl, "-D", str(self.data), *args], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL, **self.run_as)
        if res.returncode != 0:
            raise AssertionError(f"pg_ctl {' '.join(args)} failed: {res.stdout}{res.stderr}\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}")

    def start(self) -> None:
        self._ctl("start", "-w", "-l", str(self.log), "-o",
                  f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("stop", "-w", "-m", mode)

    def restart(self) -> None:
        self._ctl("restart", "-w", "-m", "fast", "-l", str(self.log), "-o",
                  f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1")

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = pg_bin("psql")
        assert psql is not None
        res = subprocess.run([psql, "-h", str(self.sockets), "-p", str(self.port), "-U", USER,
                              "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
                             capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL, **self.run_as)
        if res.returncode != 0:
            raise AssertionError(f"psql {sql!r}: {res.stderr}")
        return res.stdout.strip()

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(_databases)}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(AssertionError):
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_cluster() -> PgCluster:
    """initdb and start a cluster in a fresh private directory."""
    initdb = pg_bin("initdb")
    require(initdb is not None and pg_bin("pg_ctl") is not None,
            "needs PostgreSQL's initdb and pg_ctl (Debian package postgresql; "
            ".ci/install-deps installs it)")
    assert initdb is not None
    root = Path(tempfile.mkdtemp(prefix="tether-pg-"))
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own user, its own files
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            require(False, "running as root needs the postgres user (package postgresql)")
            raise
        os.chown(root, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [],
                  "cwd": str(root)}
    os.chmod(root, 0o700)
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    cluster = PgCluster(root, _free_port(), run_as)
    cluster.sockets.mkdir()
    if run_as:
        os.chown(cluster.sockets, run_as["user"], run_as["group"])
    res = subprocess.run([initdb, "-D", str(cluster.data), "-U", USER, "--pwfile", str(pwfile),
                          "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                          "--no-instructions"],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                         **run_as)
    if res.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"initdb failed: {res.stdout}{res.stderr}")
    pwfile.unlink()
    cluster.start()
    return cluster


def remove_cluster(cluster: PgCluster) -> None:
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
        cluster.stop("immediate")
    shutil.rmtree(cluster.root, ignore_errors=True)


@contextlib.contextmanager
def private_cluster() -> Iterator[PgCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        remove_cluster(cluster)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    with private_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """The URL of a fresh database of this test's own (password in it, TCP loopback)."""
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_database(name)


@dataclass
class Bouncer:
    """PgBouncer in transaction mode in front of a cluster: every transaction may run on
    another server connection, so nothing may rely on session state."""

    cluster: PgCluster
    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    def url(self, database: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"


def start_bouncer(cluster: PgCluster) -> Bouncer:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    require(os.path.exists(binary), "needs pgbouncer (Debian package pgbouncer; "
            ".ci/install-deps installs it)")
    root = cluster.root / "bouncer"
    root.mkdir()
    port = _free_port()
    (root / "users.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
    (root / "pgbouncer.ini").write_text(f"""[databases]
* = host=127.0.0.1 port={cluster.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {root / "users.txt"}
pool_mode = transaction
default_pool_size = 4
logfile = {root / "pgbouncer.log"}
""")
    if cluster.run_as:
        for path in (root, root / "users.txt", root / "pgbouncer.ini"):
            os.chown(path, cluster.run_as["user"], cluster.run_as["group"])
    proc = subprocess.Popen([binary, str(root / "pgbouncer.ini")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **cluster.run_as)
    import socket
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return Bouncer(cluster, root, port, proc)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    log = (root / "pgbouncer.log")
    raise AssertionError(f"pgbouncer did not start: {log.read_text() if log.exists() else ''}")


@pytest.fixture(scope="session")
def pg_bouncer(pg_cluster: PgCluster) -> Iterator[Bouncer]:
    bouncer = start_bouncer(pg_cluster)
    try:
        yield bouncer
    finally:
        bouncer.proc.terminate()
        bouncer.proc.wait(10)
