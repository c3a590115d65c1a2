"""Coordinator metrics: agents and sessions read at scrape time, stops and fan-out counted."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tether.coordinator.core import Coordinator, CoordinatorHooks
from tether.core.model import GroupState
from tether.core.sessions import SessionState
from tether.rpc.ops import iso


class CoordinatorCollector(Collector):
    """Reads the coordinator that serves now (none while a standby: the leader counts)."""

    def __init__(self, coordinator: Callable[[], Coordinator | None]) -> None:
        self._current = coordinator

    def collect(self) -> Iterable[Metric]:
        c = self._current()
        if c is None:
            return
        agents = GaugeMetricFamily("tether_agents", "Registered agents by state.",
                                   labels=["state"])
        states = c.agents.states()
        up = sum(1 for a in states if a.up)
        agents.add_metric(["up"], up)
        agents.add_metric(["unreachable"], len(states) - up)
        yield agents
        sessions = GaugeMetricFamily("tether_sessions", "Sessions by state.", labels=["state"])
        tally = Tally(s.state for s in c.sessions.all())
        for state in SessionState:
            sessions.add_metric([state.value], tally.get(state, 0))
        yield sessions


@dataclass(frozen=True)
class LastStop:
    """The latest session stop, for /status."""

    at: float
    result: str
    seconds: float


class CoordinatorMetrics(CoordinatorHooks):
    """``state_write_errors``: under `tether serve` the agent's counter (one registry, one
    metric; the ``store`` label tells them apart)."""

    def __init__(self, registry: CollectorRegistry,
                 state_write_errors: Counter | None = None) -> None:
        self.registry = registry
        self.stops = Counter("tether_session_stops", "Session stops by result: clean (every "
                             "group ended with zero survivors) or unclean.", ["result"],
                             registry=registry)
        for r in ("clean", "unclean"):
            self.stops.labels(r)
        self.fanout_seconds = Histogram(
            "tether_fanout_duration_seconds", "Fan-out of a lifecycle command to every agent "
            "of a session, request to last answer.", ["operation"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry)
        self.state_write_errors = state_write_errors or state_write_counter(registry)
        self.last_stop: LastStop | None = None

    def attach(self, coordinator: Coordinator | Callable[[], Coordinator | None]) -> None:
        current = coordinator if callable(coordinator) else (lambda: coordinator)
        self.registry.register(CoordinatorCollector(current))

    def session_stopped(self, result: str, session_id: str = "", seconds: float = 0.0
                        ) -> None:
        self.stops.labels(result).inc()
        self.last_stop = LastStop(time.time(), result, seconds)

    def fanout(self, operation: str, seconds: float) -> None:
        self.fanout_seconds.labels(operation).observe(seconds)

    def state_write_error(self) -> None:
        self.state_write_errors.labels("coordinator").inc()


def state_write_counter(registry: CollectorRegistry) -> Counter:
    return Counter("tether_state_write_errors", "Failed writes of a state store (disk full, "
                   "I/O error, database down), by store; the changes are kept and retried.",
                   ["store"], registry=registry)


def coordinator_status(c: Coordinator, metrics: CoordinatorMetrics) -> dict[str, Any]:
    """The coordinator's /status (called on the event loop): sessions and groups by state
    as `tether show` shows them (``unreachable`` for live groups out of reach), unhealthy
    groups (id and what the last check saw), agents up and unreachable, the last session
    stop. Nothing a credential would be needed for (see ``agent_status``): no session,
    label or agent name, no address."""
    states = c.agents.states()
    entries = [c.entry(t) for t in c.groups.values()]
    groups = Tally("unreachable" if e.unreachable and not e.state.ended else e.state.value
                   for e in entries)
    sessions = Tally(s.state.value for s in c.sessions.all())
    last = metrics.last_stop
    return {
        "sessions": {s.value: sessions.get(s.value, 0) for s in SessionState},
        "groups": {name: groups.get(name, 0) for name in GROUP_STATES},
        "unhealthy": [{"group_id": e.view.group_id, "health": e.view.health}
                      for e in entries if e.view.unhealthy and not e.state.ended],
        "agents": {"up": sum(1 for a in states if a.up),
                   "unreachable": sum(1 for a in states if not a.up)},
        "last_cleanup": None if last is None else {
            "at": iso(last.at), "result": last.result,
            "duration_ms": round(last.seconds * 1000, 1)},
    }


#: Group states as clients see them: the model's, and ``unreachable``.
GROUP_STATES = [*(s.value for s in GroupState), "unreachable"]
