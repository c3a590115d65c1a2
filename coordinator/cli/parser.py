"""The `tether` command line: every command and option, with help for each.

Client options (``--coordinator``, ``-o``, ``--timeout``, TLS and token) may be
given before or after the command (`tether --coordinator H:P stop S` works like
`tether stop S --coordinator H:P`): both places parse with suppressed defaults,
and ``client_defaults`` fills in what neither gave.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from tether.coordinator.cli.options import DAEMONS, add_daemon, positive_float

DEFAULT_COORDINATOR = "127.0.0.1:7400"
CLIENT_COMMANDS = ("spawn", "adopt", "signal", "stop", "sessions", "show", "agents", "orphans",
                   "watch", "keepalive", "up", "audit", "ports", "forget-agent",
                   "coordinators", "restart", "forget", "wait", "logs")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_time(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``90s``, ``15m``, ``2h``, ``7d``) or a time
    (``2024-05-01``, ``2024-05-01T10:00:00Z``; without a zone: UTC). Seconds since the epoch."""
    import datetime
    import re
    import time

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return (time.time() if now is None else now) - float(m[1]) * _UNITS[m[2]]
    try:
        at = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (90s, 15m, 2h, 7d) nor a time "
            "(2024-05-01 or 2024-05-01T10:00:00Z)") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.UTC)
    return at.timestamp()


