"""Protobuf <-> domain translation, at the edge and nowhere else."""

from __future__ import annotations

import collections
from types import MappingProxyType
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from tether.core import trace
from tether.core.audit import AuditEntry
from tether.core.errors import InvalidSpec
from tether.core.model import (
    DEFAULT_LIVE_FAILURES,
    DEFAULT_LIVE_INTERVAL,
    DEFAULT_RESTART_MAX,
    DEFAULT_RESTART_WINDOW,
    DEFAULT_START_TIMEOUT,
    AssignedPort,
    Containment,
    EventKind,
    ExitReason,
    ExitRecord,
    FailureClass,
    GroupEvent,
    GroupSpec,
    GroupState,
    GroupView,
    Limits,
    Liveness,
    OrphanPolicy,
    PortOwner,
    PortRequest,
    PreStop,
    PreStopOutcome,
    PreStopResult,
    Probe,
    RestartMode,
    RestartPolicy,
    RunContext,
    RunRecord,
    StdinMode,
    StopOverride,
    StopPolicy,
    UnhealthyAction,
    parse_signal,
)
from tether.core.output import AttachOpen, LogQuery, OutputChunk, StdinInput, Stream
from tether.core.sessions import (
    AgentInfo,
    AgentState,
    GroupEntry,
    GroupReport,
    GroupSelector,
    LeaseState,
    Orphan,
    Session,
    SessionEvent,
    SessionReport,
    SessionState,
    SessionView,
)
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb

STATE_TO_PB = {s: getattr(pb, f"GROUP_STATE_{s.name}") for s in GroupState}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}
REASON_TO_PB = {r: getattr(pb, f"EXIT_REASON_{r.name}") for r in ExitReason}
REASON_FROM_PB = {v: k for k, v in REASON_TO_PB.items()}
FAILURE_TO_PB = {f: getattr(pb, f"FAILURE_CLASS_{f.name}") for f in FailureClass}
FAILURE_FROM_PB = {v: k for k, v in FAILURE_TO_PB.items()}
CONTAINMENT_TO_PB = {c: getattr(pb, f"CONTAINMENT_{c.name}") for c in Containment}
CONTAINMENT_FROM_PB = {v: k for k, v in CONTAINMENT_TO_PB.items()}
ORPHAN_TO_PB = {o: getattr(pb, f"ORPHAN_POLICY_{o.name}") for o in OrphanPolicy}
ORPHAN_FROM_PB = {v: k for k, v in ORPHAN_TO_PB.items()}
UNHEALTHY_TO_PB = {a: getattr(pb, f"UNHEALTHY_ACTION_{a.name}") for a in UnhealthyAction}
UNHEALTHY_FROM_PB = {v: k for k, v in UNHEALTHY_TO_PB.items()}
RESTART_TO_PB = {m: getattr(pb, f"RESTART_MODE_{m.name}") for m in RestartMode}
RESTART_FROM_PB = {v: k for k, v in RESTART_TO_PB.items()}
STDIN_TO_PB = {m: getattr(pb, f"STDIN_MODE_{m.name}") for m in StdinMode}
STDIN_FROM_PB = {v: k for k, v in STDIN_TO_PB.items()}
STREAM_TO_PB = {s: getattr(pb, f"OUTPUT_STREAM_{s.name}") for s in Stream}
STREAM_FROM_PB = {v: k for k, v in STREAM_TO_PB.items()}


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    if seconds:
        t.FromNanoseconds(int(seconds * 1e9))
    return t


def seconds(t: Timestamp) -> float:
    return float(t.ToNanoseconds()) / 1e9


# ---------------------------------------------------------------- stop policies


def override_from_pb(msg: pb.StopPolicy) -> StopOverride:
    """A partial policy: an empty signal or an unset grace leaves that field alone."""
    grace = msg.grace_seconds if msg.HasField("grace_seconds") else None
    if grace is not None and grace != grace:  # NaN
        raise InvalidSpec("grace is not a number", field="grace")
    return StopOverride(parse_signal(msg.signal) if msg.signal else None, grace)


