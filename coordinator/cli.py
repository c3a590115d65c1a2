"""`tether`: the operators' CLI, and the launcher of the daemons.

Heavy modules (grpc, asyncssh, docker, prometheus) are imported only inside
the command that needs them, so `tether --help` and client commands start fast.

Exit statuses: 0 success (for `stop`: every group ended with zero survivors);
1 finished but not clean / start failure; 2 usage error; 3 unknown session
(or group, agent); 4 coordinator or agent unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
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
        sp.add_argument("--tls-ca", default=os.environ.get("TETHER_TLS_CA", ""),
                        help="dial the coordinator over TLS, trusting this CA "
                        "(default: $TETHER_TLS_CA; none: plaintext)")
        sp.add_argument("--tls-cert", default=os.environ.get("TETHER_TLS_CERT", ""),
                        help="client certificate for mTLS (default: $TETHER_TLS_CERT)")
        sp.add_argument("--tls-key", default=os.environ.get("TETHER_TLS_KEY", ""),
                        help="client key for mTLS (default: $TETHER_TLS_KEY)")
        sp.add_argument("--tls-server-name", default=os.environ.get("TETHER_TLS_SERVER_NAME", ""),
                        help="name to verify in the coordinator's certificate, when it differs "
                        "from the address")
        sp.add_argument("--token-file", default=os.environ.get("TETHER_TOKEN_FILE", ""),
                        help="send the bearer token in this file (default: $TETHER_TOKEN_FILE)")
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
        sp.add_argument("--token-file", default="",
                        help="accept callers presenting a bearer token listed in this file "
                        "(one per line); with --allow-identity, the only ways in")
        sp.add_argument("--allow-identity", action="append", default=[], metavar="CN",
                        help="accept callers whose client certificate has this common name "
                        "(repeatable; needs --tls-client-ca)")
        sp.add_argument("--tls-ca", default="",
                        help="CA to verify the daemons this one dials (agents / coordinator)")
        sp.add_argument("--tls-server-name", default="",
                        help="name to verify in dialed daemons' certificates, if not the address")
        sp.add_argument("--client-token-file", default="",
                        help="bearer token this daemon presents when it dials another")
        sp.add_argument("--config", default="",
                        help=f"TOML config file; its [{name}] table sets defaults that "
                        "environment variables (TETHER_<OPTION>) and flags override")
        sp.add_argument("--log-level", default="INFO",
                        help="DEBUG, INFO, WARNING (default INFO; env TETHER_LOG_LEVEL)")
        return sp

    def agent_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--containment", choices=["auto", "cgroup", "subreaper", "pgid"],
                        default="auto",
                        help="how groups are held together (default auto: the strongest the "
                        "host offers)")
        sp.add_argument("--default-grace", type=positive_float, default=None,
                        help="grace before SIGKILL for groups that do not set one (default 5)")
        sp.add_argument("--orphan-reaping", choices=["kill", "report"], default="kill",
                        help="what to do with orphans found (default kill; report only lists "
                        "them)")
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
    sp = sub.add_parser("config", help="Validate a TOML config file.",
                        description="Validate a TOML config file: tables [serve], [agent], "
                        "[coordinator], each holding options named like the daemon's flags "
                        "(tls_cert, state_dir, ...).")
    sp.add_argument("action", choices=["check"], help="check: validate FILE")
    sp.add_argument("file", help="the TOML file")
    sp = client("up", "Start every group a TOML session file lists (see README: Session "
                "files); prints one line per group.")
    sp.add_argument("file", help="the session file")
    sp.add_argument("--session", default="", help="session name (default: the file's session)")
    sp.add_argument("--add", action="store_true",
                    help="start the groups even if the session already has live ones")
    sp.add_argument("--parallel", type=int, default=32,
                    help="spawns in flight at once (default 32)")
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
    from tether.rpc.daemon import TLSFiles

    return TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca)


def _auth(args: argparse.Namespace) -> Any:
    from tether.rpc.security import ServerAuth, load_tokens

    if args.allow_identity and not args.tls_client_ca:
        raise CLIError("--allow-identity needs --tls-client-ca: identities come from verified "
                       "client certificates", EXIT_USAGE)
    return ServerAuth(load_tokens(args.token_file), frozenset(args.allow_identity))


def _dial(args: argparse.Namespace) -> Any:
    """How a daemon dials others: its own certificate doubles as its client identity."""
    from tether.rpc.security import ClientSecurity

    return ClientSecurity(ca=args.tls_ca, cert=args.tls_cert if args.tls_ca else "",
                          key=args.tls_key if args.tls_ca else "",
                          token_file=args.client_token_file, server_name=args.tls_server_name)


# ---------------------------------------------------------------- configuration


def _given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Dests set explicitly on the command line."""
    given = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                given.add(action.dest)
    return given


