"""Prometheus metrics of the agent. Registry injected; state read at scrape time.

Names are a contract (README, deploy/prometheus/rules.yml):

* ``tether_groups{state,containment}`` gauge, read from the registry at scrape time
* ``tether_cleanups_total{result}``: success | forced | failed | timeout
* ``tether_cleanup_duration_seconds`` histogram
* ``tether_orphans`` gauge, ``tether_orphans_detected_total``, ``tether_orphans_reaped_total``
* ``tether_signals_total{signaller,signal,result}``
* ``tether_start_failures_total{reason}``
* ``tether_state_write_errors_total``: failed writes of the state file (each retried)
* ``tether_oom_kills_total``: processes the kernel's OOM killer ended in groups
* ``tether_pre_stop_hooks_total{result}``: ok | failed | timeout | error | skipped
* ``tether_plugin_failures_total{plugin}``: toolchain plugins that failed on a spec
* ``tether_restarts_total{reason}``: exited | failed | unhealthy | requested | start_failed
* ``tether_unhealthy_groups`` gauge (read at scrape time), ``tether_unhealthy_total``
"""

from __future__ import annotations

import time
from collections import Counter as TallyCounter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tether.agent.authority import Authority
from tether.agent.hooks import Hooks
from tether.core.model import Containment, FailureClass, GroupState, GroupView
from tether.rpc.ops import iso

CLEANUP_RESULTS = ("success", "forced", "failed", "timeout")
RESTART_REASONS = ("exited", "failed", "unhealthy", "requested", "start_failed")
#: LOST is the coordinator's word, never an agent state.
AGENT_STATES = [s for s in GroupState if s is not GroupState.LOST]


class GroupsCollector(Collector):
    """Reads group states from the authority when Prometheus scrapes."""

    def __init__(self, authority: Authority, orphans_now: Callable[[], int]) -> None:
        self._authority = authority
        self._orphans_now = orphans_now

    def collect(self) -> Iterable[Metric]:
        tally: TallyCounter[tuple[str, str]] = TallyCounter(
            (g.state.value, g.containment.value) for g in self._authority.groups()
        )
        family = GaugeMetricFamily("tether_groups", "Groups known to this agent, by state and "
                                   "containment.", labels=["state", "containment"])
        for state in AGENT_STATES:
            for containment in Containment:
                family.add_metric([state.value, containment.value],
                                  tally.get((state.value, containment.value), 0))
        yield family
        yield GaugeMetricFamily("tether_unhealthy_groups", "Running groups whose liveness "
                                "probe failed --live-failures times in a row.",
                                value=sum(1 for g in self._authority.groups()
                                          if g.unhealthy and not g.state.ended))
        yield GaugeMetricFamily("tether_orphans", "Orphans detected now: processes with the "
                                "tether marker or in a tether cgroup that belong to no live group.",
                                value=self._orphans_now())


@dataclass(frozen=True)
class LastCleanup:
    """The latest group stop, for /status."""

    at: float
    result: str
    seconds: float