def override_to_pb(o: StopOverride) -> pb.StopPolicy:
    msg = pb.StopPolicy(signal=o.signal.name if o.signal else "")
    if o.grace is not None:
        msg.grace_seconds = o.grace
    return msg


def policy_from_pb(msg: pb.StopPolicy) -> StopPolicy:
    return override_from_pb(msg).apply(StopPolicy())


# ---------------------------------------------------------------- specs


def spec_from_pb(msg: pb.GroupSpec) -> GroupSpec:
    if msg.orphan_policy not in ORPHAN_FROM_PB:
        raise InvalidSpec(f"orphan policy {msg.orphan_policy} is unknown; use kill or keep",
                          field="orphan_policy")
    probe_timeout = msg.probe_timeout_seconds if msg.HasField("probe_timeout_seconds") else None
    start_timeout = (msg.start_timeout_seconds if msg.HasField("start_timeout_seconds")
                     else DEFAULT_START_TIMEOUT)
    return GroupSpec(
        argv=tuple(msg.argv),
        cwd=msg.cwd,
        env=MappingProxyType(dict(msg.env)),
        inherit_env=msg.inherit_env,
        log_path=msg.log_path,
        ready=Probe.parse(msg.ready, timeout=probe_timeout) if msg.ready else None,
        start_timeout=start_timeout,
        stop=override_from_pb(msg.stop),
        orphan_policy=ORPHAN_FROM_PB[msg.orphan_policy],
        label=msg.label,
        labels=MappingProxyType(dict(msg.labels)),
        session_id=msg.session_id,
        window=msg.window,
        stop_order=msg.stop_order,
        target=msg.target or "local",
        owns_target=msg.owns_target,
        user=msg.user,
        ports=tuple(PortRequest(p.name, p.port) for p in msg.ports),
        limits=limits_from_pb(msg.limits),
        pre_stop=pre_stop_from_pb(msg.pre_stop) if msg.HasField("pre_stop") else None,
        plugins=not msg.no_plugins,
        liveness=_liveness_from_pb(msg),
        restart=_restart_from_pb(msg),
        traceparent=trace.checked(msg.traceparent, "a request's spec"),
        stdin=_stdin_from_pb(msg),
        stop_stdin_grace=(msg.stop_stdin_grace_seconds
                          if msg.HasField("stop_stdin_grace_seconds") else None),
    )


def _stdin_from_pb(msg: pb.GroupSpec) -> StdinMode:
    if msg.stdin not in STDIN_FROM_PB:
        raise InvalidSpec(f"stdin mode {msg.stdin} is unknown; use null or pipe", field="stdin")
    return STDIN_FROM_PB[msg.stdin]


def limits_from_pb(msg: pb.ResourceLimits) -> Limits:
    cpus = msg.cpus if msg.HasField("cpus") else None
    if cpus is not None and cpus != cpus:  # NaN
        raise InvalidSpec("cpus is not a number", field="cpus")
    return Limits(memory=msg.memory_bytes if msg.HasField("memory_bytes") else None,
                  cpus=cpus, pids=msg.pids if msg.HasField("pids") else None)


def limits_to_pb(limits: Limits) -> pb.ResourceLimits:
    msg = pb.ResourceLimits()
    if limits.memory is not None:
        msg.memory_bytes = limits.memory
    if limits.cpus is not None:
        msg.cpus = limits.cpus
    if limits.pids is not None:
        msg.pids = limits.pids
    return msg


def pre_stop_from_pb(msg: pb.PreStopHook) -> PreStop:
    timeout = msg.timeout_seconds if msg.HasField("timeout_seconds") else None
    if timeout is not None and timeout != timeout:
        raise InvalidSpec("pre-stop timeout is not a number", field="pre_stop_timeout")
    return PreStop(tuple(msg.argv), timeout)




