"""A real OpenSSH server on 127.0.0.1 for the ssh signaller's tests.

``sshd`` (session scope) creates a non-root user (``tether-ssh``), a host key
and a client key in a temporary directory, writes a ``known_hosts`` entry for
``[127.0.0.1]:PORT`` and starts ``/usr/sbin/sshd -D -e`` on a free port.

Where the host has cgroup v2, the server runs inside a delegated subtree: a
directory owned by the test user, with sshd itself in a child of it, so every
session of that user may create and join cgroups under the delegated
directory (cgroup v2 only lets a process move between cgroups whose common
ancestor's ``cgroup.procs`` it can write). ``SSHServer.cgroup_root`` names that
directory; it is None when the host has no cgroup v2.

Outside CI a missing sshd or a non-root run skips with the reason; under
TETHER_REQUIRE_ALL=1 they fail (see ``tests.plugins.common``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.plugins.common import require, require_binary, require_root

SSH_USER = "tether-ssh"


@dataclass(frozen=True)
class SSHServer:
    host: str
    port: int
    user: str
    uid: int
    pid: int
    tmp: Path
    client_key: Path
    known_hosts: Path
    cgroup_root: Path | None
    other_key: Path = field(default=Path())
    # Group ids of this run start with it, so teardown ends only this run's groups.
    group_prefix: str = "g-"

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def options(self, **extra: str) -> dict[str, str]:
        """Signaller options that reach this server (known_hosts and the client key)."""
        return {"known_hosts": str(self.known_hosts), "ssh_key": str(self.client_key), **extra}

    def session_pids(self) -> list[int]:
        """The sshd processes serving connections (children of the listener)."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for p in children:
            with contextlib.suppress(psutil.Error):  # one may exit while we look
                if p.name() in ("sshd", "sshd-session"):  # not the shells under them
                    found.append(p.pid)
        return found

    def user_pids(self) -> list[int]:
        """Live (non-zombie) processes of the test user here, seen independently of tether."""
        found = []
        for p in psutil.process_iter(["uids", "status"]):
            if p.info["uids"] is not None and p.info["uids"].real == self.uid \
                    and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        return found

    def kill_sessions(self) -> list[int]:
        """SIGKILL every sshd process serving a connection: the client sees the connection drop."""
        pids = self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids


def _cgroup2_mount() -> Path | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    return None


def _own_cgroup() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def _ensure_user() -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(SSH_USER)
    except KeyError:
        done = subprocess.run(["useradd", "-m", "-s", "/bin/sh", SSH_USER],
                              capture_output=True, text=True, check=False)
        # 9: the user appeared meanwhile (a parallel run): fine, it is idempotent.
        if done.returncode not in (0, 9):
            pytest.fail(f"useradd {SSH_USER} failed: {done.stderr.strip()}", pytrace=False)
        entry = pwd.getpwnam(SSH_USER)
    # Not locked ('!'), so sshd with UsePAM no lets the key in; no password works either.
    subprocess.run(["usermod", "-p", "*", SSH_USER], check=True, capture_output=True)
    return entry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_banner(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)


def _kill_cgroup_tree(top: Path) -> None:
    """Kill everything under ``top`` and remove the directories, deepest first."""
    if not top.exists():
        return
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                  reverse=True)
    for d in [*dirs, top]:
        with contextlib.suppress(OSError):
            (d / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 5
    for d in [*dirs, top]:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)


@pytest.fixture(scope="session")
def sshd() -> Iterator[SSHServer]:
    sshd_bin = require_binary("sshd", "openssh-server")
    require_binary("ssh-keygen", "openssh-client")
    require_root()
    require(shutil.which("useradd") is not None, "needs useradd (Debian package passwd)")
    user = _ensure_user()

    # Not under pytest's root-only tmp dir: sshd reads authorized_keys as the user.
    tmp = Path(tempfile.mkdtemp(prefix="tether-sshd-"))
    tmp.chmod(0o755)
    host_key = tmp / "ssh_host_ed25519_key"
    client_key = tmp / "client_key"
    other_key = tmp / "other_key"
    _keygen(host_key, "tether-test-host")
    _keygen(client_key, "tether-test-client")
    _keygen(other_key, "tether-test-unauthorized")
    authorized = tmp / "authorized_keys"
    authorized.write_text((tmp / "client_key.pub").read_text())
    authorized.chmod(0o644)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    mount = _cgroup2_mount()
    cg_root: Path | None = None
    cg_sshd: Path | None = None
    if mount is not None:
        cg_root = mount / _own_cgroup().lstrip("/") / f"tether-sshd-test.{os.getpid()}"
        try:
            cg_root.mkdir()
            for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
                os.chown(cg_root / name if name else cg_root, user.pw_uid, user.pw_gid)
            cg_sshd = cg_root / "sshd"
            cg_sshd.mkdir()
        except OSError:
            _kill_cgroup_tree(cg_root)
            cg_root = cg_sshd = None

    proc: subprocess.Popen[bytes] | None = None
    port = 0
    prefix = f"g-{os.getpid()}-"
    log = (tmp / "sshd.log").open("ab")
    try:
        for _ in range(3):
            port = _free_port()
            config = tmp / "sshd_config"
            config.write_text(
                "\n".join([
                    "ListenAddress 127.0.0.1",
                    f"Port {port}",
                    f"HostKey {host_key}",
                    f"PidFile {tmp / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "UsePAM no",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin no",
                    f"AllowUsers {SSH_USER}",
                    "MaxStartups 50",
                    "LogLevel VERBOSE",
                    "",
                ])
            )
            proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(config), "-p", str(port)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if cg_sshd is not None:
                # Before it accepts a connection, so every session starts inside the delegation.
                (cg_sshd / "cgroup.procs").write_text(str(proc.pid))
            if _wait_banner(port, proc):
                break
            proc.kill()
            proc.wait()
            proc = None
        if proc is None:
            text = (tmp / "sshd.log").read_text(errors="replace")[-2000:]
            pytest.fail(f"sshd did not start on 127.0.0.1 (log {tmp / 'sshd.log'}):\n{text}",
                        pytrace=False)
        known_hosts = tmp / "known_hosts"
        pub = (tmp / "ssh_host_ed25519_key.pub").read_text().split()
        known_hosts.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
        yield SSHServer(
            host="127.0.0.1", port=port, user=SSH_USER, uid=user.pw_uid, pid=proc.pid, tmp=tmp,
            client_key=client_key, known_hosts=known_hosts, cgroup_root=cg_root,
            other_key=other_key, group_prefix=prefix,
        )
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        # What this run's tests left behind dies with the server; other runs sharing the
        # user (parallel CI jobs) are left alone.
        for p in psutil.process_iter(["uids"]):
            if p.info["uids"] is not None and p.info["uids"].real == user.pw_uid:
                with contextlib.suppress(psutil.Error):
                    if p.environ().get("TETHER_GROUP", "").startswith(prefix):
                        p.kill()
        if cg_root is not None:
            _kill_cgroup_tree(cg_root)
        shutil.rmtree(tmp, ignore_errors=True)
