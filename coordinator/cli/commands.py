"""The client commands: one coroutine each, built on the Python SDK (``tether.client``).

Each returns an exit status; errors propagate to ``main``, which prints them and maps
them to a status (``exitcodes.for_error``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tether.client.aio import AsyncClient, CoordinatorUnreachable, TimedOut
from tether.client.spec import build_spec
from tether.coordinator.cli.exitcodes import CLIError, ExitCode
from tether.coordinator.cli.logs import cmd_logs
from tether.coordinator.cli.output import (
    details,
    emit,
    group_dict,
    port_dict,
    report_dict,
    report_table,
    session_dict,
    shown_state,
    table,
)
from tether.core.errors import NotFound, StartFailed, TetherError, Unauthenticated
from tether.core.model import EventKind, GroupState
from tether.core.sessions import GroupEntry, SessionReport

Command = Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]


def pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{flag} {item!r} is not KEY=VALUE; write e.g. {flag} PORT=8080")
        out[key] = value
    return out


async def cmd_spawn(c: AsyncClient, args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CLIError("spawn needs a command: tether spawn --session S -- CMD [ARG...]")
    spec = build_spec(
        argv, session=args.session, window=args.window, label=args.label,
        env=pairs(args.env, "--env"), inherit_env=args.inherit_env, cwd=args.cwd, log=args.log,
        grace=args.grace, stop_signal=args.stop_signal, stop_order=args.stop_order,
        ready=args.ready, start_timeout=args.start_timeout, probe_timeout=args.probe_timeout,
        target=args.target, orphan_policy=args.orphan_policy, owns_target=args.owns_target,
        labels=pairs(args.meta, "--meta"), user=args.user, ports=args.port,
        memory=args.memory, cpus=args.cpus, pids=args.pids, pre_stop=args.pre_stop,
        pre_stop_timeout=args.pre_stop_timeout, plugins=not args.no_plugins, live=args.live,
        live_interval=args.live_interval, live_timeout=args.live_timeout,
        live_failures=args.live_failures, on_unhealthy=args.on_unhealthy,
        restart=args.restart, restart_max=args.restart_max,
        restart_window=args.restart_window, stdin=args.stdin,
        stop_stdin_grace=args.stop_stdin_grace)
    try:
        g = await c.spawn(spec, agent=args.agent, idempotency_key=args.idempotency_key,
                          timeout=args.timeout or spec.start_timeout + 60)
    except StartFailed as exc:
        group: GroupEntry | None = getattr(exc, "group", None)
        if group is not None:
            emit(args.output, group_dict(group), "")
        print(f"tether: start failed ({exc.failure.value}): {exc.message}", file=sys.stderr)
        return ExitCode.UNCLEAN
    emit(args.output, group_dict(g), g.view.group_id)
    return ExitCode.OK


async def cmd_adopt(c: AsyncClient, args: argparse.Namespace) -> int:
    g = await c.adopt(args.pid, session=args.session, agent=args.agent, label=args.label,
                      grace=args.grace, orphan_policy=args.orphan_policy, timeout=args.timeout)
    emit(args.output, group_dict(g), g.view.group_id)
    return ExitCode.OK


async def cmd_signal(c: AsyncClient, args: argparse.Namespace) -> int:
    rep = await c.signal(args.session, args.signal, groups=args.groups, labels=args.labels,
                         timeout=args.timeout)
    d = report_dict(rep)
    for g, r in zip(d["groups"], rep.groups, strict=True):
        g["members_signalled"] = r.members_signalled
    rows = [[r.group_id, r.label or "-", r.agent, r.members_signalled, r.error or ""]
            for r in rep.groups]
    emit(args.output, d, table(rows, ["group", "label", "agent", "signalled", "error"]))
    return ExitCode.OK if rep.complete else ExitCode.UNREACHABLE


async def cmd_stop(c: AsyncClient, args: argparse.Namespace) -> int:
    rep = await c.stop(args.session, grace=args.grace, groups=args.groups, labels=args.labels,
                       timeout=args.timeout)
    emit(args.output, report_dict(rep), report_table(rep))
    return _report_status(rep, args.session, "stop")


def _report_status(rep: SessionReport, session: str, what: str) -> int:
    """`stop` and `wait` exit alike: 0 every group ended clean, 1 not clean or not done,
    4 some agent did not answer."""
    if not rep.complete:
        if any(r.error or r.unreachable for r in rep.groups):
            print(f"tether: some agents did not answer; the {what} goes on in the coordinator "
                  f"(see `tether show {session}`)", file=sys.stderr)
            return ExitCode.UNREACHABLE
        if what == "wait":
            live = sum(1 for r in rep.groups if not r.state.ended)
            print(f"tether: session {session!r} still has {live} live group(s) after --timeout "
                  f"(see `tether show {session}`)", file=sys.stderr)
            return ExitCode.UNCLEAN
        print(f"tether: the {what} did not finish within --timeout; it goes on in the "
              f"coordinator (see `tether show {session}` or `tether watch {session}`)",
              file=sys.stderr)
        return ExitCode.UNCLEAN
    return ExitCode.OK if rep.clean else ExitCode.UNCLEAN


async def cmd_restart(c: AsyncClient, args: argparse.Namespace) -> int:
    rep = await c.restart(args.session, groups=args.groups, labels=args.labels, grace=args.grace,
                          timeout=args.timeout)
    d = report_dict(rep)
    for g, r in zip(d["groups"], rep.groups, strict=True):
        g["restarts"] = r.restarts
    rows = [[r.group_id, r.label or "-", r.agent, g["state"], r.restarts, r.error or ""]
            for r, g in zip(rep.groups, d["groups"], strict=True)]
    emit(args.output, d, table(rows, ["group", "label", "agent", "state", "restarts", "error"]))
    if rep.complete:
        return ExitCode.OK
    if any(r.unreachable or "unreachable" in r.error for r in rep.groups):
        return ExitCode.UNREACHABLE
    for r in rep.groups:
        if r.error:
            why = r.error
        elif r.state is GroupState.RESTARTING:
            why = ("its new run did not become ready; it is tried again with backoff up to "
                   f"its restart limit (see `tether show {args.session}`)")
        elif r.state is not GroupState.RUNNING:
            why = f"it is {r.state.value}" + (f" ({r.exit.reason.value})" if r.exit else "")
        else:
            continue
        print(f"tether: group {r.group_id} was not restarted: {why}", file=sys.stderr)
    return ExitCode.UNCLEAN


async def cmd_forget(c: AsyncClient, args: argparse.Namespace) -> int:
    if not args.groups and not args.labels:
        raise CLIError("forget needs the groups to drop: --group ID or --label L")
    done = await c.forget(args.session, groups=args.groups, labels=args.labels,
                          timeout=args.timeout)
    emit(args.output, {"session": args.session, "forgotten": done},
         "\n".join(f"forgot {gid}" for gid in done))
    return ExitCode.OK


async def cmd_wait(c: AsyncClient, args: argparse.Namespace) -> int:
    rep = await c.wait(args.session, timeout=args.timeout)
    d = report_dict(rep)
    if args.output != "json":
        live = sum(1 for r in rep.groups if not r.state.ended)
        head = (f"session {args.session}: no live group" if rep.complete
                else f"session {args.session}: {live} live group(s)")
        print(head + ("\n" + report_table(rep) if rep.groups else ""))
    else:
        emit(args.output, d, "")
    return _report_status(rep, args.session, "wait")


async def cmd_sessions(c: AsyncClient, args: argparse.Namespace) -> int:
    views = await c.sessions(include_stopped=args.all, include_groups=args.output == "json",
                             timeout=args.timeout)
    sessions = [session_dict(v) for v in views]
    rows = [[s["session"], s["window"] or "-", s["state"], v.group_count, v.live_count,
             s.get("lease_expires_in_seconds", "-")] for s, v in zip(sessions, views, strict=True)]
    emit(args.output, {"sessions": sessions},
         table(rows, ["session", "window", "state", "groups", "live", "lease_s"]))
    return ExitCode.OK


async def cmd_show(c: AsyncClient, args: argparse.Namespace) -> int:
    v = await c.session(args.session, timeout=args.timeout)
    d = session_dict(v)
    rows = [[g["group_id"], g["label"] or "-", g["agent"], g["target"],
             g["state"] + (",unhealthy" if g["unhealthy"] else ""), g["containment"], g["pid"],
             g["restarts"], g.get("reason") or "-", " ".join(g["argv"])[:40]]
            for g in d["groups"]]
    head = f"session {d['session']}: {d['state']}" + (f" ({d['stop_cause']})"
                                                      if d["stop_cause"] else "")
    text = head + "\n" + table(rows, ["group", "label", "agent", "target", "state",
                                      "containment", "pid", "restarts", "reason", "command"])
    more = details(v.groups)
    emit(args.output, d, text + ("\n\n" + more if more else ""))
    return ExitCode.OK


async def cmd_agents(c: AsyncClient, args: argparse.Namespace) -> int:
    states = await c.agents(timeout=args.timeout)
    agents = [{"name": a.info.name, "address": a.info.address,
               "state": "up" if a.up else "unreachable", "instance": a.info.instance,
               "containment": a.info.containment.value, "version": a.info.version,
               "last_seen_seconds_ago": round(time.time() - a.info.last_seen, 1)}
              for a in states]
    rows = [[a["name"], a["address"], a["state"], a["containment"], a["version"],
             a["last_seen_seconds_ago"]] for a in agents]
    emit(args.output, {"agents": agents},
         table(rows, ["name", "address", "state", "containment", "version", "seen_s_ago"]))
    return ExitCode.OK


async def cmd_forget_agent(c: AsyncClient, args: argparse.Namespace) -> int:
    lost = await c.forget_agent(args.name, force=args.force, timeout=args.timeout)
    emit(args.output, {"agent": args.name, "lost": lost},
         f"agent {args.name} forgotten; {len(lost)} group(s) recorded lost"
         + (f": {' '.join(lost)}" if lost else ""))
    return ExitCode.OK


async def cmd_coordinators(c: AsyncClient, args: argparse.Namespace) -> int:
    """Each address's own answer (no redirect): who leads, as it sees it."""
    out: list[dict[str, Any]] = []
    for address in c.addresses:
        try:
            info = await c.leader(address=address, timeout=args.timeout or 5)
        except TetherError as exc:
            out.append({"address": address, "role": "unreachable", "leader": "", "epoch": 0,
                        "error": str(exc)})
            continue
        out.append({"address": address, "role": "leader" if info.leading else "standby",
                    "leader": info.leader, "epoch": info.epoch,
                    "lease_remaining_seconds": round(info.lease_remaining, 2),
                    "store": info.store, "error": info.problem})
    rows = [[o["address"], o["role"], o["leader"] or "-", o["epoch"], o["error"] or ""]
            for o in out]
    emit(args.output, {"coordinators": out},
         table(rows, ["address", "role", "leader", "epoch", "problem"]))
    leaders = {o["leader"] for o in out if o["leader"]}
    return ExitCode.OK if len(leaders) == 1 else ExitCode.UNREACHABLE