def _liveness_from_pb(msg: pb.GroupSpec) -> Liveness | None:
    if msg.on_unhealthy not in UNHEALTHY_FROM_PB:
        raise InvalidSpec(f"on_unhealthy {msg.on_unhealthy} is unknown; use none, restart or "
                          "stop", field="on_unhealthy")
    action = UNHEALTHY_FROM_PB[msg.on_unhealthy]
    if not msg.live:
        given = [name for name in ("live_interval_seconds", "live_timeout_seconds",
                                   "live_failures") if msg.HasField(name)]
        if action is not UnhealthyAction.NONE:
            given.append(f"on_unhealthy {action.value}")
        if given:
            raise InvalidSpec(f"{given[0]} needs a liveness probe: without --live SPEC nothing "
                              "is checked, so nothing can be unhealthy; add --live tcp:PORT, "
                              "http:URL or exec:COMMAND", field="live")
        return None
    timeout = msg.live_timeout_seconds if msg.HasField("live_timeout_seconds") else None
    return Liveness(
        Probe.parse(msg.live, timeout=timeout, field_="live"),
        msg.live_interval_seconds if msg.HasField("live_interval_seconds")
        else DEFAULT_LIVE_INTERVAL,
        msg.live_failures if msg.HasField("live_failures") else DEFAULT_LIVE_FAILURES,
        action)


def _restart_from_pb(msg: pb.GroupSpec) -> RestartPolicy:
    if msg.restart not in RESTART_FROM_PB:
        raise InvalidSpec(f"restart mode {msg.restart} is unknown; use no, on-failure or "
                          "always", field="restart")
    return RestartPolicy(
        RESTART_FROM_PB[msg.restart],
        msg.restart_max if msg.HasField("restart_max") else DEFAULT_RESTART_MAX,
        msg.restart_window_seconds if msg.HasField("restart_window_seconds")
        else DEFAULT_RESTART_WINDOW)


def spec_to_pb(spec: GroupSpec, *, redact: bool = False) -> pb.GroupSpec:
    msg = pb.GroupSpec(
        argv=list(spec.argv), cwd=spec.cwd, env={} if redact else dict(spec.env),
        inherit_env=spec.inherit_env, log_path=spec.log_path,
        ready=str(spec.ready) if spec.ready else "", start_timeout_seconds=spec.start_timeout,
        stop=override_to_pb(spec.stop), orphan_policy=ORPHAN_TO_PB[spec.orphan_policy],
        label=spec.label, labels=dict(spec.labels), session_id=spec.session_id,
        stop_order=spec.stop_order, target=spec.target, window=spec.window,
        owns_target=spec.owns_target, user=spec.user,
        ports=[pb.PortRequest(name=p.name, port=p.port) for p in spec.ports],
        no_plugins=not spec.plugins, stdin=STDIN_TO_PB[spec.stdin],
    )
    if spec.stop_stdin_grace is not None:
        msg.stop_stdin_grace_seconds = spec.stop_stdin_grace
    if spec.ready is not None:
        msg.probe_timeout_seconds = spec.ready.timeout
    if spec.limits:
        msg.limits.CopyFrom(limits_to_pb(spec.limits))
    if spec.pre_stop is not None:
        msg.pre_stop.argv.extend(spec.pre_stop.argv)
        if spec.pre_stop.timeout is not None:
            msg.pre_stop.timeout_seconds = spec.pre_stop.timeout
    live = spec.liveness
    if live is not None:
        msg.live = str(live.probe)
        msg.live_interval_seconds = live.interval
        msg.live_timeout_seconds = live.probe.timeout
        msg.live_failures = live.failures
        msg.on_unhealthy = UNHEALTHY_TO_PB[live.on_unhealthy]
    if spec.restart != RestartPolicy():
        msg.restart = RESTART_TO_PB[spec.restart.mode]
        msg.restart_max = spec.restart.limit
        msg.restart_window_seconds = spec.restart.window
    msg.traceparent = spec.traceparent
    return msg


