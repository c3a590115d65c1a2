"""What the authority reports as it works: metrics, persistence. All no-ops here.

The authority calls these synchronously on the event loop; an implementation that
does I/O (the state file) queues it and does it elsewhere. ``durable`` is the one
awaitable: it returns once every change reported so far is stored, so a spawn is
acknowledged only after its record is on disk.
"""

from __future__ import annotations

from tether.core.model import GroupView


class Hooks:
    def cleanup(self, result: str, seconds: float) -> None:
        """A stop ended: ``result`` is success, forced, failed or timeout."""

    def signal_sent(self, signaller: str, sig: str, result: str) -> None:
        """A signal went out (result: sent, already_gone, error)."""

    def start_failure(self, failure: str) -> None:
        """A start failed with this class."""

    def group_changed(self, view: GroupView) -> None:
        """A group changed state (called once per change, in order)."""

    def group_forgotten(self, group_id: str) -> None:
        """An ended group left the agent's memory (retention)."""

    def oom_kills(self, count: int) -> None:
        """A group ended after the kernel's OOM killer ended ``count`` of its members."""

    def pre_stop(self, result: str) -> None:
        """A pre-stop hook ran (result: ok, failed, timeout, error, skipped)."""

    def plugin_failure(self, plugin: str) -> None:
        """A toolchain plugin failed (or timed out); the spec went on without it."""

    def restarted(self, reason: str) -> None:
        """A new run of a group is starting (reason: exited, failed, unhealthy, requested,
        start_failed)."""

    def became_unhealthy(self) -> None:
        """A group's liveness probe failed its limit of checks in a row."""

    async def durable(self, timeout: float) -> None:
        """Return once every change reported so far is stored; raise ``StateUnwritable``
        if that did not happen within ``timeout`` seconds."""


class HookChain(Hooks):
    """Several hooks as one (metrics + persistence + orphan trigger)."""

    def __init__(self, *hooks: Hooks) -> None:
        self.hooks = hooks

    def cleanup(self, result: str, seconds: float) -> None:
        for h in self.hooks:
            h.cleanup(result, seconds)

    def signal_sent(self, signaller: str, sig: str, result: str) -> None:
        for h in self.hooks:
            h.signal_sent(signaller, sig, result)

    def start_failure(self, failure: str) -> None:
        for h in self.hooks:
            h.start_failure(failure)

    def group_changed(self, view: GroupView) -> None:
        for h in self.hooks:
            h.group_changed(view)

    def group_forgotten(self, group_id: str) -> None:
        for h in self.hooks:
            h.group_forgotten(group_id)

    def oom_kills(self, count: int) -> None:
        for h in self.hooks:
            h.oom_kills(count)

    def pre_stop(self, result: str) -> None:
        for h in self.hooks:
            h.pre_stop(result)

    def plugin_failure(self, plugin: str) -> None:
        for h in self.hooks:
            h.plugin_failure(plugin)

    def restarted(self, reason: str) -> None:
        for h in self.hooks:
            h.restarted(reason)

    def became_unhealthy(self) -> None:
        for h in self.hooks:
            h.became_unhealthy()

    async def durable(self, timeout: float) -> None:
        for h in self.hooks:
            await h.durable(timeout)