def _config_values(action: argparse.Action, raw: Any, source: str) -> Any:
    """Convert a config-file or environment value the way the flag would be."""
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off", ""):
            return False
        raise CLIError(f"{source}: {raw!r} is not a boolean (true/false)", EXIT_USAGE)
    if isinstance(action, argparse._AppendAction):
        if isinstance(raw, dict):
            return [f"{k}={v}" for k, v in raw.items()]
        items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x]
        return [str(x) for x in items]
    convert: Any = action.type
    value = raw if convert is None else convert(str(raw))
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{source}: {raw!r} is not one of {', '.join(map(str, action.choices))}",
                       EXIT_USAGE)
    return value


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise KeyError(name)


CONFIGURABLE_SKIP = {"help", "config", "command"}


def load_config_file(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise CLIError(f"cannot read config file {path!r}: {exc.strerror}", EXIT_USAGE) from exc
    except tomllib.TOMLDecodeError as exc:
        raise CLIError(f"config file {path!r} is not valid TOML: {exc}", EXIT_USAGE) from exc


def check_table(parser: argparse.ArgumentParser, section: str, table: Any,
                path: str) -> list[str]:
    """Problems in one [section] of a config file (empty: fine)."""
    problems = []
    if not isinstance(table, dict):
        return [f"{path}: [{section}] must be a table"]
    actions = {a.dest: a for a in _subparser(parser, section)._actions
               if a.dest not in CONFIGURABLE_SKIP}
    for key, raw in table.items():
        action = actions.get(key)
        if action is None:
            problems.append(f"{path}: [{section}] has no option {key!r}; known: "
                            f"{', '.join(sorted(actions))}")
            continue
        try:
            value = _config_values(action, raw, f"{path}: [{section}] {key}")
        except (CLIError, argparse.ArgumentTypeError, ValueError) as exc:
            problems.append(str(exc) if isinstance(exc, CLIError)
                            else f"{path}: [{section}] {key}: {exc}")
            continue
        if ((key.startswith("tls_") and key not in ("tls_server_name",)) or key.endswith(
                "token_file")) and value and not os.path.isfile(str(value)):
            problems.append(f"{path}: [{section}] {key}: no such file {value!r}")
        if key in ("listen", "metrics_listen", "coordinator", "advertise") and value \
                and ":" not in str(value):
            problems.append(f"{path}: [{section}] {key}: {value!r} is not HOST:PORT")
    return problems


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 argv: Sequence[str]) -> None:
    """Layer the daemon's options: flags > TETHER_<OPTION> environment > config file."""
    sp = _subparser(parser, args.command)
    given = _given(sp, argv)
    table: dict[str, Any] = {}
    if args.config:
        data = load_config_file(args.config)
        problems = check_table(parser, args.command, data.get(args.command, {}), args.config)
        if problems:
            raise CLIError("; ".join(problems), EXIT_USAGE)
        table = data.get(args.command, {})
    for action in sp._actions:
        dest = action.dest
        if dest in CONFIGURABLE_SKIP or dest in given:
            continue
        env = os.environ.get("TETHER_" + dest.upper())
        if dest == "coordinator" and args.command != "agent":
            env = None
        if env is not None:
            setattr(args, dest, _config_values(action, env, f"TETHER_{dest.upper()}"))
        elif dest in table:
            setattr(args, dest, _config_values(action, table[dest],
                                               f"{args.config}: [{args.command}] {dest}"))


