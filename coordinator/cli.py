"""`tether`: the operators' CLI, and the launcher of the daemons.

Heavy modules (grpc, asyncssh, docker, prometheus) are imported only inside
the command that needs them, so `tether --help` and client commands start fast.

Exit statuses: 0 success (for `stop`: every group ended with zero survivors);
1 finished but not clean / start failure; 2 usage error; 3 unknown session
(or group, agent); 4 coordinator or agent unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_COORDINATOR = "127.0.0.1:7400"
EXIT_OK, EXIT_UNCLEAN, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class CLIError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- parsing helpers


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--env {item!r} is not KEY=VALUE; write e.g. --env PORT=8080",
                           EXIT_USAGE)
        env[key] = value
    return env


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--meta {item!r} is not KEY=VALUE", EXIT_USAGE)
        labels[key] = value
    return labels


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tether",
        description="When a session ends, every process that belonged to it dies, on every "
        "host, and tether proves it.",
        epilog="Client commands talk to a coordinator (--coordinator, $TETHER_COORDINATOR, "
        f"default {DEFAULT_COORDINATOR}). Exit status: 0 ok, 1 not clean, 2 usage, "
        "3 unknown session/agent, 4 unreachable.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def client(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--coordinator", default=os.environ.get("TETHER_COORDINATOR",
                                                                DEFAULT_COORDINATOR),
                        help="coordinator HOST:PORT (default: $TETHER_COORDINATOR or "
                        f"{DEFAULT_COORDINATOR})")
        sp.add_argument("-o", "--output", choices=["table", "json"], default="table",
                        help="output format (default: table)")
        sp.add_argument("--timeout", type=positive_float, default=None,
                        help="give up after this many seconds (default: per command)")
        return sp

    def daemon(name: str, help_: str, default_listen: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--listen", default=default_listen,
                        help=f"gRPC HOST:PORT (default {default_listen}; port 0 picks one)")
        sp.add_argument("--state-dir", default=None,
                        help="where state lives (default: $XDG_STATE_HOME/tether or "
                        "~/.local/state/tether)")
        sp.add_argument("--metrics-listen", default="",
                        help="serve Prometheus /metrics on HOST:PORT (default: off)")
        sp.add_argument("--tls-cert", default="", help="server certificate (PEM) for TLS")
        sp.add_argument("--tls-key", default="", help="server key (PEM) for TLS")
        sp.add_argument("--tls-client-ca", default="",
                        help="require client certificates signed by this CA (mTLS)")
        sp.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --listen without TLS (trusted networks only)")
        sp.add_argument("--log-level", default=os.environ.get("TETHER_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING (default INFO)")
        return sp

    def agent_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--containment", choices=["auto", "cgroup", "subreaper", "pgid"],
                        default="auto",
                        help="how groups are held together (default auto: the strongest the "
                        "host offers)")
        sp.add_argument("--default-grace", type=positive_float, default=None,
                        help="grace before SIGKILL for groups that do not set one (default 5)")
        sp.add_argument("--signaller-option", action="append", default=[], metavar="KEY=VALUE",
                        help="option for the signallers, e.g. known_hosts=/path, "
                        "docker_host=unix:///run/docker.sock (repeatable)")

    sp = daemon("serve", "Run the coordinator and a local agent in one process (foreground).",
                "127.0.0.1:7400")
    sp.add_argument("--agent-name", default="local", help="name of the local agent")
    agent_opts(sp)
    sp = daemon("coordinator", "Run the coordinator alone (foreground).", "127.0.0.1:7400")
    sp.add_argument("--agent-ttl", type=positive_float, default=5.0,
                    help="an agent silent this long is unreachable (default 5 s)")
    sp = daemon("agent", "Run an agent (foreground), registered with a coordinator.",
                "127.0.0.1:7401")
    sp.add_argument("--coordinator", default=os.environ.get("TETHER_COORDINATOR", ""),
                    help="coordinator HOST:PORT to register with (default: none, standalone)")
    sp.add_argument("--name", default=None, help="agent name (default: the host name)")
    sp.add_argument("--advertise", default="",
                    help="HOST:PORT the coordinator should dial (default: --listen)")
    agent_opts(sp)

    sp = client("spawn", "Start a process group in a session; prints its id once running.")
    sp.add_argument("--session", required=True, help="session name (created on first use)")
    sp.add_argument("--window", default="", help="window within the session")
    sp.add_argument("--label", default="", help="a short name for the group, e.g. web")
    sp.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                    help="free-form labels (repeatable)")
    sp.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the child (repeatable); the child gets only "
                    "these (plus TETHER_GROUP) unless --inherit-env")
    sp.add_argument("--inherit-env", action="store_true",
                    help="start from the agent's environment")
    sp.add_argument("--cwd", default="", help="working directory (absolute)")
    sp.add_argument("--log", default="", help="append stdout and stderr to this file")
    sp.add_argument("--grace", type=positive_float, default=None,
                    help="seconds between the stop signal and SIGKILL (default 5)")
    sp.add_argument("--stop-signal", default="TERM", help="stop signal (default TERM)")
    sp.add_argument("--stop-order", type=int, default=0,
                    help="session stops run lower orders first (default 0)")
    sp.add_argument("--ready", default="",
                    help="readiness probe: tcp:PORT, http:URL, log:REGEX or exec:COMMAND")
    sp.add_argument("--start-timeout", type=positive_float, default=None,
                    help="seconds to become ready (default 30)")
    sp.add_argument("--probe-timeout", type=positive_float, default=None,
                    help="timeout of one exec: probe run (default 5)")
    sp.add_argument("--target", default="local",
                    help="local (default), docker:CONTAINER or ssh:[USER@]HOST[:PORT]")
    sp.add_argument("--agent", default="", help="agent to run it on (default: the only or "
                    "local one)")
    sp.add_argument("--orphan-policy", choices=["kill", "keep"], default="kill",
                    help="if the agent dies: kill the group (default) or keep it for re-adoption")
    sp.add_argument("--owns-target", action="store_true",
                    help="docker: the container belongs to this group and may be killed "
                    "as a last resort")
    sp.add_argument("--idempotency-key", default="",
                    help="a retried spawn with the same key returns the first group")
    sp.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")

    sp = client("adopt", "Hand a running process tree to an agent.")
    sp.add_argument("--session", required=True, help="session name (created on first use)")
    sp.add_argument("--agent", default="", help="agent on the process's host (default: the only "
                    "or local one)")
    sp.add_argument("--pid", type=int, required=True,
                    help="leader of the tree to adopt; its descendants come with it")
    sp.add_argument("--label", default="", help="a short name for the group")
    sp.add_argument("--grace", type=positive_float, default=None,
                    help="seconds between the stop signal and SIGKILL (default 5)")
    sp.add_argument("--orphan-policy", choices=["kill", "keep"], default="kill",
                    help="if the agent dies: kill the group (default) or keep it for re-adoption")

    sp = client("signal", "Send a signal to every process of a session.")
    sp.add_argument("session", help="session name")
    sp.add_argument("signal", help="TERM, INT, HUP, USR1, ... or a number")

    sp = client("stop", "Stop a session; blocks until every group has an exit record.")
    sp.add_argument("session", help="session name")
    sp.add_argument("--grace", type=positive_float, default=None,
                    help="override every group's grace (seconds)")

    client("sessions", "List sessions.").add_argument(
        "--all", action="store_true", help="include stopped sessions")
    client("show", "Show a session and its groups.").add_argument("session", help="session name")
    client("agents", "List agents and whether they are up.")
    client("orphans", "List orphans (marked processes of no live group) on every agent.") \
        .add_argument("--sweep", action="store_true", help="reap them now (per agent policy)")
    client("watch", "Stream a session's state changes and exit records.").add_argument(
        "session", help="session name")
    sp = client("keepalive", "Renew (or set) a session's lease.")
    sp.add_argument("session", help="session name")
    sp.add_argument("--ttl", type=positive_float, required=True,
                    help="the session stops if not renewed within this many seconds")
    return p


# ---------------------------------------------------------------- daemons


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _tls(args: argparse.Namespace) -> Any:
    from tether.agent.daemon import TLSFiles

    return TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca)


def _agent_config(args: argparse.Namespace, name: str, listen: str, state_dir: str) -> Any:
    from tether.agent.run import AgentConfig

    options = {}
    for item in args.signaller_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--signaller-option {item!r} is not KEY=VALUE", EXIT_USAGE)
        options[key] = value
    return AgentConfig(name=name, listen=listen, state_dir=state_dir,
                       coordinator=getattr(args, "coordinator", ""),
                       advertise=getattr(args, "advertise", ""),
                       metrics_listen=args.metrics_listen, containment=args.containment,
                       default_grace=args.default_grace, signaller_options=options,
                       tls=_tls(args), insecure=args.insecure)


def run_daemon(args: argparse.Namespace) -> int:
    # gRPC's fork handlers are for processes that use gRPC on both sides of a fork; ours
    # exec at once, and the handlers only log noise on every spawn.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    import asyncio
    import socket

    from tether.agent.daemon import ListenError, Shutdown, capture_signals
    from tether.coordinator.run import (
        CoordinatorDaemonConfig,
        default_state_dir,
        run_coordinator,
        run_serve,
    )

    _setup_logging(args.log_level)
    state_dir = os.path.abspath(args.state_dir or default_state_dir())

    async def main() -> None:
        shutdown = Shutdown()
        with capture_signals(shutdown):
            if args.command == "agent":
                from tether.agent.run import run_agent

                name = args.name or socket.gethostname()
                await run_agent(_agent_config(args, name, args.listen, state_dir), shutdown)
                return
            cfg = CoordinatorDaemonConfig(listen=args.listen, state_dir=state_dir,
                                          metrics_listen=args.metrics_listen, tls=_tls(args),
                                          insecure=args.insecure)
            if args.command == "coordinator":
                cfg.agent_ttl = args.agent_ttl
                await run_coordinator(cfg, shutdown)
            else:
                agent_cfg = _agent_config(args, args.agent_name, args.listen, "")
                agent_cfg.coordinator = ""
                await run_serve(cfg, agent_cfg, shutdown)

    try:
        asyncio.run(main())
    except ListenError as exc:
        print(f"tether {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, ValueError) as exc:
        print(f"tether {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# ---------------------------------------------------------------- client commands


def run_client(args: argparse.Namespace) -> int:
    import asyncio

    import grpc

    from tether.coordinator import client_commands

    try:
        return asyncio.run(client_commands.dispatch(args))
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        detail = exc.details() or code.name
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(f"tether: coordinator {args.coordinator} is unreachable ({detail}); start it "
                  "with `tether serve` or point --coordinator / TETHER_COORDINATOR at it",
                  file=sys.stderr)
            return EXIT_UNREACHABLE
        if code == grpc.StatusCode.NOT_FOUND:
            print(f"tether: {detail}", file=sys.stderr)
            return EXIT_NOT_FOUND
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            print(f"tether: {detail}", file=sys.stderr)
            return EXIT_USAGE if code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_UNCLEAN
        print(f"tether: {code.name}: {detail}", file=sys.stderr)
        return EXIT_UNCLEAN


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from tether import __version__

        print(f"tether {__version__}")
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command in ("serve", "coordinator", "agent"):
            return run_daemon(args)
        if args.command == "spawn":
            argv_ = list(args.argv)
            if argv_ and argv_[0] == "--":
                argv_ = argv_[1:]
            if not argv_:
                raise CLIError("spawn needs a command: tether spawn --session S -- CMD [ARG...]",
                               EXIT_USAGE)
            args.argv = argv_
            args.env_map = parse_env(args.env)
            args.meta_map = parse_labels(args.meta)
        return run_client(args)
    except CLIError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)


if __name__ == "__main__":
    raise SystemExit(main())
