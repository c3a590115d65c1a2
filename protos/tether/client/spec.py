"""Build a ``GroupSpec`` from plain Python values: the one spec builder of every client.

The CLI's `tether spawn`, `tether up` files and SDK users all come through
``build_spec``; the result is validated by the model itself (the same rules the
agent applies), so a mistake is refused before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from tether.core.errors import InvalidSpec
from tether.core.model import (
    DEFAULT_LIVE_FAILURES,
    DEFAULT_LIVE_INTERVAL,
    DEFAULT_RESTART_MAX,
    DEFAULT_RESTART_WINDOW,
    DEFAULT_START_TIMEOUT,
    GroupSpec,
    Limits,
    Liveness,
    OrphanPolicy,
    PortRequest,
    PreStop,
    Probe,
    RestartMode,
    RestartPolicy,
    StdinMode,
    StopOverride,
    UnhealthyAction,
    check_cpus,
    check_grace,
    check_pids,
    check_seconds,
    parse_memory,
    parse_signal,
)


def build_spec(argv: Sequence[str], *, session: str = "", window: str = "", label: str = "",
               env: Mapping[str, str] | None = None, inherit_env: bool = False, cwd: str = "",
               log: str = "", grace: float | None = None, stop_signal: str | None = None,
               stop_order: int = 0, ready: str = "", start_timeout: float | None = None,
               probe_timeout: float | None = None, target: str = "local",
               orphan_policy: str = "kill", owns_target: bool = False,
               labels: Mapping[str, str] | None = None, user: str = "",
               ports: Sequence[str | PortRequest] = (), memory: str | int | None = None,
               cpus: float | None = None, pids: int | None = None, pre_stop: str = "",
               pre_stop_timeout: float | None = None, plugins: bool = True, live: str = "",
               live_interval: float | None = None, live_timeout: float | None = None,
               live_failures: int | None = None, on_unhealthy: str = "none",
               restart: str = "no", restart_max: int | None = None,
               restart_window: float | None = None, stdin: str = "null",
               stop_stdin_grace: float | None = None) -> GroupSpec:
    """A validated spec; raises ``InvalidSpec`` naming the field and what to give instead.

    ``ports`` are ``"NAME"`` (the agent picks a free port) or ``"NAME=PORT"``; ``memory``
    is bytes or a size like ``"512M"``; ``pre_stop`` is ``"exec:COMMAND ARGS"``; ``live``
    is a liveness probe like ``ready``; ``restart`` is ``no``, ``on-failure`` or ``always``;
    ``stdin`` is ``null`` (default) or ``pipe`` (writable through ``attach``)."""
    if isinstance(argv, str):
        raise InvalidSpec("argv must be a list of strings (the command and its arguments), "
                          "not one string: no shell parses it", field="argv")
    try:
        policy = OrphanPolicy(orphan_policy)
    except ValueError:
        raise InvalidSpec(f"orphan policy {orphan_policy!r} is unknown; use kill or keep",
                          field="orphan_policy") from None
    if grace is not None:
        check_grace(grace)
    if probe_timeout is not None:
        check_seconds(probe_timeout, "probe timeout", "probe_timeout", allow_zero=False,
                      high=3600)
    if isinstance(ports, str):
        raise InvalidSpec("ports must be a list of NAME or NAME=PORT strings", field="ports")
    port_requests = tuple(p if isinstance(p, PortRequest) else PortRequest.parse(p)
                          for p in ports)
    limits = Limits(memory=None if memory is None else parse_memory(memory),
                    cpus=None if cpus is None else check_cpus(cpus),
                    pids=None if pids is None else check_pids(pids))
    if pre_stop_timeout is not None and not pre_stop:
        raise InvalidSpec("a pre-stop timeout needs a pre-stop hook (--pre-stop exec:...)",
                          field="pre_stop_timeout")
    hook = PreStop.parse(pre_stop, timeout=pre_stop_timeout) if pre_stop else None
    liveness = _liveness(live, live_interval, live_timeout, live_failures, on_unhealthy)
    try:
        mode = RestartMode(restart)
    except ValueError:
        raise InvalidSpec(f"restart policy {restart!r} is unknown; use no, on-failure or "
                          "always", field="restart") from None
    try:
        stdin_mode = StdinMode(stdin)
    except ValueError:
        raise InvalidSpec(f"stdin {stdin!r} is unknown; use null or pipe", field="stdin") \
            from None
    policy_restart = RestartPolicy(
        mode, DEFAULT_RESTART_MAX if restart_max is None else restart_max,
        DEFAULT_RESTART_WINDOW if restart_window is None else restart_window)
    return GroupSpec(
        argv=tuple(argv), cwd=cwd, env=MappingProxyType(dict(env or {})),
        inherit_env=inherit_env, log_path=log,
        ready=Probe.parse(ready, timeout=probe_timeout) if ready else None,
        start_timeout=DEFAULT_START_TIMEOUT if start_timeout is None else start_timeout,
        stop=StopOverride(parse_signal(stop_signal) if stop_signal else None, grace),
        orphan_policy=policy, label=label, labels=MappingProxyType(dict(labels or {})),
        session_id=session, window=window, stop_order=stop_order, target=target or "local",
        owns_target=owns_target, user=user, ports=port_requests, limits=limits,
        pre_stop=hook, plugins=plugins, liveness=liveness, restart=policy_restart,
        stdin=stdin_mode, stop_stdin_grace=stop_stdin_grace)


def _liveness(live: str, interval: float | None, timeout: float | None,
              failures: int | None, on_unhealthy: str) -> Liveness | None:
    try:
        action = UnhealthyAction(on_unhealthy)
    except ValueError:
        raise InvalidSpec(f"--on-unhealthy {on_unhealthy!r} is unknown; use none, restart or "
                          "stop", field="on_unhealthy") from None
    if not live:
        given = [flag for flag, value in (("--live-interval", interval),
                                          ("--live-timeout", timeout),
                                          ("--live-failures", failures)) if value is not None]
        if action is not UnhealthyAction.NONE:
            given.append(f"--on-unhealthy {action.value}")
        if given:
            raise InvalidSpec(f"{given[0]} needs a liveness probe: without --live SPEC nothing "
                              "is checked, so nothing can be unhealthy; add --live tcp:PORT, "
                              "http:URL or exec:COMMAND", field="live")
        return None
    if timeout is not None:
        check_seconds(timeout, "live timeout", "live_timeout", allow_zero=False, high=3600)
    return Liveness(Probe.parse(live, timeout=timeout, field_="live"),
                    DEFAULT_LIVE_INTERVAL if interval is None else interval,
                    DEFAULT_LIVE_FAILURES if failures is None else failures, action)