async def cmd_orphans(c: AsyncClient, args: argparse.Namespace) -> int:
    report = await c.orphans(sweep=args.sweep, timeout=args.timeout)
    orphans = [{"pid": o.pid, "command": o.command, "former_group": o.former_group,
                "age_seconds": o.age, "found_by": o.found_by, "agent": o.agent,
                "reaped": o.reaped} for o in report.orphans]
    rows = [[o.agent, o.pid, o.former_group or "-", round(o.age, 1), o.found_by,
             "yes" if o.reaped else "no", o.command[:50]] for o in report.orphans]
    text = table(rows, ["agent", "pid", "former_group", "age_s", "found_by", "reaped", "command"])
    for agent, why in report.unreachable.items():
        text += f"\nagent {agent}: unreachable ({why})"
    emit(args.output, {"orphans": orphans, "unreachable": report.unreachable}, text)
    return ExitCode.UNREACHABLE if report.unreachable else ExitCode.OK


async def cmd_watch(c: AsyncClient, args: argparse.Namespace) -> int:
    """Print a session's events as they come; ends after ``session_stopped`` (the session
    is done: every group has its record)."""
    try:
        async for ev in c.watch(args.session, timeout=args.timeout):
            if ev.group is None:  # a session-level event
                rep = ev.report
                d: dict[str, Any] = {"seq": ev.seq, "kind": ev.kind.value,
                                     "session": ev.session_id}
                if rep is not None:
                    d["report"] = report_dict(rep)
                if args.output == "json":
                    print(json.dumps(d), flush=True)
                elif rep is not None:
                    print(f"{ev.kind.value:<11} {ev.session_id} "
                          f"{'clean' if rep.clean else 'NOT clean'}, {len(rep.groups)} "
                          f"group(s) with a record", flush=True)
                if ev.kind is EventKind.SESSION_STOPPED:
                    return ExitCode.OK
                continue
            d = {"seq": ev.seq, "kind": ev.kind.value, **group_dict(ev.group)}
            if args.output == "json":
                print(json.dumps(d), flush=True)
            else:
                extra = f" {d['reason']}" if d.get("reason") else ""
                if ev.group.view.unhealthy:
                    extra += f" unhealthy ({ev.group.view.health})"
                print(f"{ev.kind.value:<11} {ev.group.view.group_id} {d['label'] or '-'} "
                      f"{d['agent']} {d['state']}{extra}", flush=True)
    except TimedOut:
        return ExitCode.OK  # --timeout: watched for as long as asked
    return ExitCode.OK


