"""Protobuf <-> domain translation, at the edge and nowhere else."""

from __future__ import annotations

from types import MappingProxyType
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from tether.agent.authority import GroupEvent, GroupView
from tether.agent.errors import InvalidSpec
from tether.agent.model import (
    DEFAULT_START_TIMEOUT,
    Containment,
    ExitReason,
    ExitRecord,
    FailureClass,
    GroupSpec,
    GroupState,
    OrphanPolicy,
    Probe,
    StopPolicy,
    parse_signal,
)
from tether.v1 import common_pb2 as pb

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


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    if seconds:
        t.FromNanoseconds(int(seconds * 1e9))
    return t


def stop_policy_from_pb(msg: pb.StopPolicy, default_grace: float | None = None) -> StopPolicy:
    sig = parse_signal(msg.signal) if msg.signal else StopPolicy().signal
    if msg.HasField("grace_seconds"):
        grace = msg.grace_seconds
    else:
        grace = StopPolicy().grace if default_grace is None else default_grace
    if grace != grace:  # NaN
        raise InvalidSpec("grace is not a number", field="grace")
    return StopPolicy(signal=sig, grace=grace)


def spec_from_pb(msg: pb.GroupSpec) -> GroupSpec:
    if msg.orphan_policy not in ORPHAN_FROM_PB:
        raise InvalidSpec(f"orphan policy {msg.orphan_policy} is unknown; use kill or keep",
                          field="orphan_policy")
    probe_timeout = msg.probe_timeout_seconds if msg.HasField("probe_timeout_seconds") else None
    start_timeout = (msg.start_timeout_seconds if msg.HasField("start_timeout_seconds")
                     else DEFAULT_START_TIMEOUT)
    if start_timeout != start_timeout:
        raise InvalidSpec("start timeout is not a number", field="start_timeout")
    return GroupSpec(
        argv=tuple(msg.argv),
        cwd=msg.cwd,
        env=MappingProxyType(dict(msg.env)),
        inherit_env=msg.inherit_env,
        log_path=msg.log_path,
        ready=Probe.parse(msg.ready, timeout=probe_timeout) if msg.ready else None,
        start_timeout=start_timeout,
        stop=stop_policy_from_pb(msg.stop),
        orphan_policy=ORPHAN_FROM_PB[msg.orphan_policy],
        label=msg.label,
        labels=MappingProxyType(dict(msg.labels)),
        session_id=msg.session_id,
        window=msg.window,
        stop_order=msg.stop_order,
        target=msg.target or "local",
        owns_target=msg.owns_target,
    )


def spec_to_pb(spec: GroupSpec) -> pb.GroupSpec:
    msg = pb.GroupSpec(
        argv=list(spec.argv), cwd=spec.cwd, env=dict(spec.env), inherit_env=spec.inherit_env,
        log_path=spec.log_path, ready=str(spec.ready) if spec.ready else "",
        start_timeout_seconds=spec.start_timeout,
        stop=pb.StopPolicy(signal=spec.stop.signal.name, grace_seconds=spec.stop.grace),
        orphan_policy=ORPHAN_TO_PB[spec.orphan_policy], label=spec.label,
        labels=dict(spec.labels), session_id=spec.session_id, stop_order=spec.stop_order,
        target=spec.target, window=spec.window, owns_target=spec.owns_target,
    )
    if spec.ready is not None:
        msg.probe_timeout_seconds = spec.ready.timeout
    return msg


def exit_to_pb(rec: ExitRecord) -> pb.ExitRecord:
    msg = pb.ExitRecord(
        reason=REASON_TO_PB[rec.reason], survivors=rec.survivors,
        failure=FAILURE_TO_PB[rec.failure] if rec.failure else pb.FAILURE_CLASS_UNSPECIFIED,
        message=rec.message, stop_duration_seconds=rec.stop_duration,
        ended_at=ts(rec.ended_at), detail=rec.detail,
    )
    if rec.exit_code is not None:
        msg.exit_code = rec.exit_code
    if rec.signal is not None:
        msg.signal = rec.signal
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
        ended_at=msg.ended_at.ToNanoseconds() / 1e9 if msg.HasField("ended_at") else 0.0,
        detail=msg.detail,
    )


def _spec_pb(view: GroupView) -> pb.GroupSpec:
    cached = view.encoded.get("pb")
    if cached is None:
        cached = view.encoded["pb"] = spec_to_pb(view.spec)
    return cast(pb.GroupSpec, cached)


def group_to_pb(view: GroupView) -> pb.Group:
    msg = pb.Group(
        group_id=view.group_id, spec=_spec_pb(view), state=STATE_TO_PB[view.state],
        containment=CONTAINMENT_TO_PB[view.containment], leader_pid=view.leader_pid,
        pgid=view.pgid, detached=view.detached, started_at=ts(view.started_at),
        member_count=view.member_count,
    )
    if view.exit is not None:
        msg.exit.CopyFrom(exit_to_pb(view.exit))
    return msg


def event_to_pb(event: GroupEvent) -> pb.GroupEvent:
    return pb.GroupEvent(seq=event.seq, kind=event.kind, group=group_to_pb(event.group),
                         at=ts(event.at))
