"""Assembling and running the daemons (`serve`, `coordinator`, `agent`) from their options."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from tether.coordinator.cli.exitcodes import CLIError, ExitCode

#: Fields a log record may carry (group log lines, agents) that JSON logs show as fields.
CONTEXT_FIELDS = ("group", "session", "agent", "pid")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and context fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value not in (None, ""):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    try:
        root.setLevel(level.upper())
    except ValueError:
        raise CLIError(f"--log-level {level!r} is unknown; use DEBUG, INFO or WARNING") from None


def _tls(args: argparse.Namespace) -> Any:
    from tether.rpc.daemon import TLSFiles

    return TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca)


def _auth(args: argparse.Namespace) -> Any:
    from tether.rpc.auth import ServerAuth, load_tokens, parse_identities

    if args.allow_identity and not args.tls_client_ca:
        raise CLIError("--allow-identity needs --tls-client-ca: identities come from verified "
                       "client certificates")
    return ServerAuth(load_tokens(args.token_file), parse_identities(args.allow_identity))


def _dial(args: argparse.Namespace) -> Any:
    """How a daemon dials others: its own certificate doubles as its client identity."""
    from tether.rpc.security import ClientSecurity

    return ClientSecurity(ca=args.tls_ca, cert=args.tls_cert if args.tls_ca else "",
                          key=args.tls_key if args.tls_ca else "",
                          token_file=args.client_token_file, server_name=args.tls_server_name)


def _agent_config(args: argparse.Namespace, name: str, state_dir: str) -> Any:
    from tether.agent.run import AgentConfig

    options = {}
    for item in args.signaller_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--signaller-option {item!r} is not KEY=VALUE")
        options[key] = value
    from tether.coordinator.cli.options import plugin_switch

    off = []
    for item in args.plugin:
        plugin, on = plugin_switch(item)
        if not on:
            off.append(plugin)
    return AgentConfig(name=name, listen=args.listen, state_dir=state_dir,
                       plugins_off=off, no_plugins=args.no_plugins,
                       coordinator=getattr(args, "coordinator", ""),
                       advertise=getattr(args, "advertise", ""),
                       metrics_listen=args.metrics_listen, containment=args.containment,
                       default_grace=args.default_grace, signaller_options=options,
                       orphan_reaping=args.orphan_reaping,
                       tls=_tls(args), insecure=args.insecure, auth=_auth(args),
                       dial=_dial(args), output_buffer=_size(args.output_buffer),
                       output_total=_size(args.output_total))


def _size(value: Any) -> int:
    from tether.coordinator.cli.options import size

    return value if isinstance(value, int) else size(str(value))


def _warn_password_on_command_line() -> None:
    """A store URL with a password among the arguments: every local user can read it."""
    from tether.coordinator.store_url import secrets_of

    for n, arg in enumerate(sys.argv):
        url = arg.partition("=")[2] if arg.startswith("--store=") else (
            sys.argv[n + 1] if arg == "--store" and n + 1 < len(sys.argv) else "")
        if url and secrets_of(url):
            logging.getLogger("tether.coordinator").warning(
                "the --store URL on the command line holds a password: every local user can "
                "read it (ps, /proc); give it in TETHER_STORE, the config file (private) or "
                "a PGPASSFILE instead")


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
    from tether.core.errors import TetherError
    from tether.rpc.daemon import Shutdown, capture_signals

    setup_logging(args.log_level, args.log_format)
    from tether.core import trace

    trace.setup(f"tether-{args.command}")  # spans, only with the extra tether[otel]
    state_dir = os.path.abspath(args.state_dir or default_state_dir())

    async def main() -> None:
        shutdown = Shutdown()
        with capture_signals(shutdown):
            if args.command == "agent":
                from tether.agent.run import run_agent

                name = args.name or socket.gethostname()
                await run_agent(_agent_config(args, name, state_dir), shutdown)
                return
            cfg = CoordinatorDaemonConfig(listen=args.listen, state_dir=state_dir,
                                          metrics_listen=args.metrics_listen, tls=_tls(args),
                                          insecure=args.insecure, auth=_auth(args),
                                          dial=_dial(args),
                                          retain_stopped=args.retain_stopped,
                                          max_lease_streams=args.max_lease_streams,
                                          max_logs_streams=args.max_logs_streams)
            if args.command == "coordinator":
                cfg.agent_ttl = args.agent_ttl
                cfg.store, cfg.advertise, cfg.leader_ttl = (args.store, args.advertise,
                                                            args.leader_ttl)
                if cfg.leader_ttl < 0.5:
                    raise CLIError(f"--leader-ttl {cfg.leader_ttl:g}: give 0.5 s or more")
                _warn_password_on_command_line()
                await run_coordinator(cfg, shutdown)
            else:
                agent_cfg = _agent_config(args, args.agent_name, "")
                agent_cfg.coordinator = ""
                await run_serve(cfg, agent_cfg, shutdown)

    try:
        asyncio.run(main())
    except (TetherError, RuntimeError, ValueError, OSError) as exc:
        # A port in use, another agent on the same state directory, a state file that
        # cannot be read, a certificate that is missing...
        print(f"tether {args.command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    return ExitCode.OK
