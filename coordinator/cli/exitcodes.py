"""What `tether` exits with, and which error means which status."""

from __future__ import annotations

import enum

from tether.core import errors as e


class ExitCode(enum.IntEnum):
    #: Success (for `stop`: every group ended with zero survivors).
    OK = 0
    #: Finished but not clean, or a start failure.
    UNCLEAN = 1
    #: Usage error or refused input.
    USAGE = 2
    #: Unknown session, group or agent.
    NOT_FOUND = 3
    #: Coordinator or agent unreachable (or not answering in time).
    UNREACHABLE = 4
    INTERRUPTED = 130


def for_error(exc: BaseException) -> ExitCode:
    """The exit status for an error a command ended with."""
    from tether.client.aio import CoordinatorUnreachable, TimedOut

    if isinstance(exc, CoordinatorUnreachable | TimedOut | e.AgentUnreachable):
        return ExitCode.UNREACHABLE
    if isinstance(exc, e.NotFound):
        return ExitCode.NOT_FOUND
    if isinstance(exc, e.InvalidSpec | e.AlreadyExists | e.Unauthenticated
                  | e.PermissionDenied):
        return ExitCode.USAGE
    return ExitCode.UNCLEAN


class CLIError(Exception):
    """A mistake on the command line: printed, and the command exits with ``status``."""

    def __init__(self, message: str, status: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.status = status
