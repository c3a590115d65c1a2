"""A real Docker engine for tests: a private dockerd and tiny busybox images, no registry.

``docker_engine`` (session scope) starts ``dockerd`` with everything under one temporary
directory (data root, exec root with its containerd state, pid file, API socket), no
bridge, no iptables and the ``vfs`` storage driver, so it needs nothing from the host
beyond the Debian packages docker.io and busybox-static, and never touches a system
dockerd. It waits for ``/_ping`` with bounded backoff (watching dockerd itself, so a crash
fails at once with its log), then imports images from tars built here:

* ``tether-test/busybox:1``: /bin/busybox (static) and a symlink for every applet;
* ``tether-test/nokill:1``: busybox with only ``sh`` and ``sleep`` linked (no ``kill``);
* ``tether-test/nosh:1``: busybox with only ``sleep`` linked (no shell).

``docker_container`` (function scope) runs a fresh container (PID 1 is ``sleep``, not an
init, so orphans stay zombies: they must count as dead) and removes it afterwards.

Without root, dockerd or a static busybox the tests skip with the reason; under CI
(TETHER_REQUIRE_ALL=1) they fail instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.common import require, require_binary, require_root

BUSYBOX = "/bin/busybox"
IMAGE = "tether-test/busybox:1"
IMAGE_NOKILL = "tether-test/nokill:1"
IMAGE_NOSH = "tether-test/nosh:1"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only, like the CI machines
                return False
            end = "<" if head[5] == 1 else ">"
            phoff, = struct.unpack_from(end + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from(end + "I", table, i * phentsize)[0] != 3  # PT_INTERP
               for i in range(phnum))


def rootfs_tar(applets: list[str]) -> bytes:
    """A root filesystem: /bin/busybox, the given applet links, and empty mount points."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "var", "var/log"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for name in applets:
            if name == "busybox" or "/" in name:
                continue
            info = tarfile.TarInfo(f"bin/{name}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
    return buf.getvalue()


def ping(sock_path: str, timeout: float = 2.0) -> bool:
    """GET /_ping over the unix socket; True on "OK". No client objects, nothing to leak."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]
    return False


def mounts_under(root: str) -> list[str]:
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


@dataclass
class DockerEngine:
    root: Path
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    client: Any = None
    containers: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def run(self, image: str = IMAGE, name: str = "") -> Any:
        """A running container whose PID 1 is `sleep` (no init)."""
        name = name or f"tether-test-{uuid.uuid4().hex[:10]}"
        container = self.client.containers.run(image, ["sleep", "1000000"], name=name,
                                               detach=True, network_mode="none")
        self.containers.append(container.id)
        return container

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(Exception):
            self.client.api.remove_container(container_id, force=True)


def start_engine(root: Path) -> DockerEngine:
    dockerd = require_binary("dockerd", "docker.io")
    require_binary("containerd", "containerd")
    require_binary("runc", "runc")
    sock = root / "docker.sock"
    log_path = root / "dockerd.log"
    args = [
        dockerd,
        "--data-root", str(root / "data"),
        "--exec-root", str(root / "exec"),
        "--pidfile", str(root / "docker.pid"),
        "--host", f"unix://{sock}",
        "--bridge=none", "--iptables=false", "--ip6tables=false",
        "--storage-driver=vfs",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    engine = DockerEngine(root, f"unix://{sock}", process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT
    delay = 0.05
    while not ping(str(sock)):
        if process.poll() is not None:
            stop_engine(engine)
            pytest.fail(f"dockerd exited with {process.returncode} before it was ready:\n"
                        f"{engine.log_tail()}", pytrace=False)
        if time.monotonic() > deadline:
            stop_engine(engine)
            pytest.fail(f"dockerd was not ready within {READY_TIMEOUT:g} s:\n{engine.log_tail()}",
                        pytrace=False)
        # Bounded backoff at the edge: dockerd offers no readiness notification we can use.
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    import docker

    engine.client = docker.DockerClient(base_url=engine.url, version="auto")
    return engine


def stop_engine(engine: DockerEngine) -> None:
    if engine.client is not None:
        for cid in engine.containers:
            engine.remove(cid)
        engine.client.close()
        engine.client = None
    if engine.process.poll() is None:
        engine.process.send_signal(signal.SIGTERM)
        try:
            engine.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine.process.pid, signal.SIGKILL)
            engine.process.wait(STOP_TIMEOUT)
    # dockerd leaves its containerd to exit on its own; it shares the session.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(engine.process.pid, signal.SIGKILL)
    for point in mounts_under(str(engine.root)):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    # vfs layers keep read-only directories; rm -rf as root copes where rmtree may not.
    shutil.rmtree(engine.root, ignore_errors=True)
    if engine.root.exists():
        subprocess.run(["rm", "-rf", str(engine.root)], check=False)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    require_root()
    require(is_static_elf(BUSYBOX),
            f"needs a static busybox at {BUSYBOX} (Debian package busybox-static)")
    # Short path: the engine's unix sockets must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="tether-dockerd-", dir="/tmp"))
    engine = start_engine(root)
    try:
        applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True,
                                 text=True).stdout.split()
        api = engine.client.api
        for image, links in ((IMAGE, applets), (IMAGE_NOKILL, ["sh", "sleep"]),
                             (IMAGE_NOSH, ["sleep"])):
            repo, _, tag = image.rpartition(":")
            api.import_image_from_data(rootfs_tar(links), repository=repo, tag=tag)
        yield engine
    finally:
        stop_engine(engine)


@pytest.fixture
def docker_container(docker_engine: DockerEngine) -> Iterator[Any]:
    """A fresh running container from the full busybox image, removed afterwards."""
    container = docker_engine.run()
    try:
        yield container
    finally:
        docker_engine.remove(container.id)


@pytest.fixture
def make_container(docker_engine: DockerEngine) -> Iterator[Callable[[str], Any]]:
    """Run containers from any test image; all removed afterwards."""
    made: list[str] = []

    def make(image: str = IMAGE) -> Any:
        container = docker_engine.run(image)
        made.append(container.id)
        return container

    try:
        yield make
    finally:
        for cid in made:
            docker_engine.remove(cid)
