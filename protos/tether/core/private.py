"""Private state on disk: directories 0700 and files 0600, created so (never chmodded
after), whatever the umask. State holds spawn environments (``API_KEY=...``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from tether.core.errors import TetherError


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) as 0700. An existing directory is left as it
    is, but one that others can read is reported (the caller may warn)."""
    p = Path(path)
    missing = []
    cur = p
    while not cur.exists():
        missing.append(cur)
        if cur.parent == cur:
            break
        cur = cur.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
    return p


class NotAFile(TetherError):
    """Something else (a FIFO, a device, a directory) sits where a state file belongs."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file; tether keeps its state there: "
                         "remove it (or choose another --state-dir)")
        self.path = path


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def open_private(path: str | Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """Open ``path``, creating it as 0600 if missing. Never follows a symlink at the last
    component (a planted link cannot redirect state into another file) and never blocks:
    a FIFO (or a device) where the file belongs is refused, naming it."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO with no reader, a directory
            raise NotAFile(str(path), "a FIFO" if exc.errno == errno.ENXIO
                           else "a directory") from exc
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotAFile(str(path), _kind(mode))
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def touch_private(path: str | Path) -> None:
    """Make sure ``path`` exists as a private file (before a library such as SQLite creates
    it with its own mode)."""
    os.close(open_private(path, os.O_RDONLY))


def exposed(path: str | Path) -> bool:
    """True when group or others may read or enter ``path``."""
    try:
        return bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return False


class StateDirBusy(TetherError):
    """Another live process holds a lock in this state directory."""

    def __init__(self, path: str, what: str, holder: str, message: str = "") -> None:
        super().__init__(message or f"another {what} (pid {holder}) holds {path}")
        self.path = path
        self.holder = holder


def lock_private(path: str | Path, what: str) -> int:
    """Take an exclusive ``flock`` on ``path`` (created private), for as long as the
    returned descriptor is open (the kernel drops it when the process dies, SIGKILL
    included). Raises ``StateDirBusy`` naming the holder's pid when another process
    has it."""
    fd = open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirBusy(str(path), what, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
