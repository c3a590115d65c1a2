"""The daemons' options, declared once: flags, config-file keys, environment variables.

Each option of `tether serve`, `tether coordinator` and `tether agent` is one
``Option``. The same table builds the argparse flags, validates config files
(`tether config check`) and layers the sources: flags > ``TETHER_<OPTION>``
environment variables > the config file's ``[serve]``/``[coordinator]``/``[agent]``
table > the default. Flags are parsed with suppressed defaults, so "given on the
command line" is simply "present in the namespace" (no argparse internals).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tether.coordinator.cli.exitcodes import CLIError


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 to 1000000")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def size(text: str) -> int:
    """``1M``, ``512K``, ``2G`` or bytes (powers of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give bytes or a number "
                                         "with K, M or G, e.g. 1M")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    default: Any = ""
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    #: "value", "flag" (store_true) or "list" (repeatable).
    kind: str = "value"
    metavar: str | None = None
    #: Read from TETHER_<DEST> (off for options whose variable means something else).
    env: bool = True

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kw: dict[str, Any] = {"help": self.help, "default": argparse.SUPPRESS}
        if self.kind == "flag":
            kw["action"] = "store_true"
        elif self.kind == "list":
            kw["action"] = "append"
        if self.kind != "flag":
            if self.type is not None:
                kw["type"] = self.type
            if self.choices is not None:
                kw["choices"] = list(self.choices)
            if self.metavar is not None:
                kw["metavar"] = self.metavar
        parser.add_argument(self.flag, **kw)

    def convert(self, raw: Any, source: str) -> Any:
        """A config-file or environment value, converted the way the flag would be."""
        if self.kind == "flag":
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise CLIError(f"{source}: {raw!r} is not a boolean (true/false)")
        if self.kind == "list":
            if isinstance(raw, dict):
                return [f"{k}={v}" for k, v in raw.items()]
            items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x]
            return [str(x) for x in items]
        if isinstance(raw, dict | list):
            raise CLIError(f"{source}: {raw!r} must be a single value")
        try:
            value = raw if self.type is None else self.type(str(raw))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise CLIError(f"{source}: {exc}") from None
        if self.choices is not None and value not in self.choices:
            raise CLIError(f"{source}: {raw!r} is not one of {', '.join(self.choices)}")
        return str(value) if self.type is None else value


def _common(listen: str) -> list[Option]:
    return [
        Option("--listen", f"gRPC HOST:PORT (default {listen}; port 0 picks one)", listen),
        Option("--state-dir", "where state lives (default: $XDG_STATE_HOME/tether or "
               "~/.local/state/tether)", None),
        Option("--metrics-listen", "serve Prometheus /metrics on HOST:PORT (default: off)"),
        Option("--tls-cert", "server certificate (PEM) for TLS"),
        Option("--tls-key", "server key (PEM) for TLS"),
        Option("--tls-client-ca", "require client certificates signed by this CA (mTLS)"),
        Option("--insecure", "allow a non-loopback --listen without TLS or without "
               "authentication (trusted networks only; logged)", False, kind="flag"),
        Option("--token-file", "accept callers presenting a bearer token listed in this file, "
               "one `TOKEN ROLE` per line; roles: admin, operator, reader, agent:NAME, "
               "coordinator (a token alone is admin, with a warning); a private regular file. "
               "With --allow-identity, the only ways in"),
        Option("--allow-identity", "accept callers whose client certificate has the common "
               "name CN, with ROLE (as in --token-file; CN alone: admin, with a warning); "
               "repeatable; needs --tls-client-ca", [], kind="list", metavar="CN=ROLE"),
        Option("--tls-ca", "CA to verify the daemons this one dials (agents / coordinator)"),
        Option("--tls-server-name", "name to verify in dialed daemons' certificates, if not "
               "the address; a coordinator otherwise expects each agent's certificate to name "
               "that agent (give this only if all agents share one certificate name)"),
        Option("--client-token-file", "bearer token this daemon presents when it dials another "
               "(a coordinator sends it only to agents verified by TLS, or on loopback)"),
        Option("--log-level", "DEBUG, INFO, WARNING (default INFO)", "INFO"),
        Option("--log-format", "text (default) or json: one JSON object per line with the "
               "group, session and agent as fields", "text", choices=("text", "json")),
    ]


