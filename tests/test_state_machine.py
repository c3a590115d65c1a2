"""Property test of the lifecycle table: only declared transitions happen, ends are final,
and a restart is a state of its own (never "ended, then running again")."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tether.core.model import (
    ENDED_STATES,
    TRANSITIONS,
    GroupState,
    IllegalTransition,
    Transition,
    next_state,
)


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = GroupState.STARTING
        self.history = [self.state]

    @rule(event=st.sampled_from(Transition))
    def apply(self, event: Transition) -> None:
        allowed = (self.state, event) in TRANSITIONS
        try:
            new = next_state(self.state, event)
        except IllegalTransition as exc:
            assert not allowed
            assert exc.state is self.state
            assert exc.event is event
            return
        assert allowed
        assert new is TRANSITIONS[(self.state, event)]
        self.state = new
        self.history.append(new)

    @invariant()
    def ended_states_are_final(self) -> None:
        seen_end = False
        for s in self.history:
            if seen_end:
                raise AssertionError(f"left an ended state: {self.history}")
            seen_end = s in ENDED_STATES

    @invariant()
    def stopped_only_through_stopping(self) -> None:
        for before, after in zip(self.history, self.history[1:], strict=False):
            if after is GroupState.STOPPED:
                assert before is GroupState.STOPPING
            if after is GroupState.FAILED:
                # A start failed, or restarting gave up (limit reached).
                assert before in (GroupState.STARTING, GroupState.RUNNING,
                                  GroupState.RESTARTING)
            if after is GroupState.RESTARTING:
                assert before is GroupState.RUNNING, "only a run that ended restarts"
            if before is GroupState.RESTARTING:
                assert after in (GroupState.RUNNING, GroupState.STOPPING, GroupState.FAILED)


TestLifecycle = Lifecycle.TestCase


def test_every_state_can_reach_an_end() -> None:
    for start in GroupState:
        frontier, seen = [start], {start}
        while frontier:
            s = frontier.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is s and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert seen & ENDED_STATES, f"{start} can never end"


def test_every_live_state_can_be_stopped() -> None:
    """Guarantee 2: whatever a group is doing (starting, running, restarting), a stop
    request has a transition, so no state exists from which a group cannot be ended."""
    for state in GroupState:
        if not state.ended and state is not GroupState.STOPPING:
            assert (state, Transition.STOP) in TRANSITIONS, state
