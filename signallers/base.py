"""The contract between an authority (the agent) and the places groups live.

A *signaller* knows how to start a process group on some kind of target
(this host, a Docker container, an SSH host) and hands back a *group handle*
modelled on ``subprocess.Popen`` / asyncssh's ``SSHClientProcess``: send
signals, kill, wait. Every method is async. The agent's start, watch and stop
routines are written once against these two Protocols; they never branch on
the kind of target, and never probe a handle for a method: everything the agent
uses is declared here, optional capabilities with a default (as jupyter_client's
provisioner base does). Implementations subclass the Protocols to inherit the
defaults.

Implementations are found through the ``tether.signallers`` entry-point
group (see ``registry.py``). Each maps its foreign errors (``OSError``,
``docker.errors.*``, ``asyncssh.*``) into ``tether.core.errors`` in one place.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tether.core.errors import AdoptRefused, Conflict, InvalidSpec
from tether.core.model import Containment, LeaderStatus, Limits, OrphanPolicy, StdinMode
from tether.core.output import Note, Stream


@dataclass(frozen=True)
class RunAs:
    """A user resolved from the agent host's password and group databases."""

    name: str
    uid: int
    gid: int
    #: Supplementary groups (``initgroups``: the user's memberships plus ``gid``).
    groups: tuple[int, ...]
    home: str
    group_name: str = ""

    def describe(self) -> str:
        group = f"{self.group_name}/" if self.group_name else ""
        return f"{self.name} (uid {self.uid}, gid {group}{self.gid})"


@dataclass(frozen=True)
class LaunchSpec:
    """What a signaller needs to start one group. The env is final (markers included)."""

    group_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str = ""
    log_path: str = ""
    #: The part of the target after "KIND:" ("web-1" for "docker:web-1"); empty for local.
    where: str = ""
    owns_target: bool = False
    orphan_policy: OrphanPolicy = OrphanPolicy.KILL
    #: Start the group as this user (the env already carries its HOME, USER, LOGNAME).
    user: RunAs | None = None
    #: cgroup limits of the group.
    limits: Limits = field(default_factory=Limits)
    #: Capture stdout and stderr for the agent (``GroupHandle.stdio``), appending them to
    #: ``log_path`` too; False (probes, hooks): straight to ``log_path`` or /dev/null.
    capture: bool = False
    #: ``PIPE``: the program's stdin is a pipe the handle's ``stdio`` writes (needs
    #: ``capture``); ``NULL``: /dev/null.
    stdin: StdinMode = StdinMode.NULL


@dataclass(frozen=True)
class Features:
    """Spec features a signaller supports; the agent refuses the others with a clear error
    before anything starts."""

    #: ``inherit_env``: start from the agent's own environment (local only: elsewhere it
    #: would copy this host's environment to another machine).
    inherit_env: bool = False
    #: ``log:`` probes read the log file on the agent's host.
    log_probe: bool = False
    #: Re-adopt surviving ``keep`` groups after an agent restart.
    reattach: bool = False
    #: ``user``: start a group as another user of the agent's host.
    run_as_user: bool = False
    #: ``ports``: ports the agent picks on its own 127.0.0.1 are the target's ports too.
    ports: bool = False
    #: ``limits``: cgroup memory, CPU and process limits (the signaller's ``check`` says
    #: whether this host can enforce each).
    limits: bool = False
    #: Toolchain plugins read version files and toolchain directories on the agent's host:
    #: they apply only where the group sees that filesystem.
    host_files: bool = False
    #: ``stdin``: a pipe the agent holds as the program's stdin (``--stdin pipe``).
    stdin_pipe: bool = False


@dataclass(frozen=True)
class Reattach:
    """What the state file remembers of a group, for re-adoption after an agent restart."""

    group_id: str
    leader_pid: int
    leader_start_time: float
    where: str
    cgroup: str = ""
    orphan_policy: OrphanPolicy = OrphanPolicy.KEEP


class OutputSink(Protocol):
    """Where a run's captured output goes (the agent's ring for the group)."""

    def output(self, stream: Stream, data: bytes) -> None:
        """Bytes the program wrote, as read (called on the event loop, never blocking)."""
        ...

    def note(self, event: Note, text: str) -> None:
        """Something a reader should know (capture lost, the log tee fell behind)."""
        ...

    def ended(self) -> None:
        """No more output comes from this run: every stream reached its end (or capture
        was given up, said with ``note`` first)."""
        ...


@dataclass(frozen=True)
class PipeEnds:
    """A local run's pipe ends as the agent holds them (-1: none): what a guardian holds
    while no agent reads them, so a ``keep`` group is not killed by SIGPIPE at its next
    write, and its output still reaches its log."""

    stdout: int
    stderr: int
    stdin: int = -1
    log: int = -1


