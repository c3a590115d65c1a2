"""The coordinator's records as table rows, for every store (SQLite, PostgreSQL).

One column order per table, the same in both stores; each store writes its own SQL
around these tuples. Groups keep the agent's view as a protobuf ``Group`` (the agent's
own words, with environment values: a coordinator that takes over must be able to
start a group again); events keep what watchers are sent (environment values left out).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from tether.coordinator.model import TrackedGroup
from tether.coordinator.store import SpawnIntent
from tether.core.errors import InvalidSpec
from tether.core.model import Containment, check_name
from tether.core.sessions import (
    AgentInfo,
    Session,
    SessionEvent,
    SessionState,
    StopIntent,
    check_lease_grace,
    check_ttl,
)
from tether.rpc.convert import group_from_pb, group_to_pb, session_event_from_pb, session_event_to_pb
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb

AGENT_COLUMNS = ("name", "address", "containment", "version", "epoch", "last_seen", "instance",
                 "credential")
SESSION_COLUMNS = ("session_id", "window", "labels", "state", "ttl", "lease_expires_at",
                   "stop_cause", "created_at", "stopped_at", "lease_grace", "lease_token")
GROUP_COLUMNS = ("agent", "group_id", "session_id", "idempotency_key", "group_pb", "error",
                 "fingerprint", "attempts")
INTENT_COLUMNS = ("session_id", "grace", "cause", "created_at")
SPAWN_COLUMNS = ("group_id", "agent", "session_id", "idempotency_key", "fingerprint",
                 "stop_order", "created_at")
EVENT_COLUMNS = ("seq", "session_id", "event_pb")

_CONTAINMENT_NUM = {Containment.CGROUP: 1, Containment.SUBREAPER: 2, Containment.PGID: 3}
_CONTAINMENT_BY_NUM = {v: k for k, v in _CONTAINMENT_NUM.items()}

Row = tuple[Any, ...]

log = logging.getLogger(__name__)


def agent_row(a: AgentInfo) -> Row:
    return (a.name, a.address, _CONTAINMENT_NUM[a.containment], a.version, a.epoch,
            a.last_seen, a.instance, a.credential)


def agent_of(r: Sequence[Any]) -> AgentInfo:
    return AgentInfo(r[0], r[1], _CONTAINMENT_BY_NUM.get(r[2], Containment.PGID), r[3], r[4],
                     r[5], r[6], r[7])


def session_row(s: Session) -> Row:
    return (s.session_id, s.window, json.dumps(s.labels), s.state.value, s.ttl,
            s.lease_expires_at, s.stop_cause, s.created_at, s.stopped_at, s.lease_grace,
            s.lease_token)


def session_of(r: Sequence[Any]) -> Session:
    """A session from its row. A field that fails its check (a row an older version stored
    unchecked, or edited by hand) is reported and repaired, never fatal: one bad row must
    not keep the coordinator from starting."""
    sid, window, ttl, grace = r[0], r[1], r[4], r[9]
    if not _valid(sid, "window", "cleared", lambda: check_name(window, "window",
                                                                allow_empty=True)):
        window = ""
    if not _valid(sid, "ttl", "set to none", lambda: check_ttl(ttl)):
        ttl = 0.0
    if grace and not _valid(sid, "lease grace", "set to none",
                            lambda: check_lease_grace(grace)):
        grace = 0.0
    labels = _labels(sid, r[2])
    return Session(r[0], window, labels, SessionState(r[3]), ttl, r[5], r[6], r[7],
                   r[8], grace, r[10])


def _valid(session_id: str, what: str, repair: str, check: Callable[[], object]) -> bool:
    try:
        check()
    except InvalidSpec as exc:
        log.error("stored session %r: its %s is invalid (%s); %s", session_id, what, exc, repair)
        return False
    return True


def _labels(session_id: str, text: str) -> dict[str, str]:
    try:
        labels = json.loads(text)
        if not isinstance(labels, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        log.error("stored session %r: its labels are unreadable (%s); dropped", session_id, exc)
        return {}
    good: dict[str, str] = {}
    for key, value in labels.items():
        try:
            check_name(key, "label name")
            if not isinstance(value, str):
                raise InvalidSpec(f"label {key!r} is not text", field="labels")
            good[key] = check_name(value, f"label {key!r}", allow_empty=True)
        except InvalidSpec as exc:
            log.error("stored session %r: label %r is invalid (%s); dropped", session_id,
                      key, exc)
    return good


def group_row(t: TrackedGroup) -> Row:
    msg = group_to_pb(t.view, redact=False)
    msg.agent = t.agent
    return (t.agent, t.group_id, t.session_id, t.idempotency_key, msg.SerializeToString(),
            t.error, t.fingerprint, t.attempts)


def group_of(r: Sequence[Any]) -> TrackedGroup:
    """From (agent, idempotency_key, group_pb, error, fingerprint, attempts)."""
    msg = pb.Group()
    msg.ParseFromString(bytes(r[2]))
    return TrackedGroup(r[0], group_from_pb(msg), r[1], r[4], r[3], r[5])


def intent_row(i: StopIntent) -> Row:
    return (i.session_id, i.grace, i.cause, i.created_at)


def intent_of(r: Sequence[Any]) -> StopIntent:
    return StopIntent(r[0], r[1], r[2], r[3])


def spawn_row(s: SpawnIntent) -> Row:
    return (s.group_id, s.agent, s.session_id, s.idempotency_key, s.fingerprint, s.stop_order,
            s.created_at)


def spawn_of(r: Sequence[Any]) -> SpawnIntent:
    return SpawnIntent(r[0], r[1], r[2], r[3], r[4], r[5], r[6])


def event_row(e: SessionEvent, lineage: str) -> Row:
    session = e.session_id or (e.group.view.spec.session_id if e.group is not None else "")
    return (e.seq, session, session_event_to_pb(e, lineage).SerializeToString())


def event_of(blob: bytes) -> SessionEvent:
    # A SessionEvent; rows written before session events existed hold a GroupEvent, whose
    # fields 1-5 are the same on the wire.
    msg = cpb.SessionEvent()
    msg.ParseFromString(bytes(blob))
    return session_event_from_pb(msg)


def placeholders(columns: Sequence[str], mark: str) -> str:
    return ", ".join([mark] * len(columns))
