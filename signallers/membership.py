"""The membership rule: what proves that a process belongs to a group.

Written once, applied to a snapshot of a process table wherever it was read
(this host's ``/proc``, a container's, an SSH host's). cgroup containment
does not need it: there the kernel's ``cgroup.procs`` is the proof.

A live process is a member of a group only with one of these proofs:

1. **Seen before**: its (pid, start time) pair was a member in an earlier
   snapshot. A pid with another start time is a different process. (Start times
   have clock-tick resolution, 10 ms: a pid freed and taken again within one tick
   would pass. That needs pid allocation steered by root; the leader's pid, the one
   a stranger would aim for, is never trusted this way once the leader has exited.)
2. **Marker**: its environment carries the group's marker (``TETHER_GROUP``
   equal to the group id, and ``TETHER_AGENT`` equal to this agent
   instance's marker). Reading it is the snapshot's job (``Proc.marked``).
3. **Process group or session of the leader**, while the leader's pid number
   is provably still the leader's: the kernel never hands out a pid that is
   still in use as a process group or session id, so a stranger can only get
   pgid/sid ``L`` after the number ``L`` was freed. So a process with
   pgid/sid ``L`` counts while the snapshot shows pid ``L`` with the leader's
   start time (alive or zombie: a zombie still holds its number), or if it
   started before ``verified_until``, the last moment at which the leader's
   number was known to be held (a stranger can only have started after it).
   Once pid ``L`` is seen with another start time, or alive after the leader was
   seen to exit, the number was reused and pgid/sid ``L`` are never claimed again.
4. **Descent**: its parent (in the same snapshot, and not younger than it) is
   a member.

Anything else is left alone: a group in ``pgid`` or ``subreaper`` mode may
lose a process that both scrubbed its environment and left the leader's
session after the leader's number was freed; it never claims a stranger.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: States of a process that has ended (zombies count as dead).
DEAD_STATES = frozenset({"Z", "X", "x"})


@dataclass(frozen=True, slots=True)
class Proc:
    """One row of a process table: the fields of ``/proc/PID/stat`` the rule needs."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    #: Start time in clock ticks since boot (``/proc/PID/stat`` field 22).
    start: int
    state: str
    comm: str = ""
    #: The snapshot found the group's marker in its environment.
    marked: bool = False

    @property
    def alive(self) -> bool:
        return self.state not in DEAD_STATES


def parse_stat(line: str | bytes, marked: bool = False) -> Proc | None:
    """A ``/proc/PID/stat`` line, or None if it is truncated or malformed. The command
    name may hold spaces, parentheses and newlines: fields are read after the last ``)``."""
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    head, sep, tail = text.rpartition(")")
    if not sep:
        return None
    pid_text, _, comm = head.partition(" (")
    fields = tail.split()
    try:
        return Proc(int(pid_text.strip()), int(fields[1]), int(fields[2]), int(fields[3]),
                    int(fields[19]), fields[0], comm, marked)
    except (ValueError, IndexError):
        return None


@dataclass
class Membership:
    """The membership state of one group, carried between snapshots."""

    leader_pid: int
    #: The leader's start time in clock ticks since boot.
    leader_start: int
    #: Whether the leader led its own process group / session when the group started
    #: (an adopted child of an interactive shell does not: the shell's are not ours).
    claim_pgid: bool = True
    claim_sid: bool = True
    #: Clock ticks since boot up to which the leader's pid number was known to be held.
    verified_until: int = -1
    known: dict[int, int] = field(default_factory=dict)
    leader_gone: bool = False

    def leader_held_at(self, ticks: int) -> None:
        """The leader's pid number was provably still the leader's at ``ticks`` (e.g. read
        just before reaping it: a zombie child keeps its number until its parent reaps it)."""
        self.verified_until = max(self.verified_until, ticks)

    def leader_exited(self) -> None:
        """The leader is known to have exited (its pidfd fired): from now on a *live*
        process at its pid is somebody else, whatever its start time says (start times
        have clock-tick resolution; a pid can be reused within one tick)."""
        self.leader_gone = True
        self.known.pop(self.leader_pid, None)

    def members(self, procs: Mapping[int, Proc], now: int | None = None) -> dict[int, Proc]:
        """Live members in ``procs``. ``now``: clock ticks since boot read *before* the
        snapshot was taken, if known (lets a later snapshot trust older pgid members)."""
        leader = procs.get(self.leader_pid)
        held = leader is not None and leader.start == self.leader_start and (
            not self.leader_gone or not leader.alive)
        if held and now is not None:
            self.leader_held_at(now)
        elif leader is not None and not held:
            # The number was freed and reused: pgid/sid L belong to a stranger from now on.
            self.claim_pgid = self.claim_sid = False
            self.verified_until = -1

        def proven(p: Proc) -> bool:
            if p.pid == self.leader_pid:
                return held or p.marked
            if self.known.get(p.pid) == p.start or p.marked:
                return True
            by_group = ((self.claim_pgid and p.pgid == self.leader_pid)
                        or (self.claim_sid and p.sid == self.leader_pid))
            return by_group and (held or p.start < self.verified_until)

        found = {p.pid: p for p in procs.values() if p.alive and proven(p)}
        children: dict[int, list[Proc]] = {}
        for p in procs.values():
            if p.alive and p.pid not in found:
                children.setdefault(p.ppid, []).append(p)
        todo = list(found.values())
        while todo:
            parent = todo.pop()
            for child in children.pop(parent.pid, ()):
                if child.start >= parent.start:
                    found[child.pid] = child
                    todo.append(child)
        self.known = {pid: p.start for pid, p in found.items()}
        return found

    def forget(self, pids: Iterable[int]) -> None:
        for pid in pids:
            self.known.pop(pid, None)
