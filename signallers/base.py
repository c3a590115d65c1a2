"""The contract between an authority (the agent) and the places groups live.

A *signaller* knows how to start a process group on some kind of target
(this host, a Docker container, an SSH host) and hands back a *group handle*
modelled on ``subprocess.Popen`` / asyncssh's ``SSHClientProcess``: send a
signal, terminate, kill, wait. Every method is async. The agent's stop
routine is written once against ``GroupHandle``; it never branches on kind.

Implementations are found through the ``tether.signallers`` entry-point
group (see ``registry.py``). Each maps its foreign errors (``OSError``,
``docker.errors.*``, ``asyncssh.*``) into ``tether.agent.errors`` in one place.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tether.agent.model import Containment, LeaderStatus


@dataclass(frozen=True)
class LaunchSpec:
    """What a signaller needs to start one group. The env is final (marker included)."""

    group_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str = ""
    log_path: str = ""
    # The part of the target after "KIND:" ("web-1" for "docker:web-1"); empty for local.
    where: str = ""
    owns_target: bool = False


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    why: str = ""


@runtime_checkable
class GroupHandle(Protocol):
    """A started (or adopted) group on some target: the Popen of a whole tree."""

    group_id: str
    leader_pid: int
    pgid: int
    containment: Containment
    # Process start time of the leader (seconds since the epoch): guards against PID reuse.
    leader_start_time: float

    async def send_signal(self, sig: signal.Signals) -> int:
        """Send ``sig`` to every live member. Returns how many were signalled (0: already gone)."""
        ...

    async def terminate(self) -> int:
        """``send_signal(SIGTERM)``."""
        ...

    async def kill(self) -> int:
        """SIGKILL every member and keep sweeping newcomers until empty or the deadline."""
        ...

    async def members(self) -> list[int]:
        """PIDs of live members (zombies count as dead)."""
        ...

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the containment is empty. True if empty, False on timeout."""
        ...

    async def wait_leader(self) -> LeaderStatus:
        """Wait until the leader process has exited; its status where known."""
        ...

    @property
    def leader_status(self) -> LeaderStatus | None:
        """The leader's status once it has exited, else None."""
        ...

    async def close(self) -> None:
        """Release resources (cgroup directory, pidfds, connections). Call once ended."""
        ...


@runtime_checkable
class Signaller(Protocol):
    """A kind of target: how an authority reaches process groups there."""

    kind: str

    @property
    def containment(self) -> Containment:
        """The strongest containment this signaller offers on its targets."""
        ...

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        """Start a group. Raises ``StartFailed`` with a class, or ``TargetUnreachable``."""
        ...

    async def adopt(self, group_id: str, pid: int, start_time: float | None,
                    where: str) -> GroupHandle:
        """Take over a running tree whose leader is ``pid``. Raises ``AdoptRefused``."""
        ...

    async def reachable(self, where: str) -> Reachability:
        """Is the target itself (host, container) reachable now?"""
        ...

    async def aclose(self) -> None:
        """Close connections and watchers owned by the signaller."""
        ...


@dataclass(frozen=True)
class SignallerContext:
    """What every signaller is constructed with: who it works for, and its options."""

    agent_name: str = "local"
    state_dir: str = ""
    # Free-form per-kind options from config/flags, e.g. {"containment": "subreaper"},
    # {"known_hosts": "/path"}, {"docker_host": "unix:///run/docker.sock"}.
    options: Mapping[str, str] = field(default_factory=dict)


class SignallerFactory(Protocol):
    def __call__(self, context: SignallerContext) -> Signaller: ...