async def cmd_ports(c: AsyncClient, args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise CLIError(f"port {args.port} is not a TCP port; give 1-65535, or no port for all")
    report = await c.ports(args.port, agent=args.agent, timeout=args.timeout)
    ports = [port_dict(o) for o in report.ports]
    rows = [[o.agent, o.port, o.address or "-", o.session_id or "-", o.group_id or "-",
             o.label or "-", o.name or "-", o.pid or "-", o.user or "-",
             (o.command if o.listening else "(reserved, not listening yet)")[:60]]
            for o in report.ports]
    text = table(rows, ["agent", "port", "address", "session", "group", "label", "name", "pid",
                        "user", "command"])
    if args.port and not report.ports:
        text = f"port {args.port}: nobody listens on it and no group holds it"
    for agent, why in report.unreachable.items():
        text += f"\nagent {agent}: unreachable ({why})"
    emit(args.output, {"ports": ports, "unreachable": report.unreachable}, text)
    return ExitCode.UNREACHABLE if report.unreachable else ExitCode.OK


async def cmd_keepalive(c: AsyncClient, args: argparse.Namespace) -> int:
    v = await c.keepalive(args.session, args.ttl, timeout=args.timeout)
    emit(args.output, session_dict(v), f"session {v.session.session_id}: lease "
                                       f"{v.session.ttl:g} s")
    return ExitCode.OK


async def cmd_up(c: AsyncClient, args: argparse.Namespace) -> int:
    plan = args.plan
    if not args.add:
        try:
            existing = await c.session(plan.session, timeout=args.timeout)
        except NotFound:
            pass
        else:
            live = [g for g in existing.groups if not g.state.ended]
            if live:
                print(f"tether up: session {plan.session!r} already has {len(live)} live "
                      f"group(s); stop it first (`tether stop {plan.session}`) or pass --add "
                      "to start these beside them; nothing was started", file=sys.stderr)
                return ExitCode.USAGE
    gate = asyncio.Semaphore(args.parallel)

    async def start(entry: Any) -> tuple[Any, GroupEntry | None, str, str]:
        timeout = args.timeout or entry.spec.start_timeout + 60
        async with gate:
            try:
                return entry, await c.spawn(entry.spec, agent=entry.agent, timeout=timeout), "", ""
            except StartFailed as exc:
                return entry, getattr(exc, "group", None), "failed", str(exc)
            except TimedOut:
                return entry, None, "unknown", (f"no answer within {timeout:g} s: it may be "
                                                f"running; see `tether show {plan.session}`")
            except (CoordinatorUnreachable, Unauthenticated):
                raise  # the coordinator, not this group: main says what to do
            except TetherError as exc:
                return entry, None, "refused", str(exc)

    results = await asyncio.gather(*(start(e) for e in plan.groups for _ in range(e.replicas)))
    rows, out, failed = [], [], 0
    for entry, g, problem, error in results:
        label = entry.spec.label or "-"
        if g is None:
            failed += 1
            rows.append(["-", label, problem, error])
            out.append({"label": label, "state": problem, "error": error})
            print(f"tether up: {entry.where}: {problem}: {error}", file=sys.stderr)
            continue
        d = group_dict(g)
        out.append(d)
        if problem:
            failed += 1
            print(f"tether up: {entry.where}: start failed ({d.get('failure', 'unknown')}): "
                  f"{d.get('message', '')}", file=sys.stderr)
            rows.append([g.view.group_id, label, shown_state(g), d.get("message", "")])
        else:
            rows.append([g.view.group_id, label, shown_state(g), g.agent])
    emit(args.output, {"session": plan.session, "window": plan.window, "groups": out},
         table(rows, ["group", "label", "state", "agent / message"]))
    return ExitCode.UNCLEAN if failed else ExitCode.OK


async def cmd_audit(c: AsyncClient, args: argparse.Namespace) -> int:
    if not 0 < args.limit <= 100_000:
        raise CLIError(f"--limit {args.limit}: give 1 to 100000")
    entries = await c.audit(since=args.since, limit=args.limit, timeout=args.timeout)
    if args.output == "json":
        for e in entries:  # the log's own format: one JSON object per line
            print(json.dumps(e.to_dict()))
        return ExitCode.OK
    rows = [[e.to_dict()["time"], e.role or "-", e.credential or "-", e.method.split("/")[-1],
             e.session or "-", e.group or "-", e.result, e.message]
            for e in entries]
    emit(args.output, None, table(rows, ["time", "role", "credential", "call", "session",
                                         "group", "result", "message"]))
    return ExitCode.OK


COMMANDS: dict[str, Command] = {
    "spawn": cmd_spawn, "adopt": cmd_adopt, "signal": cmd_signal, "stop": cmd_stop,
    "sessions": cmd_sessions, "show": cmd_show, "agents": cmd_agents, "orphans": cmd_orphans,
    "watch": cmd_watch, "keepalive": cmd_keepalive, "up": cmd_up, "audit": cmd_audit,
    "ports": cmd_ports, "forget-agent": cmd_forget_agent, "coordinators": cmd_coordinators,
    "restart": cmd_restart, "forget": cmd_forget, "wait": cmd_wait, "logs": cmd_logs,
}


async def dispatch(args: argparse.Namespace) -> int:
    async with AsyncClient(args.coordinator, token_file=args.token_file, tls_ca=args.tls_ca,
                           tls_cert=args.tls_cert, tls_key=args.tls_key,
                           server_name=args.tls_server_name) as c:
        return await COMMANDS[args.command](c, args)