class AgentMetrics(Hooks):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.cleanups = Counter("tether_cleanups", "Group stops by result: success (ended within "
                                "grace), forced (needed SIGKILL), failed (survivors remained), "
                                "timeout.", ["result"], registry=registry)
        for r in CLEANUP_RESULTS:
            self.cleanups.labels(r)
        self.cleanup_duration = Histogram(
            "tether_cleanup_duration_seconds", "Stop request to empty containment.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry)
        self.signals = Counter("tether_signals", "Signals sent to groups.",
                               ["signaller", "signal", "result"], registry=registry)
        self.start_failures = Counter("tether_start_failures", "Failed starts by class.",
                                      ["reason"], registry=registry)
        for f in FailureClass:
            self.start_failures.labels(f.value)
        self.orphans_detected = Counter("tether_orphans_detected",
                                        "Orphans found (each process counted once).",
                                        registry=registry)
        self.orphans_reaped = Counter("tether_orphans_reaped", "Orphans killed by the agent.",
                                      registry=registry)
        self.state_write_errors = Counter(
            "tether_state_write_errors", "Failed writes of a state store (disk full, I/O error, "
            "database down), by store; the changes are kept and retried.", ["store"],
            registry=registry)
        self.state_write_errors.labels("agent")
        self.oom_kills_total = Counter(
            "tether_oom_kills", "Processes of groups the kernel's OOM killer ended at their "
            "memory limit (--memory), counted when the group ends.", registry=registry)
        self.pre_stop_hooks = Counter(
            "tether_pre_stop_hooks", "Pre-stop hooks run by stops, by result: ok, failed, "
            "timeout (its tree was killed), error (could not start), skipped (the group had "
            "ended), exited (ended where exit codes are not reported).", ["result"],
            registry=registry)
        for r in ("ok", "failed", "timeout", "error", "skipped", "exited"):
            self.pre_stop_hooks.labels(r)
        self.plugin_failures = Counter(
            "tether_plugin_failures", "Toolchain plugins that failed or timed out on a spec "
            "(the spec went on without them), by plugin.", ["plugin"], registry=registry)
        self.restarts = Counter("tether_restarts", "New runs of groups after a run ended, by "
                                "why: exited (code 0, --restart always), failed, unhealthy "
                                "(--on-unhealthy restart), requested (tether restart), "
                                "start_failed (the previous restart did not become ready).",
                                ["reason"], registry=registry)
        for r in RESTART_REASONS:
            self.restarts.labels(r)
        self.unhealthy = Counter("tether_unhealthy", "Times a group became unhealthy (its "
                                 "liveness probe failed --live-failures times in a row).",
                                 registry=registry)
        self._orphans_now = 0
        self.last_cleanup: LastCleanup | None = None

    def attach(self, authority: Authority) -> None:
        self.registry.register(GroupsCollector(authority, lambda: self._orphans_now))

    def set_orphans_now(self, n: int) -> None:
        self._orphans_now = n

    @property
    def orphans_now(self) -> int:
        return self._orphans_now

    # Hooks
    def cleanup(self, result: str, seconds: float) -> None:
        self.cleanups.labels(result).inc()
        self.cleanup_duration.observe(seconds)
        self.last_cleanup = LastCleanup(time.time(), result, seconds)

    def restarted(self, reason: str) -> None:
        self.restarts.labels(reason).inc()

    def became_unhealthy(self) -> None:
        self.unhealthy.inc()

    def signal_sent(self, signaller: str, sig: str, result: str) -> None:
        self.signals.labels(signaller, sig, result).inc()

    def start_failure(self, failure: str) -> None:
        self.start_failures.labels(failure).inc()

    def group_changed(self, view: GroupView) -> None:
        pass

    def oom_kills(self, count: int) -> None:
        self.oom_kills_total.inc(count)

    def pre_stop(self, result: str) -> None:
        self.pre_stop_hooks.labels(result).inc()

    def plugin_failure(self, plugin: str) -> None:
        self.plugin_failures.labels(plugin).inc()


def agent_status(authority: Authority, metrics: AgentMetrics) -> dict[str, Any]:
    """The agent's part of /status (called on the event loop): groups by state, the
    unhealthy ones (id and what the last check saw), orphans now, the last cleanup.

    /status answers anyone who reaches the metrics listener, without a credential, so it
    holds counts, states, group ids, times and check details (``Probe.shown``: no URL
    user, password or query) only: no agent, session or label name, no address, argv or
    environment. Those are for credentials (``tether show``, ``tether agents``)."""
    tally = TallyCounter(g.state.value for g in authority.groups())
    unhealthy = [{"group_id": g.group_id, "health": g.health}
                 for g in authority.groups() if g.unhealthy and not g.state.ended]
    last = metrics.last_cleanup
    return {
        "groups": {s.value: tally.get(s.value, 0) for s in AGENT_STATES},
        "unhealthy": unhealthy,
        "orphans": metrics.orphans_now,
        "last_cleanup": None if last is None else {
            "at": iso(last.at), "result": last.result,
            "duration_ms": round(last.seconds * 1000, 1)},
    }

