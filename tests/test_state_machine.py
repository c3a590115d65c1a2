"""Property test of the lifecycle table: only declared transitions happen, ends are final."""

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
                assert before is GroupState.STARTING


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
