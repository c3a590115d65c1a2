"""File descriptors: the one resource an agent runs out of first.

Each live group holds a few descriptors (a pidfd on its leader, its
``cgroup.events``, the read ends of its stdout and stderr pipes, with ``--stdin
pipe`` its stdin, with ``--log`` its log file; SSH and Docker groups share
connections), and a start needs a few more for a moment (the launch's pipes). Under
the common soft limit of 1024 the agent would fit about 120 groups and then misreport
starts as crashes. So the
agent raises its soft limit to the hard limit at start, reports what fits in
``Info``, and refuses a start with ``RESOURCE_EXHAUSTED`` and a clear message
before it runs out.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from tether.core.errors import ResourceExhausted
from tether.signallers import procfs

log = logging.getLogger(__name__)

#: Descriptors kept free for the agent itself (gRPC, the state file, metrics, a start).
RESERVE = 64
#: What one more live group costs, at most: pidfd, cgroup.events, stdout, stderr, stdin,
#: log (6), plus a start's pipes for a moment (2).
PER_GROUP = 8


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft,
                        target, exc)
    return soft, hard


@dataclass(frozen=True)
class FdUsage:
    limit: int
    open: int

    @property
    def groups_left(self) -> int:
        return max(0, (self.limit - self.open - RESERVE) // PER_GROUP)


class Capacity:
    def usage(self) -> FdUsage:
        """Read now: the limit may be changed from outside (``prlimit --pid``)."""
        return FdUsage(resource.getrlimit(resource.RLIMIT_NOFILE)[0], procfs.open_fds())

    def check(self) -> None:
        usage = self.usage()
        if usage.groups_left < 1:
            raise ResourceExhausted(
                f"this agent holds {usage.open} of its {usage.limit} file descriptors; one more "
                "group could exhaust them, so nothing was started. Stop some groups, or raise "
                "the limit (systemd: LimitNOFILE=; shell: ulimit -Hn) and restart the agent")
