"""`tether up FILE`: start every group a session file lists, in one command.

A session file is TOML::

    session = "dev"                 # or --session NAME
    window = "main"                 # optional

    [[group]]
    label = "web"
    argv = ["python3", "-m", "http.server", "8000"]
    cwd = "/srv/site"
    env = { PYTHONUNBUFFERED = "1" }
    ready = "tcp:8000"
    grace = 5
    replicas = 1                    # copies of this group (default 1)

A group takes the keys of `tether spawn`'s options, with underscores: label,
argv, cwd, env, inherit_env, log, grace, stop_signal, stop_order, ready,
start_timeout, probe_timeout, target, agent, orphan_policy, owns_target, meta,
user, ports, memory, cpus, pids, pre_stop, pre_stop_timeout, plugins, live,
live_interval, live_timeout, live_failures, on_unhealthy, restart, restart_max,
restart_window, stdin, stop_stdin_grace, plus replicas. The whole file is checked before anything starts: a
mistake is reported with the file, the group and the key, and nothing runs. Then every
group is spawned over one connection, many in flight, and the command prints one line
per group.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.client.spec import build_spec
from tether.core.errors import InvalidSpec
from tether.core.model import GroupSpec


class SessionFileError(Exception):
    """The file is missing or wrong; the CLI prints it and exits 2 (usage)."""

#: key -> (accepted types, what to say when the type is wrong)
GROUP_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "argv": ((list,), "a list of strings, the command and its arguments"),
    "label": ((str,), "a string"),
    "cwd": ((str,), "an absolute path"),
    "env": ((dict,), "a table of strings, e.g. { KEY = \"value\" }"),
    "inherit_env": ((bool,), "true or false"),
    "log": ((str,), "a file path"),
    "grace": ((int, float), "seconds, a number"),
    "stop_signal": ((str,), "a signal name such as \"TERM\""),
    "stop_order": ((int,), "an integer"),
    "ready": ((str,), "a probe: tcp:PORT, http:URL, log:REGEX or exec:COMMAND"),
    "start_timeout": ((int, float), "seconds, a number"),
    "probe_timeout": ((int, float), "seconds, a number"),
    "target": ((str,), "local, docker:CONTAINER or ssh:[USER@]HOST[:PORT]"),
    "agent": ((str,), "an agent name"),
    "orphan_policy": ((str,), "\"kill\" or \"keep\""),
    "owns_target": ((bool,), "true or false"),
    "meta": ((dict,), "a table of strings"),
    "replicas": ((int,), "a whole number from 1 to 10000"),
    "user": ((str,), "\"USER\" or \"USER:GROUP\""),
    "ports": ((list,), "a list of \"NAME\" or \"NAME=PORT\" strings"),
    "memory": ((str, int), "a size such as \"512M\" (or bytes)"),
    "cpus": ((int, float), "CPUs, a number such as 1.5"),
    "pids": ((int,), "a whole number of processes"),
    "pre_stop": ((str,), "\"exec:COMMAND ARGS\""),
    "pre_stop_timeout": ((int, float), "seconds, a number"),
    "plugins": ((bool,), "true or false"),
    "live": ((str,), "a liveness probe: tcp:PORT, http:URL or exec:COMMAND"),
    "live_interval": ((int, float), "seconds, a number"),
    "live_timeout": ((int, float), "seconds, a number"),
    "live_failures": ((int,), "a whole number of checks"),
    "on_unhealthy": ((str,), "\"none\", \"restart\" or \"stop\""),
    "restart": ((str,), "\"no\", \"on-failure\" or \"always\""),
    "restart_max": ((int,), "a whole number of restarts"),
    "restart_window": ((int, float), "seconds, a number"),
    "stdin": ((str,), "\"null\" or \"pipe\""),
    "stop_stdin_grace": ((int, float), "seconds, a number"),
}
TOP_KEYS = {"session", "window", "group"}


@dataclass
class PlannedGroup:
    """One [[group]] of the file, checked: the spec `tether spawn` would send for it."""

    where: str
    agent: str
    replicas: int
    spec: GroupSpec


@dataclass
class SessionFile:
    session: str
    window: str
    groups: list[PlannedGroup]

    @property
    def total(self) -> int:
        return sum(g.replicas for g in self.groups)


def _fail(path: str, what: str) -> SessionFileError:
    return SessionFileError(f"{path}: {what}; nothing was started")


def _strings(path: str, where: str, key: str, value: Any) -> dict[str, str]:
    bad = [k for k, v in value.items() if not isinstance(v, str)]
    if bad:
        raise _fail(path, f"{where}: {key}.{bad[0]} must be a string (quote numbers: \"8000\")")
    return dict(value)


def _port_list(path: str, where: str, value: list[Any]) -> list[str]:
    bad = [p for p in value if not isinstance(p, str)]
    if bad:
        raise _fail(path, f"{where}: ports must hold strings like \"http\" or \"http=3000\", "
                          f"not {bad[0]!r}")
    return value


def load(path: str, session_override: str = "") -> SessionFile:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SessionFileError(f"session file {path!r} not found; pass the path of a TOML "
                               "file (see `tether up --help`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SessionFileError(f"cannot read session file {path!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(path, f"not valid TOML ({exc})") from None
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise _fail(path, f"unknown top-level key {unknown[0]!r}; known: session, window, "
                          "[[group]]")
    session = session_override or data.get("session", "")
    if not isinstance(session, str) or not session:
        raise _fail(path, "no session: add `session = \"NAME\"` or pass --session")
    window = data.get("window", "")
    if not isinstance(window, str):
        raise _fail(path, "window must be a string")
    raw = data.get("group", [])
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "no groups: add at least one [[group]] with an argv")
    groups = [_group(path, i, g, session, window) for i, g in enumerate(raw, 1)]
    return SessionFile(session, window, groups)


def _group(path: str, index: int, g: Any, session: str, window: str) -> PlannedGroup:
    if not isinstance(g, dict):
        raise _fail(path, f"group {index} must be a table ([[group]])")
    label = g.get("label")
    where = f"group {index}" + (f" ({label})" if isinstance(label, str) and label else "")
    for key, value in g.items():
        if key not in GROUP_KEYS:
            raise _fail(path, f"{where}: unknown key {key!r}; known: {', '.join(GROUP_KEYS)}")
        types, what = GROUP_KEYS[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise _fail(path, f"{where}: {key} must be {what}, not {value!r}")
    argv = g.get("argv")
    if not argv or not all(isinstance(a, str) for a in argv):
        raise _fail(path, f"{where}: argv must be a non-empty list of strings, e.g. "
                          "argv = [\"sleep\", \"60\"]")
    replicas = g.get("replicas", 1)
    if not 1 <= replicas <= 10000:
        raise _fail(path, f"{where}: replicas must be from 1 to 10000, not {replicas}")
    # The spec `tether spawn` would send, built by the same builder and checked by the
    # same rules the agent applies: a bad signal, probe, path, name or duration is refused
    # here, before any group starts.
    try:
        spec = build_spec(
            argv, session=session, window=window, label=g.get("label", ""),
            env=_strings(path, where, "env", g.get("env", {})),
            labels=_strings(path, where, "meta", g.get("meta", {})),
            inherit_env=g.get("inherit_env", False), cwd=g.get("cwd", ""), log=g.get("log", ""),
            grace=g.get("grace"), stop_signal=g.get("stop_signal"),
            stop_order=g.get("stop_order", 0), ready=g.get("ready", ""),
            start_timeout=g.get("start_timeout"), probe_timeout=g.get("probe_timeout"),
            target=g.get("target", "local"), orphan_policy=g.get("orphan_policy", "kill"),
            owns_target=g.get("owns_target", False), user=g.get("user", ""),
            ports=_port_list(path, where, g.get("ports", [])), memory=g.get("memory"),
            cpus=g.get("cpus"), pids=g.get("pids"), pre_stop=g.get("pre_stop", ""),
            pre_stop_timeout=g.get("pre_stop_timeout"), plugins=g.get("plugins", True),
            live=g.get("live", ""), live_interval=g.get("live_interval"),
            live_timeout=g.get("live_timeout"), live_failures=g.get("live_failures"),
            on_unhealthy=g.get("on_unhealthy", "none"), restart=g.get("restart", "no"),
            restart_max=g.get("restart_max"), restart_window=g.get("restart_window"),
            stdin=g.get("stdin", "null"), stop_stdin_grace=g.get("stop_stdin_grace"))
    except InvalidSpec as exc:
        raise _fail(path, f"{where}: {exc}") from None
    return PlannedGroup(where, g.get("agent", ""), replicas, spec)
