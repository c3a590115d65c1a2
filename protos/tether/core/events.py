"""Publish/subscribe for watch streams, with one overflow rule and resumable sequences.

Both the agent (``Watch``) and the coordinator (``WatchSession``) publish events
to any number of subscribers. The rule is the same everywhere:

* Each subscriber has a bounded queue. One that falls ``limit`` events behind
  is dropped, and its stream ends with ``WatchOverflow`` (never silently, never
  by blocking the publisher). The client reconnects and resumes.
* Every event has a sequence number. The broadcaster keeps the last
  ``history`` events, so a subscriber that reconnects with ``since`` gets what
  it missed, exactly once, in order; if those events are no longer kept,
  ``subscribe`` says so (``resumed=False``) and the caller sends a fresh
  snapshot instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tether.core.errors import TetherError

DEFAULT_LIMIT = 10000
DEFAULT_HISTORY = 10000


class Sequenced(Protocol):
    """Anything with a sequence number can be broadcast."""

    @property
    def seq(self) -> int: ...


E = TypeVar("E", bound=Sequenced)


class WatchOverflow(TetherError):
    """A subscriber fell too far behind and was dropped; it resumes after ``last_seq``."""
    def __init__(self, limit: int, last_seq: int) -> None:
        super().__init__(f"watch stream fell more than {limit} events behind and was ended; "
                         f"reconnect and resume after sequence {last_seq}")
        self.last_seq = last_seq


_END = object()
_OVERFLOW = object()


@dataclass(eq=False)
class _Subscriber(Generic[E]):
    accept: Callable[[E], bool]
    limit: int
    queue: collections.deque[object] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_seq: int = 0


class Broadcaster(Generic[E]):
    """Fans events out to subscribers; see the module docstring for the rules."""

    def __init__(self, limit: int = DEFAULT_LIMIT, history: int = DEFAULT_HISTORY) -> None:
        self.limit = limit
        self._subs: list[_Subscriber[E]] = []
        self._history: collections.deque[E] = collections.deque(maxlen=history)
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    @property
    def watched(self) -> bool:
        """True when somebody listens (publishers may skip building events otherwise)."""
        return bool(self._subs)

    def publish(self, event: E, *, keep: bool = True) -> None:
        if keep:
            self._history.append(event)
        for sub in list(self._subs):
            if not sub.accept(event):
                continue
            if len(sub.queue) >= sub.limit:
                self._subs.remove(sub)
                sub.queue.clear()
                sub.queue.append(_OVERFLOW)
            else:
                sub.queue.append(event)
            sub.wake.set()

    def seed(self, history: Iterable[E], seq: int) -> None:
        """Start from events published elsewhere (a previous leader's, from the store)."""
        self._history.extend(history)
        self.seq = max(self.seq, seq)

    def missed(self, since: int) -> list[E] | None:
        """Kept events after ``since``, or None if some of them are no longer kept."""
        if since >= self.seq:
            return []
        if not self._history or self._history[0].seq > since + 1:
            return None
        return [e for e in self._history if e.seq > since]

    def close(self) -> None:
        """End every stream (shutdown)."""
        for sub in self._subs:
            sub.queue.append(_END)
            sub.wake.set()
        self._subs.clear()

    def subscribe(self, accept: Callable[[E], bool], first: Iterable[E] = ()
                  ) -> AsyncIterator[E]:
        """``first`` (a snapshot, or the missed events), then every accepted event as it is
        published. The subscriber is registered before this returns, so no event published
        after the snapshot was taken can fall between the two."""
        sub: _Subscriber[E] = _Subscriber(accept, self.limit)
        self._subs.append(sub)
        return self._stream(sub, list(first))

    async def _stream(self, sub: _Subscriber[E], first: list[E]) -> AsyncIterator[E]:
        try:
            for head in first:
                sub.last_seq = max(sub.last_seq, head.seq)
                yield head
            while True:
                while not sub.queue:
                    sub.wake.clear()
                    await sub.wake.wait()
                item = sub.queue.popleft()
                if item is _END:
                    return
                if item is _OVERFLOW:
                    raise WatchOverflow(self.limit, sub.last_seq)
                event: E = item  # type: ignore[assignment]
                if event.seq <= sub.last_seq:
                    continue  # already sent as part of ``first``
                sub.last_seq = event.seq
                yield event
        finally:
            with contextlib.suppress(ValueError):
                self._subs.remove(sub)
