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

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tether.core.errors import TetherError
from tether.core.private import StateDirBusy, lock_private, open_private, private_dir
from tether.signallers.cgroups import safe_name

_ID = re.compile(r"[0-9a-f]{8,32}\Z")


class InstanceBusy(TetherError):
    """Another live agent holds this state directory under this name."""


@dataclass
class Instance:
    name: str
    id: str
    lock_fd: int = -1

    @property
    def marker(self) -> str:
        return f"{self.name}/{self.id}"

    def release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # closing the last descriptor drops the flock
            self.lock_fd = -1


def ephemeral(name: str) -> Instance:
    return Instance(name, os.urandom(4).hex())


def claim(state_dir: str, name: str) -> Instance:
    """Lock this agent's name in ``state_dir`` and return its (persistent) instance."""
    d = private_dir(state_dir)
    base = d / f"agent-{safe_name(name)}"
    try:
        fd = lock_private(f"{base}.lock", "agent")
    except StateDirBusy as exc:
        raise InstanceBusy(
            f"another agent (pid {exc.holder}) already runs with name {name!r} and state "
            f"directory {state_dir}; stop it, or give this one another --state-dir (or another "
            "name)") from None
    return Instance(name, _instance_id(Path(f"{base}.instance")), fd)


def _instance_id(path: Path) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if _ID.match(text):
            return text
    new = os.urandom(4).hex()
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, f"{new}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return new