_AGENT = [
    Option("--containment", "how groups are held together (default auto: the strongest the "
           "host offers)", "auto", choices=("auto", "cgroup", "subreaper", "pgid")),
    Option("--default-grace", "grace before SIGKILL for groups that do not set one (default 5)",
           None, type=positive_float),
    Option("--orphan-reaping", "what to do with orphans found (default kill; report only "
           "lists them)", "kill", choices=("kill", "report")),
    Option("--signaller-option", "option for the signallers, e.g. known_hosts=/path, "
           "docker_host=unix:///run/docker.sock (repeatable)", [], kind="list",
           metavar="KEY=VALUE"),
    Option("--plugin", "turn a toolchain plugin on or off, e.g. nvm=off (repeatable; in a "
           "config file: plugin = { nvm = false })", [], kind="list", metavar="NAME=on|off"),
    Option("--no-plugins", "apply no toolchain plugins at all", False, kind="flag"),
    Option("--output-buffer", "captured stdout and stderr kept per group for `tether logs`, "
           "oldest dropped first (default 1M; at least 64K)", "1M", type=size,
           metavar="SIZE"),
    Option("--output-total", "captured output kept for all groups together: many groups "
           "share it, each keeping at least 64K (default 128M)", "128M", type=size,
           metavar="SIZE"),
]

_COORDINATOR = [
    Option("--retain-stopped", "keep stopped sessions and their groups' records this many "
           "seconds (default 604800: a week)", 7 * 24 * 3600.0, type=positive_float),
    Option("--max-lease-streams", "lease streams (OpenLease) one credential may hold open at "
           "once (default 1000); ten times this in all", 1000, type=count),
    Option("--max-logs-streams", "Logs calls (tether logs, SDK logs) one credential may have "
           "open at once (default 64)", 64, type=count),
]

DAEMONS: Mapping[str, tuple[str, list[Option]]] = {
    "serve": ("Run the coordinator and a local agent in one process (foreground).",
              [*_common("127.0.0.1:7400"),
               Option("--agent-name", "name of the local agent", "local"), *_AGENT,
               *_COORDINATOR]),
    "coordinator": ("Run the coordinator alone (foreground).",
                    [*_common("127.0.0.1:7400"), *_COORDINATOR,
                     Option("--agent-ttl", "an agent silent this long is unreachable "
                            "(default 5 s)", 5.0, type=positive_float),
                     Option("--store", "PostgreSQL URL (postgresql://USER@HOST:PORT/DB) of a "
                            "store shared by several coordinators: one leads, the others "
                            "stand by and take over (default: SQLite in --state-dir, this "
                            "coordinator alone). A password in it is visible to every local "
                            "user on a command line: use TETHER_STORE, the config file or "
                            "PGPASSFILE", metavar="URL"),
                     Option("--advertise", "HOST:PORT clients and agents are sent to while "
                            "this coordinator leads (default: --listen; its host name if "
                            "--listen is 0.0.0.0)"),
                     Option("--leader-ttl", "with --store: the leader's lease, renewed every "
                            "third of it; a standby takes over once it lapses (default 3 s)",
                            3.0, type=positive_float)]),
    "agent": ("Run an agent (foreground), registered with a coordinator.",
              [*_common("127.0.0.1:7401"),
               Option("--coordinator", "coordinator HOST:PORT to register with; several, "
                      "comma-separated, for coordinators sharing a store: the agent "
                      "registers with whichever leads (default: $TETHER_COORDINATOR, else "
                      "none: standalone)", ""),
               Option("--name", "agent name (default: the host name)", None),
               Option("--advertise", "HOST:PORT the coordinator should dial (default: "
                      "--listen)"),
               *_AGENT]),
}


def add_daemon(sub: Any, command: str) -> argparse.ArgumentParser:
    text, options = DAEMONS[command]
    sp: argparse.ArgumentParser = sub.add_parser(command, help=text, description=text)
    for option in options:
        option.add_to(sp)
    sp.add_argument("--config", default="",
                    help=f"TOML config file; its [{command}] table sets defaults that "
                    "environment variables (TETHER_<OPTION>) and flags override")
    return sp


