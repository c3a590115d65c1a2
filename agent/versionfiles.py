"""Version files (``.nvmrc``, ``.python-version``, ``.java-version``, ``.tool-versions``)
found and read for one spawn, without trusting whoever could write them.

The agent, usually root, reads files in the tree of a working directory someone else
chose. A file planted there must not hand a secret to whoever reads the group's record
(``.python-version -> /etc/tether/tokens``), nor fail other people's spawns (a
``.python-version`` dropped in ``/tmp``). The rules, in the order they apply:

* The walk starts at the working directory (it must exist) and goes up one directory at
  a time to ``/``. It stops, reading nothing in that directory or above it, at a
  directory that other users may write (``o+w``, sticky or not: ``/tmp``, ``/var/tmp``,
  a shared 0777 directory), or one it cannot examine.
* Per directory the first name (in the plugin's order) that is a regular file counts;
  FIFOs, devices, sockets and directories are passed over without being opened for
  reading (``O_PATH``, then the same inode is reopened). A symbolic link is followed.
* The file, and the link naming it if it is one, must belong to root, to the agent's
  own user, to the ``--user`` the group runs as, or to the owner of the working
  directory. Anything else fails the start as ``toolchain_missing``, naming the file and
  its owner.
* With ``--user``, that user must be able to read the file: its mode bits, and the
  search bit of every directory on its real path, judged for the user's uid and groups
  (the agent, as root, would read what the user could not). POSIX ACLs are not read.
* At most ``MAX_VERSION_FILE`` bytes of UTF-8; a larger file is refused, not cut.
* What a file holds never goes into a message; errors name the file, the rule and what
  to do (and, for a version that is not installed, what is installed).
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tether.agent.users import resolve
from tether.core.errors import StartFailed
from tether.core.model import FailureClass, GroupSpec
from tether.signallers.base import RunAs

MAX_VERSION_FILE: Final = 4096
NO_PLUGINS: Final = "or spawn with --no-plugins"


class ToolchainMissing(StartFailed):
    def __init__(self, message: str) -> None:
        super().__init__(FailureClass.TOOLCHAIN_MISSING, message)


@dataclass(frozen=True)
class VersionFile:
    """A version file that passed every rule, and its text."""

    path: Path
    text: str


def owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def allows(st: os.stat_result, user: RunAs, bit: int) -> bool:
    """Whether mode bits grant ``user`` the permission ``bit`` (4 read, 1 search) as the
    kernel judges them: the owner's bits for the owner, the group's for a member, the
    others' for anyone else."""
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == user.gid or st.st_gid in user.groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def user_can_read(real: str, st: os.stat_result, user: RunAs) -> bool:
    """``user`` may search every directory above the real path ``real`` and read it."""
    d = os.path.dirname(real)
    while True:
        try:
            if not allows(os.stat(d), user, 1):
                return False
        except OSError:
            return False
        if d == "/":
            return allows(st, user, 4)
        d = os.path.dirname(d)


@dataclass
class _Readers:
    """Whose files count for one spawn; the ``--user`` is looked up only once a file is
    found (the password database may be remote)."""

    spec: GroupSpec
    cwd_uid: int
    _user: RunAs | None = field(default=None, init=False)
    _looked_up: bool = field(default=False, init=False)

    @property
    def user(self) -> RunAs | None:
        if not self._looked_up:
            self._user = resolve(self.spec.user) if self.spec.user else None
            self._looked_up = True
        return self._user

    def trusted(self, uid: int) -> bool:
        return uid in (0, os.geteuid(), self.cwd_uid) or (
            self.user is not None and uid == self.user.uid)

    def whom(self) -> str:
        names = ["root"]
        if os.geteuid() != 0:
            names.append(f"the agent's user {owner(os.geteuid())}")
        if self.user is not None:
            names.append(f"the group's user {owner(self.user.uid)}")
        names.append(f"the working directory's owner {owner(self.cwd_uid)}")
        return ", ".join(names)


def version_files(spec: GroupSpec, names: Sequence[str]) -> Iterator[VersionFile]:
    """Every version file from the spec's working directory up, nearest first (per
    directory the first of ``names`` present), read by the rules of this module."""
    if not spec.cwd or not spec.cwd.startswith("/"):
        return
    d = Path(os.path.normpath(spec.cwd))
    try:
        readers = _Readers(spec, os.stat(d).st_uid)
    except OSError:
        return  # no working directory: the start fails on it, not on a parent's file
    while True:
        try:
            st = os.stat(d)
        except OSError:
            return
        if not stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IWOTH:
            return
        for name in names:
            found = _read(d / name, readers)
            if found is not None:
                yield found
                break
        if d.parent == d:
            return
        d = d.parent


def find_version_file(spec: GroupSpec, names: Sequence[str]) -> VersionFile | None:
    """The nearest version file (see ``version_files``), or None."""
    return next(version_files(spec, names), None)


def _read(path: Path, readers: _Readers) -> VersionFile | None:
    try:
        link = os.lstat(path)
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None  # absent, a dangling link, or a directory we may not search
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None  # a FIFO, device or directory is not a version file: never opened
        if stat.S_ISLNK(link.st_mode) and not readers.trusted(link.st_uid):
            raise ToolchainMissing(
                f"{path} is a symbolic link made by {owner(link.st_uid)}; version files count "
                f"only when they belong to {readers.whom()}: remove it {NO_PLUGINS}")
        if not readers.trusted(st.st_uid):
            what = "links to a file that belongs" if stat.S_ISLNK(link.st_mode) else "belongs"
            raise ToolchainMissing(
                f"{path} {what} to {owner(st.st_uid)}; version files count only when they "
                f"belong to {readers.whom()}: remove or chown it {NO_PLUGINS}")
        user = readers.user
        proc = f"/proc/self/fd/{fd}"
        if user is not None and not user_can_read(os.readlink(proc), st, user):
            raise ToolchainMissing(
                f"{path}: the group's user {owner(user.uid)} may not read it (owner "
                f"{owner(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):o}, or a directory "
                "above it is closed to that user); the agent reads a version file only "
                f"where the group's user could: make it readable to that user {NO_PLUGINS}")
        if st.st_size > MAX_VERSION_FILE:
            raise _too_large(path)
        rfd = os.open(proc, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            data = os.read(rfd, MAX_VERSION_FILE + 1)
        finally:
            os.close(rfd)
    except OSError as exc:
        raise ToolchainMissing(f"{path} cannot be read ({exc.strerror}); fix its permissions "
                               f"{NO_PLUGINS}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_VERSION_FILE:
        raise _too_large(path)
    try:
        return VersionFile(path, data.decode())
    except UnicodeDecodeError:
        raise ToolchainMissing(f"{path} is not text; a version file holds a version, e.g. "
                               "3.12.1") from None


def _too_large(path: Path) -> ToolchainMissing:
    return ToolchainMissing(f"{path} is larger than {MAX_VERSION_FILE} bytes; a version file "
                            "holds a version, e.g. 20.11.1: shorten it")


def read_tool_file(path: Path) -> str:
    """A file of the tool's own directory (an nvm alias): a regular file (a FIFO is never
    opened for reading), at most ``MAX_VERSION_FILE`` bytes. Raises ``OSError``."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, f"{path} is not a regular file")
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            data = os.read(rfd, MAX_VERSION_FILE)
        finally:
            os.close(rfd)
    finally:
        os.close(fd)
    return data.decode(errors="replace")