def run_config_check(parser: argparse.ArgumentParser, path: str) -> int:
    data = load_config_file(path)
    problems = []
    for section, table in data.items():
        if section not in ("serve", "agent", "coordinator"):
            problems.append(f"{path}: unknown table [{section}]; use [serve], [agent] or "
                            "[coordinator]")
            continue
        problems += check_table(parser, section, table, path)
    if problems:
        for p in problems:
            print(f"tether config: {p}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: ok ({', '.join(f'[{s}]' for s in data) or 'empty'})")
    return EXIT_OK


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
                       orphan_reaping=args.orphan_reaping,
                       tls=_tls(args), insecure=args.insecure, auth=_auth(args),
                       dial=_dial(args))


def run_daemon(args: argparse.Namespace) -> int:
    # gRPC's fork handlers are for processes that use gRPC on both sides of a fork; ours
    # exec at once, and the handlers only log noise on every spawn.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    import asyncio
    import socket

    from tether.coordinator.run import (
        CoordinatorDaemonConfig,
        default_state_dir,
        run_coordinator,
        run_serve,
    )
    from tether.rpc.daemon import ListenError, Shutdown, capture_signals
    from tether.rpc.security import SecurityConfigError

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
                                          insecure=args.insecure, auth=_auth(args),
                                          dial=_dial(args))
            if args.command == "coordinator":
                cfg.agent_ttl = args.agent_ttl
                await run_coordinator(cfg, shutdown)
            else:
                agent_cfg = _agent_config(args, args.agent_name, args.listen, "")
                agent_cfg.coordinator = ""
                await run_serve(cfg, agent_cfg, shutdown)

    from tether.core.errors import TetherError

    try:
        asyncio.run(main())
    except (ListenError, SecurityConfigError, TetherError) as exc:
        # A second agent on the same state directory, a state file that cannot be read...
        print(f"tether {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, ValueError) as exc:
        print(f"tether {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# ---------------------------------------------------------------- client commands


_client_ran = False


def run_client(args: argparse.Namespace) -> int:
    global _client_ran
    _client_ran = True
    import asyncio

    import grpc

    from tether.coordinator import client_commands
    from tether.rpc.security import SecurityConfigError

    try:
        return asyncio.run(client_commands.dispatch(args))
    except SecurityConfigError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        detail = exc.details() or code.name
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            print(f"tether: coordinator {args.coordinator} is unreachable ({detail}); start it "
                  "with `tether serve` or point --coordinator / TETHER_COORDINATOR at it",
                  file=sys.stderr)
            return EXIT_UNREACHABLE
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            print(f"tether: refused by {args.coordinator}: {detail}", file=sys.stderr)
            return EXIT_USAGE
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.version:
        from tether import __version__

        print(f"tether {__version__}")
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "config":
            return run_config_check(parser, args.file)
        if args.command in ("serve", "coordinator", "agent"):
            apply_config(parser, args, argv)
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
        if args.command == "up":
            if args.parallel < 1:
                raise CLIError(f"--parallel {args.parallel}: give 1 or more", EXIT_USAGE)
            from tether.coordinator.up import SessionFileError, load

            try:
                args.plan = load(args.file, args.session)
            except SessionFileError as exc:
                raise CLIError(str(exc), EXIT_USAGE) from None
        return run_client(args)
    except CLIError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


def console() -> None:
    """The `tether` command. Once a client command returned, its output is all there is:
    flush it and leave without the interpreter's teardown, where gRPC shuts its threads
    down (25 to 40 ms of a 130 ms `tether sessions`). Daemons exit the normal way."""
    rc = main()
    if _client_ran:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BrokenPipeError):  # `tether sessions | head`
                stream.flush()
        os._exit(rc)
    raise SystemExit(rc)


if __name__ == "__main__":
    console()