class Stdio(Protocol):
    """One run's standard streams as its launch set them up: stdout and stderr captured,
    and with ``--stdin pipe`` its stdin held open for writers."""

    def start(self, sink: OutputSink) -> None:
        """Deliver output to ``sink`` from now on (once per run)."""
        ...

    @property
    def stdin_open(self) -> bool:
        """The program's stdin is a pipe this side still holds open."""
        return False

    async def write(self, data: bytes) -> None:
        """Write to the program's stdin, in order; waits while its pipe is full (a program
        that does not read slows its writer, nobody else). Raises ``Conflict`` when stdin
        is closed (by ``close_stdin``, or by the program)."""
        raise Conflict("this group's stdin is not a pipe; spawn it with --stdin pipe")

    def close_stdin(self) -> None:
        """Close the program's stdin (it reads end-of-file once it drained the pipe)."""
        return None

    def finish(self) -> None:
        """The run is over (its containment is empty): deliver what is still buffered,
        stop reading (a process that escaped the group may hold a pipe open forever) and
        release everything. Idempotent."""
        ...

    def pipe_ends(self) -> PipeEnds | None:
        """The local descriptors behind these streams, for the guardian to hold (None: no
        local pipes, as on remote targets)."""
        return None

    def flushed(self) -> asyncio.Future[None] | None:
        """After ``finish``: done once what was read is in the ``--log`` file too (None:
        nothing is still being written there)."""
        return None


@runtime_checkable
class GroupHandle(Protocol):
    """A started (or adopted) group on some target: the Popen of a whole tree."""

    group_id: str
    leader_pid: int
    pgid: int
    containment: Containment
    #: Process start time of the leader (seconds since the epoch): guards against PID reuse.
    leader_start_time: float

    @property
    def cgroup(self) -> str:
        """The group's cgroup directory where it has one (shown to users), else ""."""
        return ""

    @property
    def emptied_at(self) -> float | None:
        """``time.monotonic()`` when the containment was seen empty, if the handle knows it
        more precisely than "when ``wait`` returned" (cgroup.events does)."""
        return None

    @property
    def detail(self) -> str:
        """What the handle could not verify or had to retry (reconnects, survivors), for
        the exit record's ``detail``; empty when everything was seen directly."""
        return ""

    @property
    def leader_status(self) -> LeaderStatus | None:
        """The leader's status once it has exited, else None."""
        ...

    async def send_signals(self, sigs: Sequence[signal.Signals]) -> int:
        """Send each signal, in order, to every live member, in one pass (a stop's TERM then
        CONT). Returns how many members were signalled (0: already gone)."""
        ...

    async def send_signal(self, sig: signal.Signals) -> int:
        """``send_signals([sig])``."""
        return await self.send_signals([sig])

    async def kill(self) -> int:
        """SIGKILL every member and keep sweeping newcomers until empty or a deadline."""
        ...

    async def members(self) -> list[int]:
        """PIDs of live members (zombies count as dead)."""
        ...

    @property
    def limits(self) -> str:
        """The limits in force and how they are enforced, for users; "" without limits."""
        return ""

    async def oom_kills(self) -> int:
        """Members the kernel's OOM killer ended (where the handle can tell); read before
        ``close``."""
        return 0

    @property
    def stdio(self) -> Stdio | None:
        """The run's captured standard streams (``LaunchSpec.capture``); None for groups
        whose output this handle cannot reach (adopted, re-adopted after a restart)."""
        return None

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the containment is empty. True if empty, False on timeout. Raises
        ``TargetUnreachable`` if the target cannot be asked; the caller may retry."""
        ...

    async def wait_leader(self) -> LeaderStatus:
        """Wait until the leader process has exited; its status where known."""
        ...

    async def close(self) -> None:
        """Release resources (cgroup directory, pidfds, connections). Call once ended."""
        ...


@runtime_checkable
class Signaller(Protocol):
    """A kind of target: how an authority reaches process groups there."""

    kind: str
    features: Features

    @property
    def containment(self) -> Containment:
        """The strongest containment this signaller offers on its targets."""
        ...

    def check(self, spec: LaunchSpec) -> None:
        """Refuse a spec this signaller cannot run, before anything starts (``InvalidSpec``).
        The default accepts everything the ``Features`` did not already refuse."""
        return None

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        """Start a group. Raises ``StartFailed`` with a class, or ``TargetUnreachable``."""
        ...

    async def adopt(self, group_id: str, pid: int, start_time: float | None, where: str,
                    policy: OrphanPolicy = OrphanPolicy.KILL) -> GroupHandle:
        """Take over a running tree whose leader is ``pid``. Raises ``AdoptRefused``."""
        raise AdoptRefused(pid, f"the {self.kind} signaller cannot adopt processes")

    async def reattach(self, record: Reattach) -> GroupHandle | None:
        """After an agent restart: take back a group that survived, or None if it is gone.
        Only called when ``features.reattach``."""
        return None

    async def aclose(self) -> None:
        """Close connections and watchers owned by the signaller."""
        ...


def refuse(feature: str, target: str, hint: str) -> InvalidSpec:
    """The error for a spec feature a target cannot honour."""
    return InvalidSpec(f"{feature} is not supported for target {target!r}: {hint}",
                       field=feature)


@dataclass(frozen=True)
class SignallerContext:
    """What every signaller is constructed with: who it works for, and its options."""

    agent_name: str = "local"
    state_dir: str = ""
    #: Free-form per-kind options from config/flags, e.g. {"containment": "subreaper"},
    #: {"known_hosts": "/path"}, {"docker_host": "unix:///run/docker.sock"}.
    options: Mapping[str, str] = field(default_factory=dict)
    #: This agent instance's marker value (``TETHER_AGENT``): unique among live agents on a
    #: host, kept across restarts with the same state directory.
    instance: str = ""

    @property
    def marker(self) -> str:
        return self.instance or self.agent_name


class SignallerFactory(Protocol):
    """How the registry makes a signaller (the entry point's callable)."""
    def __call__(self, context: SignallerContext) -> Signaller: ...
