"""`tether`: the operators' CLI, and the launcher of the daemons.

Heavy modules (grpc, asyncssh, docker, prometheus) are imported only inside the
command that needs them, so `tether --help` and client commands start fast.
Exit statuses: see ``exitcodes.ExitCode``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from tether.coordinator.cli.exitcodes import CLIError, ExitCode, for_error
from tether.coordinator.cli.options import DAEMONS, layer, run_config_check
from tether.coordinator.cli.parser import CLIENT_COMMANDS, build_parser, client_defaults


def run(argv: Sequence[str] | None = None) -> tuple[int, bool]:
    """Run one command; returns (exit status, whether it was a client command)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.version:
        from tether import __version__

        print(f"tether {__version__}")
        return ExitCode.OK, False
    if not args.command:
        parser.print_help()
        return ExitCode.USAGE, False
    try:
        if args.command == "config":
            problems = run_config_check(args.file)
            for p in problems:
                print(f"tether config: {p}", file=sys.stderr)
            if not problems:
                print(f"{args.file}: ok")
            return (ExitCode.USAGE if problems else ExitCode.OK), False
        if args.command == "completion":
            from tether.coordinator.cli.completion import SHELLS

            print(SHELLS[args.shell](parser), end="")
            return ExitCode.OK, False
        if args.command in DAEMONS:
            head = argv[:argv.index(args.command)] if args.command in argv else []
            if any(a.startswith("-") for a in head):
                raise CLIError(f"give {args.command}'s options after the command: "
                               f"tether {args.command} --listen ...")
            from tether.coordinator.cli.daemons import run_daemon

            return run_daemon(layer(args.command, args)), False
        client_defaults(args)
        if args.command == "up":
            if args.parallel < 1:
                raise CLIError(f"--parallel {args.parallel}: give 1 or more")
            from tether.coordinator.cli.up import SessionFileError, load

            try:
                args.plan = load(args.file, args.session)
            except SessionFileError as exc:
                raise CLIError(str(exc)) from None
        return run_client(args), True
    except CLIError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return exc.status, False
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED, False


def run_client(args: object) -> int:
    import asyncio

    from tether.coordinator.cli.commands import dispatch
    from tether.core.errors import TetherError

    assert getattr(args, "command", None) in CLIENT_COMMANDS
    try:
        return asyncio.run(dispatch(args))  # type: ignore[arg-type]
    except CLIError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return exc.status
    except TetherError as exc:
        status = for_error(exc)
        prefix = "refused: " if status is ExitCode.USAGE and type(exc).__name__ in (
            "Unauthenticated", "PermissionDenied") else ""
        print(f"tether: {prefix}{exc}", file=sys.stderr)
        return status


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv)[0]


def console() -> None:
    """The `tether` command. Once a client command returned, its output is all there is:
    flush it and leave without the interpreter's teardown, where gRPC shuts its threads
    down (a good part of a short command's time). Daemons exit the normal way."""
    try:
        rc, client = run()
    except BrokenPipeError:  # `tether sessions | head`: the reader has what it wanted
        os._exit(0)
    if client:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BrokenPipeError):  # `tether sessions | head`
                stream.flush()
        os._exit(rc)
    raise SystemExit(rc)
