"""Coordinator metrics: agents and sessions read at scrape time, stops and fan-out counted."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tether.coordinator.core import Coordinator, CoordinatorHooks


class CoordinatorCollector(Collector):
    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator

    def collect(self) -> Iterable[Metric]:
        agents = GaugeMetricFamily("tether_agents", "Registered agents by state.",
                                   labels=["state"])
        up = sum(1 for link in self._c.agents.values() if self._c.agent_up(link))
        agents.add_metric(["up"], up)
        agents.add_metric(["unreachable"], len(self._c.agents) - up)
        yield agents
        sessions = GaugeMetricFamily("tether_sessions", "Sessions by state.", labels=["state"])
        tally = Tally(s.state for s in self._c.sessions.values())
        for state in ("active", "stopping", "stopped"):
            sessions.add_metric([state], tally.get(state, 0))
        yield sessions


class CoordinatorMetrics(CoordinatorHooks):
    def __init__(self, registry: CollectorRegistry) -> None:
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

    def attach(self, coordinator: Coordinator) -> None:
        self.registry.register(CoordinatorCollector(coordinator))

    def session_stopped(self, result: str) -> None:
        self.stops.labels(result).inc()

    def fanout(self, operation: str, seconds: float) -> None:
        self.fanout_seconds.labels(operation).observe(seconds)