def load_config_file(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise CLIError(f"cannot read config file {path!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CLIError(f"config file {path!r} is not valid TOML: {exc}") from exc


def check_table(command: str, table: Any, path: str) -> list[str]:
    """Problems in one [command] table of a config file (empty: fine)."""
    if not isinstance(table, dict):
        return [f"{path}: [{command}] must be a table"]
    known = {o.dest: o for o in DAEMONS[command][1]}
    problems = []
    for key, raw in table.items():
        option = known.get(key)
        if option is None:
            problems.append(f"{path}: [{command}] has no option {key!r}; known: "
                            f"{', '.join(sorted(known))}")
            continue
        try:
            value = option.convert(raw, f"{path}: [{command}] {key}")
        except CLIError as exc:
            problems.append(str(exc))
            continue
        if ((key.startswith("tls_") and key != "tls_server_name") or key.endswith("token_file")) \
                and value and not os.path.isfile(str(value)):
            problems.append(f"{path}: [{command}] {key}: no such file {value!r}")
        elif value and key in ("token_file", "allow_identity"):
            problems += _check_credentials(key, value, f"{path}: [{command}] {key}")
        if key in ("listen", "metrics_listen", "advertise") and value \
                and ":" not in str(value):
            problems.append(f"{path}: [{command}] {key}: {value!r} is not HOST:PORT")
        if key == "plugin":
            for item in value:
                try:
                    plugin_switch(item)
                except CLIError as exc:
                    problems.append(f"{path}: [{command}] {key}: {exc}")
        if key == "coordinator" and value and not all(
                ":" in a for a in str(value).split(",") if a.strip()):
            problems.append(f"{path}: [{command}] {key}: {value!r} is not "
                            "HOST:PORT[,HOST:PORT...]")
        if key == "store" and value and not str(value).startswith(("postgresql://",
                                                                   "postgres://")):
            # Never echoed: it may hold a password.
            problems.append(f"{path}: [{command}] store: not a PostgreSQL URL "
                            "(postgresql://USER@HOST:PORT/DB)")
    return problems


def _check_credentials(key: str, value: Any, where: str) -> list[str]:
    """A token file or identities as the daemon would read them (roles, format, mode)."""
    from tether.rpc.auth import load_tokens, parse_identities
    from tether.rpc.security import SecurityConfigError

    try:
        if key == "token_file":
            load_tokens(str(value))
        else:
            parse_identities(value)
    except SecurityConfigError as exc:
        return [f"{where}: {exc}"]
    return []


SWITCH_ON = ("on", "true", "1", "yes")
SWITCH_OFF = ("off", "false", "0", "no")


def plugin_switch(item: str) -> tuple[str, bool]:
    """``NAME=on|off`` (``plugin = { nvm = false }`` in a file gives ``nvm=False``)."""
    plugin, sep, value = item.partition("=")
    switch = value.strip().lower()
    if not sep or not plugin or switch not in SWITCH_ON + SWITCH_OFF:
        raise CLIError(f"--plugin {item!r} is not NAME=on|off; write e.g. --plugin nvm=off "
                       "(config file: plugin = { nvm = false })")
    return plugin, switch in SWITCH_ON


def layer(command: str, given: argparse.Namespace) -> argparse.Namespace:
    """Every option of ``command``: flag, else environment, else config file, else default."""
    config_path = getattr(given, "config", "")
    table: dict[str, Any] = {}
    if config_path:
        data = load_config_file(config_path)
        problems = check_table(command, data.get(command, {}), config_path)
        if problems:
            raise CLIError("; ".join(problems))
        table = data.get(command, {})
    out = argparse.Namespace(command=command, config=config_path)
    for option in DAEMONS[command][1]:
        dest = option.dest
        env_name = "TETHER_" + dest.upper()
        if hasattr(given, dest):
            value = getattr(given, dest)
        elif option.env and os.environ.get(env_name) is not None:
            value = option.convert(os.environ[env_name], env_name)
        elif dest in table:
            value = option.convert(table[dest], f"{config_path}: [{command}] {dest}")
        else:
            value = list(option.default) if isinstance(option.default, list) else option.default
        setattr(out, dest, value)
    return out


def run_config_check(path: str) -> list[str]:
    data = load_config_file(path)
    problems = []
    for section, table in data.items():
        if section not in DAEMONS:
            problems.append(f"{path}: unknown table [{section}]; use [serve], [agent] or "
                            "[coordinator]")
            continue
        problems += check_table(section, table, path)
    return problems
