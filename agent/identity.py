"""An agent instance's identity: unique on its host while it lives, kept across restarts.

Two agents on one host must never claim each other's processes, even with one
name (every ``tether serve`` is agent ``local``) or names that sanitise alike
(``a.x``, ``a_x``). So an agent with a state directory:

* locks ``agent-<name>.lock`` there (``flock``, released by the kernel when the
  process dies, SIGKILL included). A second agent on the same directory and name
  refuses to start, naming the pid that holds it;
* keeps its instance id in ``agent-<name>.instance``, created once: a restarted
  agent on the same state directory is the same instance, so it re-adopts and
  reaps what its earlier run left, and nothing else.

The marker every child carries is ``TETHER_AGENT=<name>/<instance id>``, and the
cgroup tree is ``tether.<name>.<instance id>``. An agent without a state
directory (tests, embedding) gets a fresh random instance.
"""

from __future__ import annotations

import logging
import os
import re
import select
from dataclasses import dataclass
from pathlib import Path

from tether.core.errors import TetherError
from tether.core.private import StateDirBusy, lock_private, open_private, private_dir
from tether.signallers.cgroups import safe_name

_ID = re.compile(r"[0-9a-f]{8,32}\Z")
log = logging.getLogger(__name__)


class InstanceBusy(TetherError):
    """Another live agent holds this state directory under this name."""


@dataclass
class Instance:
    name: str
    id: str
    lock_fd: int = -1
    #: The lock file: the guardian takes it over when this agent dies.
    lock_path: str = ""

    @property
    def marker(self) -> str:
        return f"{self.name}/{self.id}"

    def release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # closing the last descriptor drops the flock
            self.lock_fd = -1


def ephemeral(name: str) -> Instance:
    return Instance(name, os.urandom(4).hex())


def claim(state_dir: str, name: str, handover: float = 30.0) -> Instance:
    """Lock this agent's name in ``state_dir`` and return its (persistent) instance.

    The lock passes from an agent to its guardian when the agent dies: the guardian holds
    it while it ends the dead run's kill groups, so a new run of the same instance never
    has its fresh groups swept. A new agent waits (up to ``handover`` seconds, on the
    guardian's pidfd) for a guardian still sweeping."""
    d = private_dir(state_dir)
    base = d / f"agent-{safe_name(name)}"
    lock = f"{base}.lock"
    try:
        fd = lock_private(lock, "agent")
    except StateDirBusy as exc:
        guardian = _guardian_pid(exc.holder)
        if guardian is None or not _wait_exit(guardian, handover):
            raise InstanceBusy(
                f"another agent (pid {exc.holder}) already runs with name {name!r} and state "
                f"directory {state_dir}; stop it, or give this one another --state-dir (or "
                "another name)") from None
        fd = lock_private(lock, "agent")
    return Instance(name, _instance_id(Path(f"{base}.instance"), d), fd, lock)


def _guardian_pid(holder: str) -> int | None:
    word, _, pid = holder.partition(" ")
    return int(pid) if word == "guardian" and pid.isdigit() else None


def _wait_exit(pid: int, timeout: float) -> bool:
    """Block until ``pid`` exits (poll on its pidfd): start-up, before anything is served."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


def _instance_id(path: Path, state_dir: Path) -> str:
    """The instance id kept in ``path``, if it was written for this very directory. The file
    also records the directory's (device, inode): a copied state directory (``cp -a``, a
    restored backup, a cloned image) is a new directory, so its agent is a new instance
    and never claims what the original's agent runs."""
    where = os.stat(state_dir)
    here = f"{where.st_dev}:{where.st_ino}"
    fd = open_private(path, os.O_RDWR)
    try:
        words = os.pread(fd, 256, 0).decode(errors="replace").split()
        if len(words) >= 2 and _ID.match(words[0]) and words[1] == here:
            return words[0]
        if len(words) == 1 and _ID.match(words[0]):
            new = words[0]  # written before directories were recorded: adopt it
        else:
            if words:
                log.warning("state directory %s was copied (or moved across filesystems): "
                            "this agent is a new instance, and does not claim what the "
                            "earlier one runs", state_dir)
            new = os.urandom(4).hex()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{new} {here}\n".encode(), 0)
        os.fsync(fd)
        return new
    finally:
        os.close(fd)
