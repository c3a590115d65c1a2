"""The coordinator's Wait, in process: what a caller that goes away leaves behind."""

from __future__ import annotations

import asyncio
import contextlib

from tether.coordinator.core import Coordinator, CoordinatorConfig
from tether.coordinator.model import TrackedGroup
from tether.coordinator.sqlite_store import SQLiteStore
from tether.core.model import (
    Containment,
    ExitReason,
    ExitRecord,
    GroupSpec,
    GroupState,
    GroupView,
)


def running(session: str) -> GroupView:
    return GroupView("g-0123456789ab", GroupSpec(argv=("sleep", "1"), session_id=session),
                     GroupState.RUNNING, Containment.CGROUP)


async def test_wait_answers_when_the_last_group_ends_and_a_gone_caller_leaves_nothing() -> None:
    c = Coordinator(CoordinatorConfig(), SQLiteStore(":memory:"))
    await c.load()
    try:
        c.sessions.create("s")
        view = running("s")
        c.track(TrackedGroup("a1", view))  # as a spawn of ours to a1 leaves it
        gone = asyncio.ensure_future(c.wait_idle("s", None))
        waiting = asyncio.ensure_future(c.wait_idle("s", None))
        await asyncio.sleep(0)  # both are registered now
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        assert not waiting.done()
        c.absorb("a1", view.with_state(GroupState.EXITED, ExitRecord(ExitReason.NATURAL, 0)))
        report = await asyncio.wait_for(waiting, 5)
        assert report.complete and [g.state for g in report.groups] == [GroupState.EXITED]
        assert c._idle_waiters == {}, "neither caller left a waiter behind"
        again = await c.wait_idle("s", 0.01)
        assert again.complete, "a session with no live group is done at once"
    finally:
        await c.close()
        await c.store.close()