def _client_options(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    p.add_argument("--coordinator", default=s,
                   help="coordinator HOST:PORT, or several comma-separated (coordinators "
                   "sharing a store: calls go to whichever leads, and survive a failover) "
                   f"(default: $TETHER_COORDINATOR or {DEFAULT_COORDINATOR})")
    p.add_argument("-o", "--output", choices=["table", "json"], default=s,
                   help="output format (default: table)")
    p.add_argument("--timeout", type=positive_float, default=s,
                   help="give up after this many seconds (default: per command)")
    p.add_argument("--tls-ca", default=s, help="dial the coordinator over TLS, trusting this "
                   "CA (default: $TETHER_TLS_CA; none: plaintext)")
    p.add_argument("--tls-cert", default=s, help="client certificate for mTLS "
                   "(default: $TETHER_TLS_CERT)")
    p.add_argument("--tls-key", default=s, help="client key for mTLS (default: $TETHER_TLS_KEY)")
    p.add_argument("--tls-server-name", default=s, help="name to verify in the coordinator's "
                   "certificate, when it differs from the address")
    p.add_argument("--token-file", default=s, help="send the bearer token in this file "
                   "(default: $TETHER_TOKEN_FILE)")


def client_defaults(args: argparse.Namespace) -> None:
    """Fill in client options neither before nor after the command gave."""
    env = os.environ.get
    defaults: dict[str, Any] = {
        "coordinator": env("TETHER_COORDINATOR") or DEFAULT_COORDINATOR, "output": "table",
        "timeout": None, "tls_ca": env("TETHER_TLS_CA", ""),
        "tls_cert": env("TETHER_TLS_CERT", ""), "tls_key": env("TETHER_TLS_KEY", ""),
        "tls_server_name": env("TETHER_TLS_SERVER_NAME", ""),
        "token_file": env("TETHER_TOKEN_FILE", ""),
    }
    for key, value in defaults.items():
        if not hasattr(args, key):
            setattr(args, key, value)


def _selection(p: argparse.ArgumentParser, verb: str, note: str = "") -> None:
    p.add_argument("--group", action="append", default=[], metavar="ID", dest="groups",
                   help=f"{verb} this group (repeatable){note}")
    p.add_argument("--label", action="append", default=[], metavar="L", dest="labels",
                   help=f"{verb} the groups labelled L (repeatable)")


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
    _client_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def client(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        _client_options(sp)
        return sp

    for daemon in DAEMONS:
        add_daemon(sub, daemon)

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
    sp.add_argument("--stop-signal", default=None, help="stop signal (default TERM)")
    sp.add_argument("--stop-order", type=int, default=0,
                    help="session stops run lower orders first (default 0)")
    sp.add_argument("--ready", default="",
                    help="readiness probe: tcp:PORT, http://URL, log:REGEX or exec:COMMAND")
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
    sp.add_argument("--user", default="", metavar="USER[:GROUP]",
                    help="run as this user (local target; the agent must be root); HOME, USER "
                    "and LOGNAME come from the password database unless --env gives them")
    sp.add_argument("--port", action="append", default=[], metavar="NAME[=PORT]",
                    help="a TCP port the agent assigns (repeatable): free on 127.0.0.1, or "
                    "PORT if given; passed as PORT (the first) and TETHER_PORT_<NAME>, usable "
                    "in --ready as $PORT / $TETHER_PORT_<NAME>")
    sp.add_argument("--memory", default=None, metavar="SIZE",
                    help="memory limit, e.g. 512M (cgroup memory.max; OOM kills are recorded "
                    "as oom_killed)")
    sp.add_argument("--cpus", type=float, default=None, metavar="N",
                    help="CPU limit in CPUs, e.g. 1.5 (cgroup cpu.max)")
    sp.add_argument("--pids", type=int, default=None, metavar="N",
                    help="most processes and threads at once (cgroup pids.max)")
    sp.add_argument("--pre-stop", default="", metavar="exec:COMMAND",
                    help="run this before the stop signal, inside the grace (e.g. "
                    "'exec:tunnel close'); its tree is killed at its timeout")
    sp.add_argument("--pre-stop-timeout", type=positive_float, default=None, metavar="S",
                    help="the pre-stop hook's own timeout (default: the grace)")
    sp.add_argument("--no-plugins", action="store_true",
                    help="do not apply the agent's toolchain plugins (nvm, pyenv, jenv, asdf)")
    sp.add_argument("--live", default="", metavar="SPEC",
                    help="liveness probe while running: tcp:PORT, http://URL or exec:COMMAND "
                    "(default: none, no checks)")
    sp.add_argument("--live-interval", type=positive_float, default=None, metavar="S",
                    help="seconds between liveness checks (default 10)")
    sp.add_argument("--live-timeout", type=positive_float, default=None, metavar="S",
                    help="timeout of one liveness check (default 5)")
    sp.add_argument("--live-failures", type=int, default=None, metavar="N",
                    help="failed checks in a row that make the group unhealthy (default 3)")
    sp.add_argument("--on-unhealthy", choices=["none", "restart", "stop"], default="none",
                    help="what an unhealthy group gets: none (flagged only; default), "
                    "restart (a new run), stop")
    sp.add_argument("--restart", choices=["no", "on-failure", "always"], default="no",
                    help="start a run that ended again: no (default: a crash is reported), "
                    "on-failure (non-zero exit or a foreign signal), always")
    sp.add_argument("--restart-max", type=int, default=None, metavar="N",
                    help="at most N automatic restarts within --restart-window, then the "
                    "group fails (default 5)")
    sp.add_argument("--restart-window", type=positive_float, default=None, metavar="S",
                    help="the window of --restart-max, in seconds (default 60)")
    sp.add_argument("--stdin", choices=["null", "pipe"], default="null",
                    help="the program's stdin: null (/dev/null, default) or pipe (held by the "
                    "agent, written through Attach: language and MCP servers); a stop then "
                    "closes it first")
    sp.add_argument("--stop-stdin-grace", type=positive_float, default=None, metavar="S",
                    help="--stdin pipe: after closing stdin, a stop waits this long for the "
                    "program to end before the stop signal (default 2)")
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

    sp = client("signal", "Send a signal to every process of a session (or of some groups).")
    sp.add_argument("session", help="session name")
    sp.add_argument("signal", help="TERM, INT, HUP, USR1, ... or a number")
    _selection(sp, "signal only")

    sp = client("stop", "Stop a session (or some of its groups); blocks until each has an "
                "exit record.")
    sp.add_argument("session", help="session name")
    sp.add_argument("--grace", type=positive_float, default=None,
                    help="override every group's grace (seconds)")
    _selection(sp, "stop only", "; the session stays active")

    sp = client("restart", "Restart live groups in place: end each run, start it again with "
                "the same spec and id; the old run's record is kept.")
    sp.add_argument("session", help="session name")
    sp.add_argument("--grace", type=positive_float, default=None,
                    help="grace for ending the current runs (default: each group's own)")
    _selection(sp, "restart only", " (default: every live group)")

    sp = client("forget", "Drop ended groups from a session's listing.")
    sp.add_argument("session", help="session name")
    _selection(sp, "forget", " (at least one; live groups are refused)")

    client("wait", "Block until a session has no live group; exits like `stop` (0: every "
           "group ended clean). Give up after --timeout S.").add_argument(
        "session", help="session name")

    client("sessions", "List sessions.").add_argument(
        "--all", action="store_true", help="include stopped sessions")
    client("show", "Show a session and its groups.").add_argument("session", help="session name")
    client("agents", "List agents and whether they are up.")
    sp = client("forget-agent", "Give up an agent that is gone for good (admin): its live "
                "groups are recorded lost, and stops waiting on it finish.")
    sp.add_argument("name", help="the agent's name")
    sp.add_argument("--force", action="store_true",
                    help="even though it is up (it registers again on its next heartbeat)")
    client("coordinators", "Ask each --coordinator address which coordinator leads.")
    client("orphans", "List orphans (marked processes of no live group) on every agent.") \
        .add_argument("--sweep", action="store_true", help="reap them now (per agent policy)")
    client("watch", "Stream a session's state changes and exit records.").add_argument(
        "session", help="session name")
    sp = client("logs", "Print the captured stdout and stderr of a session's groups (or "
                "some), interleaved as they were written; -f follows new output.")
    sp.add_argument("session", help="session name")
    sp.add_argument("--group", action="append", default=[], metavar="ID", dest="groups",
                    help="only this group (repeatable; default: every group of the session)")
    sp.add_argument("-f", "--follow", action="store_true",
                    help="then print new output as it comes, until the groups (a whole "
                    "session: the session) ended and their output is complete")
    sp.add_argument("--tail", type=int, default=None, metavar="N",
                    help="only the last N lines of each group (default: all that is kept, "
                    "up to the agent's --output-buffer per group)")
    sp.add_argument("--since", type=since_time, default=0.0, metavar="DURATION|TIME",
                    help="only output written this far back (90s, 15m, 2h) or since this "
                    "time (2024-05-01T10:00:00Z)")
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
    sp = client("audit", "Print the coordinator's audit log: every mutating call, who made it "
                "(role and credential), on what, and how it ended (needs the admin role).")
    sp.add_argument("--since", type=since_time, default=0.0, metavar="DURATION|TIME",
                    help="only entries from this far back (90s, 15m, 2h, 7d) or since this "
                    "time (2024-05-01T10:00:00Z; UTC unless it says otherwise)")
    sp.add_argument("--limit", type=int, default=1000,
                    help="at most this many entries, the most recent (default 1000)")
    sp = client("ports", "Who holds TCP ports: each listening port with the session, group "
                "and label owning it, or the pid, user and command; on every agent.")
    sp.add_argument("port", nargs="?", type=int, default=0,
                    help="only this port (default: every listening port)")
    sp.add_argument("--agent", default="", help="only this agent (default: every agent)")
    sp = client("keepalive", "Renew (or set) a session's lease.")
    sp.add_argument("session", help="session name")
    sp.add_argument("--ttl", type=positive_float, required=True,
                    help="the session stops if not renewed within this many seconds")
    sp = sub.add_parser("completion", help="Print shell completion for bash, zsh or fish.",
                        description="Print shell completion for bash, zsh or fish, e.g. "
                        "`source <(tether completion bash)`.")
    sp.add_argument("shell", choices=["bash", "zsh", "fish"], help="the shell to complete in")
    return p