class _SpecCache:
    """Specs never change, and one group's is encoded on every event: encode each once.
    Keyed by identity; an entry holds its spec, so the id cannot be reused meanwhile."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._entries: collections.OrderedDict[tuple[int, bool],
                                               tuple[GroupSpec, pb.GroupSpec]] = (
            collections.OrderedDict())

    def get(self, spec: GroupSpec, redact: bool) -> pb.GroupSpec:
        key = (id(spec), redact)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is spec:
            self._entries.move_to_end(key)
            return hit[1]
        msg = spec_to_pb(spec, redact=redact)
        self._entries[key] = (spec, msg)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return msg


_specs = _SpecCache()


# ---------------------------------------------------------------- records, views, events


def context_to_pb(c: RunContext) -> pb.RunContext:
    return pb.RunContext(plugin_changes=list(c.plugins), user=c.user, limits=c.limits,
                         ports=[pb.AssignedPort(name=p.name, port=p.port, fixed=p.fixed)
                                for p in c.ports])


def context_from_pb(msg: pb.RunContext) -> RunContext:
    return RunContext(tuple(msg.plugin_changes), msg.user,
                      tuple(AssignedPort(p.name, p.port, p.fixed) for p in msg.ports),
                      msg.limits)


def pre_stop_outcome_to_pb(o: PreStopOutcome) -> pb.PreStopOutcome:
    msg = pb.PreStopOutcome(result=o.result.value, duration_seconds=o.duration,
                            detail=o.detail, leftovers=o.leftovers)
    if o.exit_code is not None:
        msg.exit_code = o.exit_code
    if o.signal is not None:
        msg.signal = o.signal
    return msg


def pre_stop_outcome_from_pb(msg: pb.PreStopOutcome) -> PreStopOutcome:
    try:
        result = PreStopResult(msg.result)
    except ValueError:
        result = PreStopResult.ERROR
    return PreStopOutcome(result, msg.exit_code if msg.HasField("exit_code") else None,
                          msg.signal if msg.HasField("signal") else None,
                          msg.duration_seconds, msg.detail, msg.leftovers)


def exit_to_pb(rec: ExitRecord) -> pb.ExitRecord:
    msg = pb.ExitRecord(
        reason=REASON_TO_PB[rec.reason], survivors=rec.survivors,
        failure=FAILURE_TO_PB[rec.failure] if rec.failure else pb.FAILURE_CLASS_UNSPECIFIED,
        message=rec.message, stop_duration_seconds=rec.stop_duration,
        ended_at=ts(rec.ended_at), detail=rec.detail, clean=rec.clean,
        oom_kills=rec.oom_kills,
    )
    if rec.exit_code is not None:
        msg.exit_code = rec.exit_code
    if rec.signal is not None:
        msg.signal = rec.signal
    if rec.context:
        msg.context.CopyFrom(context_to_pb(rec.context))
    if rec.pre_stop is not None:
        msg.pre_stop.CopyFrom(pre_stop_outcome_to_pb(rec.pre_stop))
    return msg


def exit_from_pb(msg: pb.ExitRecord) -> ExitRecord:
    return ExitRecord(
        reason=REASON_FROM_PB.get(msg.reason, ExitReason.LOST),
        exit_code=msg.exit_code if msg.HasField("exit_code") else None,
        signal=msg.signal if msg.HasField("signal") else None,
        survivors=msg.survivors,
        failure=FAILURE_FROM_PB.get(msg.failure),
        message=msg.message,
        stop_duration=msg.stop_duration_seconds,
        ended_at=seconds(msg.ended_at) if msg.HasField("ended_at") else 0.0,
        detail=msg.detail,
        context=context_from_pb(msg.context),
        pre_stop=pre_stop_outcome_from_pb(msg.pre_stop) if msg.HasField("pre_stop") else None,
        oom_kills=msg.oom_kills,
    )


def group_to_pb(view: GroupView, *, redact: bool = True) -> pb.Group:
    """A view as sent. ``redact`` (the default) leaves environment values out: they go
    back only to the caller that sent them (the Spawn answer)."""
    msg = pb.Group(
        group_id=view.group_id, spec=_specs.get(view.spec, redact),
        state=STATE_TO_PB[view.state], containment=CONTAINMENT_TO_PB[view.containment],
        leader_pid=view.leader_pid, pgid=view.pgid, detached=view.detached,
        started_at=ts(view.started_at), member_count=view.member_count,
        stop=pb.StopPolicy(signal=view.stop.signal.name, grace_seconds=view.stop.grace),
        unreachable=view.unreachable, unhealthy=view.unhealthy, health=view.health,
        restarts=view.restarts, runs=[run_to_pb(r) for r in view.runs],
        stdin_open=view.stdin_open, stdin_writer=view.stdin_writer,
    )
    if view.next_restart_at:
        msg.next_restart_at.CopyFrom(ts(view.next_restart_at))
    if redact and view.spec.env:
        msg.env_names.extend(sorted(view.spec.env))
    if view.context:
        msg.context.CopyFrom(context_to_pb(view.context))
    if view.exit is not None:
        msg.exit.CopyFrom(exit_to_pb(view.exit))
    return msg


def group_from_pb(msg: pb.Group) -> GroupView:
    return GroupView(
        group_id=msg.group_id, spec=spec_from_pb(msg.spec),
        state=STATE_FROM_PB.get(msg.state, GroupState.LOST),
        containment=CONTAINMENT_FROM_PB.get(msg.containment, Containment.PGID),
        stop=policy_from_pb(msg.stop), leader_pid=msg.leader_pid, pgid=msg.pgid,
        detached=msg.detached, unreachable=msg.unreachable,
        exit=exit_from_pb(msg.exit) if msg.HasField("exit") else None,
        started_at=seconds(msg.started_at), member_count=msg.member_count,
        context=context_from_pb(msg.context),
        unhealthy=msg.unhealthy, health=msg.health, restarts=msg.restarts,
        runs=tuple(run_from_pb(r) for r in msg.runs),
        next_restart_at=seconds(msg.next_restart_at) if msg.HasField("next_restart_at")
        else 0.0,
        stdin_open=msg.stdin_open, stdin_writer=msg.stdin_writer,
    )


def run_to_pb(r: RunRecord) -> pb.RunRecord:
    return pb.RunRecord(started_at=ts(r.started_at), exit=exit_to_pb(r.exit),
                        duration_seconds=r.duration)


def run_from_pb(msg: pb.RunRecord) -> RunRecord:
    return RunRecord(seconds(msg.started_at), exit_from_pb(msg.exit))


def event_to_pb(event: GroupEvent, epoch: str = "") -> pb.GroupEvent:
    return pb.GroupEvent(seq=event.seq, kind=event.kind.value, group=group_to_pb(event.group),
                         at=ts(event.at), epoch=epoch)


def event_from_pb(msg: pb.GroupEvent) -> GroupEvent:
    try:
        kind = EventKind(msg.kind)
    except ValueError:
        kind = EventKind.STATE
    return GroupEvent(msg.seq, kind, group_from_pb(msg.group), seconds(msg.at))


# ---------------------------------------------------------------- sessions (coordinator)


SESSION_STATE_TO_PB = {SessionState.ACTIVE: cpb.SESSION_STATE_ACTIVE,
                       SessionState.STOPPING: cpb.SESSION_STATE_STOPPING,
                       SessionState.STOPPED: cpb.SESSION_STATE_STOPPED}
SESSION_STATE_FROM_PB = {v: k for k, v in SESSION_STATE_TO_PB.items()}


def _shown_state(state: GroupState, unreachable: bool) -> Any:
    return pb.GROUP_STATE_UNREACHABLE if unreachable and not state.ended else STATE_TO_PB[state]


def entry_to_pb(e: GroupEntry) -> pb.Group:
    msg = group_to_pb(e.view)
    msg.agent = e.agent
    msg.state = _shown_state(e.state, e.unreachable)
    return msg


def entry_from_pb(msg: pb.Group) -> GroupEntry:
    unreachable = msg.state == pb.GROUP_STATE_UNREACHABLE
    if unreachable:  # shown so by the coordinator; the group itself lives on
        msg = _copy_with_state(msg, pb.GROUP_STATE_RUNNING)
    view = group_from_pb(msg)
    return GroupEntry(msg.agent, view, unreachable or view.unreachable)


def _copy_with_state(msg: pb.Group, state: int) -> pb.Group:
    copy = pb.Group()
    copy.CopyFrom(msg)
    copy.state = state  # type: ignore[assignment]
    return copy


def session_to_pb(v: SessionView) -> cpb.Session:
    s = v.session
    msg = cpb.Session(session_id=s.session_id, window=s.window, labels=s.labels,
                      state=SESSION_STATE_TO_PB[s.state], ttl_seconds=s.ttl,
                      stop_cause=s.stop_cause, created_at=ts(s.created_at),
                      groups=[entry_to_pb(e) for e in v.groups], group_count=v.group_count,
                      live_count=v.live_count, lease_grace_seconds=s.lease_grace,
                      lease_held=v.lease_held)
    if s.lease_expires_at:
        msg.lease_expires_at.CopyFrom(ts(s.lease_expires_at))
    if s.stopped_at:
        msg.stopped_at.CopyFrom(ts(s.stopped_at))
    return msg


def session_from_pb(msg: cpb.Session) -> SessionView:
    s = Session(msg.session_id, msg.window, dict(msg.labels),
                SESSION_STATE_FROM_PB.get(msg.state, SessionState.ACTIVE), msg.ttl_seconds,
                seconds(msg.lease_expires_at) if msg.HasField("lease_expires_at") else 0.0,
                msg.stop_cause, seconds(msg.created_at), seconds(msg.stopped_at),
                msg.lease_grace_seconds)
    return SessionView(s, tuple(entry_from_pb(g) for g in msg.groups), msg.group_count,
                       msg.live_count, msg.lease_held)


def lease_state_to_pb(st: LeaseState) -> cpb.LeaseState:
    return cpb.LeaseState(
        session_id=st.session_id,
        status=cpb.LEASE_STATUS_HELD if st.held else cpb.LEASE_STATUS_ENDED,
        resume_token=st.resume_token, lease_grace_seconds=st.grace,
        renew_interval_seconds=st.renew_interval, renew_timeout_seconds=st.renew_timeout,
        resumed=st.resumed, renewals=st.renewals, stop_cause=st.stop_cause)


def lease_state_from_pb(msg: cpb.LeaseState) -> LeaseState:
    return LeaseState(msg.session_id, msg.status == cpb.LEASE_STATUS_HELD, msg.resume_token,
                      msg.lease_grace_seconds, msg.renew_interval_seconds,
                      msg.renew_timeout_seconds, msg.resumed, msg.renewals, msg.stop_cause)


def report_to_pb(r: SessionReport) -> cpb.SessionReport:
    groups = []
    for g in r.groups:
        msg = cpb.GroupReport(group_id=g.group_id, label=g.label, agent=g.agent,
                              target=g.target, state=_shown_state(g.state, g.unreachable),
                              error=g.error,
                              members_signalled=g.members_signalled, stop_order=g.stop_order,
                              attempts=g.attempts, restarts=g.restarts,
                              traceparent=g.traceparent)
        if g.exit is not None:
            msg.exit.CopyFrom(exit_to_pb(g.exit))
        groups.append(msg)
    return cpb.SessionReport(session_id=r.session_id, groups=groups, complete=r.complete,
                             stop_cause=r.stop_cause)


def report_from_pb(msg: cpb.SessionReport) -> SessionReport:
    return SessionReport(msg.session_id, tuple(
        GroupReport(g.group_id, g.label, g.agent, g.target,
                    STATE_FROM_PB.get(g.state, GroupState.RUNNING),
                    exit_from_pb(g.exit) if g.HasField("exit") else None, g.error,
                    g.members_signalled, g.stop_order, g.attempts,
                    g.state == pb.GROUP_STATE_UNREACHABLE, g.restarts, g.traceparent)
        for g in msg.groups), msg.complete, msg.stop_cause)


def agent_to_pb(a: AgentState) -> cpb.Agent:
    i = a.info
    return cpb.Agent(name=i.name, address=i.address, containment=CONTAINMENT_TO_PB[i.containment],
                     version=i.version, epoch=i.epoch, instance=i.instance,
                     state=cpb.AGENT_STATE_UP if a.up else cpb.AGENT_STATE_UNREACHABLE,
                     last_seen=ts(i.last_seen))


def agent_from_pb(msg: cpb.Agent) -> AgentState:
    info = AgentInfo(msg.name, msg.address, CONTAINMENT_FROM_PB.get(msg.containment,
                                                                    Containment.PGID),
                     msg.version, msg.epoch, seconds(msg.last_seen), msg.instance)
    return AgentState(info, msg.state == cpb.AGENT_STATE_UP)


def session_event_to_pb(e: SessionEvent, epoch: str = "") -> cpb.SessionEvent:
    msg = cpb.SessionEvent(seq=e.seq, kind=e.kind.value, at=ts(e.at), epoch=epoch,
                           session_id=e.session_id)
    if e.group is not None:
        msg.group.CopyFrom(entry_to_pb(e.group))
    if e.report is not None:
        msg.report.CopyFrom(report_to_pb(e.report))
    return msg


def session_event_from_pb(msg: cpb.SessionEvent) -> SessionEvent:
    try:
        kind = EventKind(msg.kind)
    except ValueError:
        kind = EventKind.STATE
    group = entry_from_pb(msg.group) if msg.HasField("group") else None
    report = report_from_pb(msg.report) if msg.HasField("report") else None
    session = msg.session_id or (group.view.spec.session_id if group is not None else "")
    return SessionEvent(msg.seq, kind, group, seconds(msg.at), msg.epoch, report, session)


def selector_to_pb(sel: GroupSelector) -> cpb.GroupSelector:
    return cpb.GroupSelector(group_ids=list(sel.group_ids), labels=list(sel.labels))


def selector_from_pb(msg: cpb.GroupSelector) -> GroupSelector:
    return GroupSelector(tuple(msg.group_ids), tuple(msg.labels))


def orphan_to_pb(o: Orphan) -> pb.Orphan:
    return pb.Orphan(pid=o.pid, command=o.command, former_group=o.former_group,
                     age_seconds=o.age, found_by=o.found_by, agent=o.agent, reaped=o.reaped)


def orphan_from_pb(msg: pb.Orphan) -> Orphan:
    return Orphan(msg.pid, msg.command, msg.former_group, msg.age_seconds, msg.found_by,
                  msg.reaped, agent=msg.agent)


def audit_event_to_pb(e: AuditEntry) -> cpb.AuditEvent:
    return cpb.AuditEvent(time=ts(e.time), method=e.method, role=e.role,
                          credential=e.credential, proof=e.proof, peer=e.peer, result=e.result,
                          message=e.message, session_id=e.session, group_id=e.group,
                          agent=e.agent, details=dict(e.details))


def audit_event_from_pb(msg: cpb.AuditEvent) -> AuditEntry:
    return AuditEntry(seconds(msg.time), msg.method, msg.role, msg.credential, msg.result,
                      msg.proof, msg.peer, msg.message, msg.session_id, msg.group_id, msg.agent,
                      dict(msg.details))


def port_owner_to_pb(o: PortOwner) -> pb.PortOwner:
    return pb.PortOwner(port=o.port, address=o.address, pid=o.pid, user=o.user,
                        command=o.command, group_id=o.group_id, session_id=o.session_id,
                        label=o.label, name=o.name, listening=o.listening, agent=o.agent)


def port_owner_from_pb(msg: pb.PortOwner) -> PortOwner:
    return PortOwner(msg.port, msg.address, msg.pid, msg.user, msg.command, msg.group_id,
                     msg.session_id, msg.label, msg.name, msg.listening, msg.agent)


# ---------------------------------------------------------------- output


def chunk_to_pb(c: OutputChunk) -> pb.OutputChunk:
    msg = pb.OutputChunk(group_id=c.group_id, stream=STREAM_TO_PB[c.stream], data=c.data,
                         at=ts(c.at), run=c.run, dropped=c.dropped, event=c.event,
                         offset=c.offset, seq=c.seq, session_id=c.session_id, label=c.label,
                         agent=c.agent)
    return msg


def chunk_from_pb(msg: pb.OutputChunk) -> OutputChunk:
    return OutputChunk(msg.group_id, STREAM_FROM_PB.get(msg.stream, Stream.TETHER), msg.data,
                       seconds(msg.at), msg.run, msg.offset, msg.seq, msg.dropped, msg.event,
                       msg.session_id, msg.label, msg.agent)


def query_from_pb(msg: pb.LogsRequest) -> LogQuery:
    """A Logs request as a query (validated: negative tails, bad times and NUL ids are
    refused here, naming the field)."""
    from tether.core.model import check_group_id, check_name

    for gid in msg.group_ids:
        check_group_id(gid)
    if msg.session_id:
        check_name(msg.session_id, "session")
    since = seconds(msg.since) if msg.HasField("since") else 0.0
    return LogQuery(tuple(dict.fromkeys(msg.group_ids)), msg.session_id,
                    msg.tail_lines if msg.HasField("tail_lines") else None, since, msg.follow)


def query_to_pb(q: LogQuery) -> pb.LogsRequest:
    msg = pb.LogsRequest(group_ids=list(q.group_ids), session_id=q.session_id,
                         follow=q.follow)
    if q.tail is not None:
        msg.tail_lines = q.tail
    if q.since:
        msg.since.CopyFrom(ts(q.since))
    return msg


MAX_WHO = 256


def attach_open_from_pb(msg: pb.AttachRequest, who: str) -> AttachOpen:
    """The first Attach message (ids checked: NUL or malformed ids are refused here)."""
    from tether.core.model import check_group_id, check_name

    check_group_id(msg.group_id)
    if msg.session_id:
        check_name(msg.session_id, "session")
    who = "".join(ch if ch.isprintable() else "?" for ch in who)[:MAX_WHO]
    return AttachOpen(msg.group_id, msg.session_id, msg.write,
                      msg.tail_lines if msg.HasField("tail_lines") else None,
                      msg.close_stdin_on_detach, who)


def attach_open_to_pb(o: AttachOpen) -> pb.AttachRequest:
    msg = pb.AttachRequest(group_id=o.group_id, session_id=o.session_id, write=o.write,
                           close_stdin_on_detach=o.close_on_detach, on_behalf_of=o.who)
    if o.tail is not None:
        msg.tail_lines = o.tail
    return msg


def stdin_from_pb(msg: pb.AttachRequest) -> StdinInput:
    return StdinInput(msg.stdin, msg.close_stdin)


def stdin_to_pb(i: StdinInput) -> pb.AttachRequest:
    return pb.AttachRequest(stdin=i.data, close_stdin=i.close)
