"""The client side of the CLI: one coroutine per command, talking to the coordinator."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

import grpc

from tether.coordinator.cli import EXIT_OK, EXIT_UNCLEAN, EXIT_UNREACHABLE, EXIT_USAGE
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

STATE = {v.number: v.name.removeprefix("GROUP_STATE_").lower()
         for v in pb.GroupState.DESCRIPTOR.values}
REASON = {v.number: v.name.removeprefix("EXIT_REASON_").lower()
          for v in pb.ExitReason.DESCRIPTOR.values}
FAILURE = {v.number: v.name.removeprefix("FAILURE_CLASS_").lower()
           for v in pb.FailureClass.DESCRIPTOR.values}
CONTAINMENT = {v.number: v.name.removeprefix("CONTAINMENT_").lower()
               for v in pb.Containment.DESCRIPTOR.values}
SESSION_STATE = {v.number: v.name.removeprefix("SESSION_STATE_").lower()
                 for v in cpb.SessionState.DESCRIPTOR.values}
LIVE = (pb.GROUP_STATE_STARTING, pb.GROUP_STATE_RUNNING, pb.GROUP_STATE_STOPPING,
        pb.GROUP_STATE_UNREACHABLE)
AGENT_STATE = {v.number: v.name.removeprefix("AGENT_STATE_").lower()
               for v in cpb.AgentState.DESCRIPTOR.values}


def table(rows: Iterable[Iterable[Any]], header: list[str]) -> str:
    data = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in data)) if data else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in data]
    return "\n".join(lines)


def exit_fields(rec: pb.ExitRecord | None) -> dict[str, Any]:
    if rec is None or rec.reason == pb.EXIT_REASON_UNSPECIFIED:
        return {"reason": None, "exit_code": None, "signal": None, "survivors": 0,
                "duration_ms": 0}
    out: dict[str, Any] = {
        "reason": REASON[rec.reason],
        "exit_code": rec.exit_code if rec.HasField("exit_code") else None,
        "signal": rec.signal if rec.HasField("signal") else None,
        "survivors": rec.survivors,
        "duration_ms": round(rec.stop_duration_seconds * 1000, 1),
    }
    if rec.failure:
        out["failure"] = FAILURE[rec.failure]
    if rec.message:
        out["message"] = rec.message
    if rec.detail:
        out["detail"] = rec.detail
    return out


def group_dict(g: pb.Group) -> dict[str, Any]:
    return {
        "group_id": g.group_id, "label": g.spec.label, "agent": g.agent,
        "target": g.spec.target or "local", "state": STATE[g.state],
        "containment": CONTAINMENT[g.containment], "pid": g.leader_pid,
        "stop_order": g.spec.stop_order, "detached": g.detached,
        "argv": list(g.spec.argv),
        **(exit_fields(g.exit) if g.HasField("exit") else {}),
    }


def report_dict(rep: cpb.SessionReport) -> dict[str, Any]:
    groups = []
    for r in rep.groups:
        d: dict[str, Any] = {"group_id": r.group_id, "label": r.label, "agent": r.agent,
                             "target": r.target, "state": STATE[r.state],
                             **exit_fields(r.exit if r.HasField("exit") else None)}
        if r.error:
            d["error"] = r.error
        groups.append(d)
    return {"session": rep.session_id, "complete": rep.complete,
            "stop_cause": rep.stop_cause, "groups": groups}


def session_dict(s: cpb.Session) -> dict[str, Any]:
    out: dict[str, Any] = {
        "session": s.session_id, "window": s.window, "state": SESSION_STATE[s.state],
        "labels": dict(s.labels), "ttl_seconds": s.ttl_seconds, "stop_cause": s.stop_cause,
        "groups": [group_dict(g) for g in s.groups],
    }
    if s.HasField("lease_expires_at"):
        out["lease_expires_in_seconds"] = round(
            s.lease_expires_at.ToNanoseconds() / 1e9 - time.time(), 1)
    return out


def emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    if args.output == "json":
        print(json.dumps(obj, indent=2))
    elif text:
        print(text)


def _spec(args: argparse.Namespace) -> pb.GroupSpec:
    spec = pb.GroupSpec(
        argv=args.argv, cwd=args.cwd, env=args.env_map, inherit_env=args.inherit_env,
        log_path=args.log, ready=args.ready, label=args.label, labels=args.meta_map,
        session_id=args.session, window=args.window, stop_order=args.stop_order,
        target=args.target,
        orphan_policy=pb.ORPHAN_POLICY_KEEP if args.orphan_policy == "keep"
        else pb.ORPHAN_POLICY_KILL,
        owns_target=args.owns_target, stop=pb.StopPolicy(signal=args.stop_signal))
    if args.grace is not None:
        spec.stop.grace_seconds = args.grace
    if args.start_timeout is not None:
        spec.start_timeout_seconds = args.start_timeout
    if args.probe_timeout is not None:
        spec.probe_timeout_seconds = args.probe_timeout
    return spec


def report_table(rep: cpb.SessionReport) -> str:
    rows = []
    for r in rep.groups:
        e = exit_fields(r.exit if r.HasField("exit") else None)
        how = (f"code {e['exit_code']}" if e["exit_code"] is not None
               else f"signal {e['signal']}" if e["signal"] is not None else "-")
        rows.append([r.group_id, r.label or "-", r.agent, r.target, STATE[r.state],
                     e["reason"] or "-", how, e["survivors"], e["duration_ms"],
                     r.error or ""])
    return table(rows, ["group", "label", "agent", "target", "state", "reason", "leader",
                        "survivors", "ms", "error"])


async def dispatch(args: argparse.Namespace) -> int:
    from tether.rpc.security import ClientSecurity

    dial = ClientSecurity(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                          token_file=args.token_file, server_name=args.tls_server_name,
                          options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    async with dial.channel(args.coordinator) as channel:
        stub = cgrpc.CoordinatorServiceStub(channel)
        handler = globals()["cmd_" + args.command]
        status: int = await handler(stub, args)
        return status


async def cmd_spawn(stub: Any, args: argparse.Namespace) -> int:
    req = cpb.CoordinatorSpawnRequest(agent=args.agent, spec=_spec(args),
                                      idempotency_key=args.idempotency_key)
    g = await stub.Spawn(req, timeout=args.timeout or (args.start_timeout or 30) + 60)
    d = group_dict(g)
    if g.state == pb.GROUP_STATE_FAILED:
        emit(args, d, "")
        print(f"tether: start failed ({d.get('failure', 'unknown')}): {d.get('message', '')}",
              file=sys.stderr)
        return EXIT_UNCLEAN
    emit(args, d, g.group_id)
    return EXIT_OK


async def cmd_adopt(stub: Any, args: argparse.Namespace) -> int:
    spec = pb.GroupSpec(session_id=args.session, label=args.label,
                        orphan_policy=pb.ORPHAN_POLICY_KEEP if args.orphan_policy == "keep"
                        else pb.ORPHAN_POLICY_KILL)
    if args.grace is not None:
        spec.stop.grace_seconds = args.grace
    g = await stub.Adopt(cpb.CoordinatorAdoptRequest(agent=args.agent, pid=args.pid, spec=spec),
                         timeout=args.timeout or 30)
    emit(args, group_dict(g), g.group_id)
    return EXIT_OK


async def cmd_signal(stub: Any, args: argparse.Namespace) -> int:
    rep = await stub.SignalSession(cpb.SignalSessionRequest(session_id=args.session,
                                                            signal=args.signal),
                                   timeout=args.timeout or 30)
    d = report_dict(rep)
    for g, r in zip(d["groups"], rep.groups, strict=True):
        g["members_signalled"] = r.members_signalled
    rows = [[r.group_id, r.label or "-", r.agent, r.members_signalled, r.error or ""]
            for r in rep.groups]
    emit(args, d, table(rows, ["group", "label", "agent", "signalled", "error"]))
    if not rep.complete:
        return EXIT_UNREACHABLE
    return EXIT_OK


async def cmd_stop(stub: Any, args: argparse.Namespace) -> int:
    req = cpb.StopSessionRequest(session_id=args.session)
    if args.grace is not None:
        req.grace_seconds = args.grace
    rep = await stub.StopSession(req, timeout=args.timeout)
    emit(args, report_dict(rep), report_table(rep))
    if not rep.complete:
        if any(r.error for r in rep.groups):
            print("tether: some agents did not answer; the stop goes on in the coordinator "
                  f"(see `tether show {args.session}`)", file=sys.stderr)
            return EXIT_UNREACHABLE
        print("tether: the stop did not finish within --timeout; it goes on in the coordinator "
              f"(see `tether show {args.session}` or `tether watch {args.session}`)",
              file=sys.stderr)
        return EXIT_UNCLEAN
    clean = all(r.exit.survivors == 0 and r.exit.reason != pb.EXIT_REASON_LOST
                for r in rep.groups)
    return EXIT_OK if clean else EXIT_UNCLEAN


async def cmd_sessions(stub: Any, args: argparse.Namespace) -> int:
    listed: list[cpb.Session] = []
    token = ""
    while True:  # page by page: a big history never needs one huge message
        reply = await stub.ListSessions(cpb.ListSessionsRequest(
            include_stopped=args.all, include_groups=args.output == "json", page_size=500,
            page_token=token), timeout=args.timeout or 10)
        listed.extend(reply.sessions)
        token = reply.next_page_token
        if not token:
            break
    sessions = [session_dict(s) for s in listed]
    rows = [[s["session"], s["window"] or "-", s["state"], m.group_count, m.live_count,
             s.get("lease_expires_in_seconds", "-")] for s, m in zip(sessions, listed, strict=True)]
    emit(args, {"sessions": sessions},
         table(rows, ["session", "window", "state", "groups", "live", "lease_s"]))
    return EXIT_OK


async def cmd_show(stub: Any, args: argparse.Namespace) -> int:
    s = await stub.GetSession(cpb.GetSessionRequest(session_id=args.session),
                              timeout=args.timeout or 10)
    d = session_dict(s)
    rows = [[g["group_id"], g["label"] or "-", g["agent"], g["target"], g["state"],
             g["containment"], g["pid"], g.get("reason") or "-", " ".join(g["argv"])[:40]]
            for g in d["groups"]]
    head = f"session {d['session']}: {d['state']}" + (f" ({d['stop_cause']})"
                                                      if d["stop_cause"] else "")
    emit(args, d, head + "\n" + table(rows, ["group", "label", "agent", "target", "state",
                                             "containment", "pid", "reason", "command"]))
    return EXIT_OK


async def cmd_agents(stub: Any, args: argparse.Namespace) -> int:
    reply = await stub.ListAgents(cpb.ListAgentsRequest(), timeout=args.timeout or 10)
    agents = [{"name": a.name, "address": a.address, "state": AGENT_STATE[a.state],
               "instance": a.instance,
               "containment": CONTAINMENT[a.containment], "version": a.version,
               "last_seen_seconds_ago": round(time.time() - a.last_seen.ToNanoseconds() / 1e9, 1)}
              for a in reply.agents]
    rows = [[a["name"], a["address"], a["state"], a["containment"], a["version"],
             a["last_seen_seconds_ago"]] for a in agents]
    emit(args, {"agents": agents},
         table(rows, ["name", "address", "state", "containment", "version", "seen_s_ago"]))
    return EXIT_OK


async def cmd_orphans(stub: Any, args: argparse.Namespace) -> int:
    reply = await stub.ListOrphans(cpb.CoordinatorListOrphansRequest(sweep=args.sweep),
                                   timeout=args.timeout or 30)
    from google.protobuf.json_format import MessageToDict  # 14 ms to import: only here

    orphans = [MessageToDict(o, preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True) for o in reply.orphans]
    rows = [[o.agent, o.pid, o.former_group or "-", round(o.age_seconds, 1), o.found_by,
             "yes" if o.reaped else "no", o.command[:50]] for o in reply.orphans]
    text = table(rows, ["agent", "pid", "former_group", "age_s", "found_by", "reaped", "command"])
    for agent, why in reply.unreachable.items():
        text += f"\nagent {agent}: unreachable ({why})"
    emit(args, {"orphans": orphans, "unreachable": dict(reply.unreachable)}, text)
    return EXIT_UNREACHABLE if reply.unreachable else EXIT_OK


async def cmd_watch(stub: Any, args: argparse.Namespace) -> int:
    stream = stub.WatchSession(cpb.WatchSessionRequest(session_id=args.session, initial=True),
                               timeout=args.timeout)
    try:
        async for ev in stream:
            d = {"seq": ev.seq, "kind": ev.kind, **group_dict(ev.group)}
            if args.output == "json":
                print(json.dumps(d), flush=True)
            else:
                extra = f" {d['reason']}" if d.get("reason") else ""
                print(f"{ev.kind:<11} {ev.group.group_id} {d['label'] or '-'} {d['agent']} "
                      f"{d['state']}{extra}", flush=True)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return EXIT_OK
        raise
    return EXIT_OK


async def cmd_keepalive(stub: Any, args: argparse.Namespace) -> int:
    s = await stub.KeepAlive(cpb.KeepAliveRequest(session_id=args.session, ttl_seconds=args.ttl),
                             timeout=args.timeout or 10)
    d = session_dict(s)
    emit(args, d, f"session {s.session_id}: lease {s.ttl_seconds:g} s")
    return EXIT_OK


async def cmd_up(stub: Any, args: argparse.Namespace) -> int:
    plan = args.plan
    if not args.add:
        try:
            existing = await stub.GetSession(cpb.GetSessionRequest(session_id=plan.session),
                                             timeout=args.timeout or 10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        else:
            live = [g for g in existing.groups if g.state in LIVE]
            if live:
                print(f"tether up: session {plan.session!r} already has {len(live)} live "
                      f"group(s); stop it first (`tether stop {plan.session}`) or pass --add "
                      "to start these beside them; nothing was started", file=sys.stderr)
                return EXIT_USAGE
    gate = asyncio.Semaphore(args.parallel)

    async def start(entry: Any) -> tuple[Any, pb.Group | None, str]:
        req = cpb.CoordinatorSpawnRequest(agent=entry.agent, spec=entry.spec)
        timeout = args.timeout or (entry.spec.start_timeout_seconds or 30) + 60
        async with gate:
            try:
                return entry, await stub.Spawn(req, timeout=timeout), ""
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED):
                    raise  # the coordinator, not this group: run_client says what to do
                return entry, None, exc.details() or exc.code().name

    results = await asyncio.gather(*(start(e) for e in plan.groups for _ in range(e.replicas)))
    rows, out, failed = [], [], 0
    for entry, g, error in results:
        label = entry.spec.label or "-"
        if g is None:
            failed += 1
            rows.append(["-", label, "refused", error])
            out.append({"label": label, "state": "refused", "error": error})
            print(f"tether up: {entry.where}: refused: {error}", file=sys.stderr)
            continue
        d = group_dict(g)
        out.append(d)
        if g.state == pb.GROUP_STATE_FAILED:
            failed += 1
            print(f"tether up: {entry.where}: start failed ({d.get('failure', 'unknown')}): "
                  f"{d.get('message', '')}", file=sys.stderr)
            rows.append([g.group_id, label, d["state"], d.get("message", "")])
        else:
            rows.append([g.group_id, label, d["state"], g.agent])
    emit(args, {"session": plan.session, "window": plan.window, "groups": out},
         table(rows, ["group", "label", "state", "agent / message"]))
    return EXIT_UNCLEAN if failed else EXIT_OK
