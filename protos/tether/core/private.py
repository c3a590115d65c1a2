"""Private state on disk: directories 0700 and files 0600, created so (never chmodded
after), whatever the umask. State holds spawn environments (``API_KEY=...``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


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


def open_private(path: str | Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """Open ``path``, creating it as 0600 if missing; never follows a symlink at the last
    component (a planted link cannot redirect state into another file)."""
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


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
