"""Sessions: creation, leases, listing in pages, and how long stopped ones are kept.

A session may carry a lease: a TTL its owner renews (``KeepAlive``), or a stream
lease (``OpenLease``, ``leases.py``) that holds while its stream does and for its
grace after. The lease loop sleeps until the earliest expiry (woken early when a
lease changes) and stops an expired session with cause ``lease_expired`` (TTL) or
``lease_lost`` (stream). The coordinator's own downtime never counts against a
lease its owner held: on load, every active TTL lease gets at least a fresh TTL, and
every stream lease that a stream held when the coordinator went away (stored expiry 0)
its whole grace (at least ``RECONNECT_ALLOWANCE``; no stream survives a restart or a
failover, the owner reconnects with its resume token). A stream lease whose stream was
already gone keeps its stored expiry, extended by at most ``RECONNECT_ALLOWANCE`` (not
stored, so restarts do not add up): a client gone for good is not kept alive by
restarts.

Stopped sessions and their groups' records are kept ``retain_stopped`` seconds
(at most ``retain_max_stopped`` of them), then dropped from memory and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tether.core.errors import Conflict, InvalidSpec, SessionNotFound
from tether.core.sessions import (
    Session,
    SessionState,
    SessionView,
    check_ttl,
    check_window_labels,
)

if TYPE_CHECKING:
    from tether.coordinator.core import Coordinator

log = logging.getLogger(__name__)

PRUNE_EVERY = 60.0
#: Seconds a restarted coordinator gives a stream lease's owner to reconnect, at least.
RECONNECT_ALLOWANCE = 5.0
MAX_PAGE = 1000


class Sessions:
    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self._sessions: dict[str, Session] = {}
        self._lease_changed = asyncio.Event()
        #: Sessions a spawn created and nothing else claimed since (by name): the only
        #: ones a refused spawn may take back (``undo``).
        self._provisional: dict[str, tuple[Session, Session | None]] = {}
        #: When each released stream lease's grace runs out, on ``time.monotonic()`` (a
        #: duration must not move with the wall clock); ``lease_expires_at`` keeps the
        #: wall-clock time, for storage and display only.
        self._grace_ends: dict[str, float] = {}

    def load(self, sessions: Iterable[Session]) -> None:
        now = time.time()
        for s in sessions:
            if s.state is SessionState.ACTIVE and s.ttl and s.lease_expires_at != now + s.ttl:
                # Our downtime is not the owner's silence: a fresh TTL before expiring. And
                # never more: a lease ending later than that was written by a coordinator
                # whose clock runs ahead of ours (wall-clock stamps), re-based on ours.
                s.lease_expires_at = now + s.ttl
                self.c.save_session(s)
            elif s.state is SessionState.ACTIVE and s.lease_grace and not s.lease_expires_at:
                # Held when the previous process went: its stream died with it, and the
                # grace runs from now. Stored: a second restart does not give it again.
                s.lease_expires_at = now + max(s.lease_grace, RECONNECT_ALLOWANCE)
                self.c.save_session(s)
            elif s.state is SessionState.ACTIVE and s.lease_grace:
                # Its stream was gone already: its grace ran on; a short allowance to
                # reconnect, at most, and in memory only. Never more than a whole grace
                # from now: the stored time is another host's clock (it may run ahead).
                s.lease_expires_at = min(s.lease_expires_at, now + s.lease_grace)
                s.lease_expires_at = max(s.lease_expires_at, min(
                    now + RECONNECT_ALLOWANCE, s.lease_expires_at + RECONNECT_ALLOWANCE))
            if s.state is SessionState.ACTIVE and s.lease_grace:
                # The stored wall-clock expiry, converted once.
                self._grace_ends[s.session_id] = time.monotonic() + s.lease_expires_at - now
            self._sessions[s.session_id] = s

    def start(self) -> None:
        self.c.tasks.spawn(self._lease_loop(), "leases")
        self.c.tasks.spawn(self._prune_loop(), "prune")

    # ------------------------------------------------------------ queries

    def has(self, session_id: str) -> bool:
        return session_id in self._sessions

    def find(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def get(self, session_id: str) -> Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise SessionNotFound(session_id)
        return s

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def view(self, s: Session, with_groups: bool = True) -> SessionView:
        groups = self.c.session_groups(s.session_id)
        entries = tuple(self.c.entry(t) for t in groups) if with_groups else ()
        return SessionView(s, entries, len(groups), sum(1 for t in groups if not t.ended),
                           self.c.leases.held(s.session_id))

    def page(self, include_stopped: bool, size: int, token: str, with_groups: bool
             ) -> tuple[list[SessionView], str]:
        """Sessions in creation order, ``size`` at a time; ``token`` is where the previous
        page ended (empty: from the start). Returns the page and the next token."""
        if size < 0 or size > MAX_PAGE:
            raise InvalidSpec(f"page size {size} is out of range (0 to {MAX_PAGE}; 0 means "
                              "the default)", field="page_size")
        size = size or 100
        ordered = sorted((s for s in self._sessions.values()
                          if include_stopped or s.state is not SessionState.STOPPED),
                         key=_order)
        if token:
            ordered = [s for s in ordered if _order(s) > _parse_token(token)]
        out = ordered[:size]
        next_token = _token(out[-1]) if len(ordered) > size else ""
        return [self.view(s, with_groups) for s in out], next_token

    # ------------------------------------------------------------ changes

    def create(self, session_id: str, window: str = "", labels: dict[str, str] | None = None,
               ttl: float = 0.0, explicit: bool = False) -> tuple[Session, Session | None]:
        """The active session ``session_id`` (created, or a new run of a stopped one).
        Returns it and what it replaced (None: nothing; the session itself: it existed), to
        undo a creation that led nowhere.

        A session stopped because its lease expired is started again only ``explicit``ly
        (CreateSession): its owner is gone, and a spawn it sent before it died may still
        arrive; that must not start processes nobody holds a lease on."""
        check_ttl(ttl)
        check_window_labels(window, labels)  # stored for an existing session too
        previous = self._sessions.get(session_id)
        s = previous
        if s is not None and s.state is SessionState.STOPPED and not explicit \
                and s.stop_cause in ("lease_expired", "lease_lost"):
            raise Conflict(
                f"session {session_id!r} was stopped because its lease "
                f"{'expired' if s.stop_cause == 'lease_expired' else 'was lost'} (its owner "
                "stopped renewing it); a late spawn does not start it again. Start a new run "
                "explicitly (CreateSession, OpenLease, SDK create_session or window) or use "
                "another session name")
        if s is None or s.state is SessionState.STOPPED:
            # A stopped session's name may be reused: a new run of the same workspace.
            s = Session(session_id, window, dict(labels or {}))
        if ttl and s.lease_grace:
            raise Conflict(f"session {session_id!r} has a stream lease (OpenLease); a TTL "
                           "would replace its grace: it is renewed through its stream, not "
                           "with a TTL (CreateSession --ttl, KeepAlive)")
        if ttl:
            s.renew(ttl)
            self._lease_changed.set()
        if window and not s.window:
            s.window = window
        self._sessions[session_id] = s
        if explicit or ttl:
            self._provisional.pop(session_id, None)  # claimed: no undo takes it back
        elif s is not previous:
            self._provisional[session_id] = (s, previous)
        self.c.save_session(s)
        return s, previous

    def undo(self, s: Session, previous: Session | None) -> None:
        """A spawn that created ``s`` was refused outright: put back what was there.
        Only a session that spawn created and nothing claimed since: not one that existed,
        was created explicitly (CreateSession, OpenLease: a window may hold it), kept
        alive, or leased meanwhile, nor one a concurrent spawn put something in."""
        entry = self._provisional.get(s.session_id)
        if entry is None or entry[0] is not s:
            return
        if self._sessions.get(s.session_id) is not s or self.c.session_groups(s.session_id) \
                or s.state is not SessionState.ACTIVE or s.ttl or s.lease_grace \
                or self.c.leases.held(s.session_id):
            self._provisional.pop(s.session_id, None)  # it is in use: never taken back
            return
        if self.c.inflight.get(s.session_id):
            return  # a concurrent spawn rides on it: the last one to be refused undoes it
        del self._provisional[s.session_id]
        previous = entry[1]  # what was there before the spawn that created it
        if previous is None:
            del self._sessions[s.session_id]
            self.c.persist.put(("session", s.session_id), None)
        else:
            self._sessions[s.session_id] = previous
            self.c.save_session(previous)
        if s.ttl:
            self._lease_changed.set()

    def keepalive(self, session_id: str, ttl: float) -> Session:
        s = self.get(session_id)
        check_ttl(ttl, allow_zero=False)
        if s.state is not SessionState.ACTIVE:
            raise Conflict(f"session {session_id!r} is {s.state.value}; a stopped session "
                           "cannot be kept alive, start a new one")
        if s.lease_grace:
            raise Conflict(f"session {session_id!r} has a stream lease (OpenLease); it is "
                           "renewed through its stream, not with KeepAlive")
        self._provisional.pop(session_id, None)
        s.renew(ttl)
        self.c.save_session(s)
        self._lease_changed.set()
        return s

    def set_state(self, s: Session, state: SessionState, cause: str = "") -> None:
        s.state = state
        if cause:
            s.stop_cause = cause
        if state is SessionState.STOPPED:
            s.stopped_at = time.time()
        self.c.save_session(s)
        self._lease_changed.set()
        if state is not SessionState.ACTIVE:
            self._grace_ends.pop(s.session_id, None)
            self.c.leases.session_ended(s)

    def lease_changed(self) -> None:
        """Wake the lease loop: an expiry moved earlier."""
        self._lease_changed.set()

    def grace_starts(self, s: Session) -> None:
        """A stream lease's stream is gone: its grace runs from now (monotonic)."""
        s.lease_expires_at = time.time() + s.lease_grace
        self._grace_ends[s.session_id] = time.monotonic() + s.lease_grace
        self._lease_changed.set()

    def held_again(self, s: Session) -> None:
        """A stream holds the lease: no expiry (stored so, see ``load``)."""
        s.lease_expires_at = 0.0
        self._grace_ends.pop(s.session_id, None)

    def _left(self, s: Session, now: float, mono: float) -> float:
        """Seconds until ``s``'s lease expires: a stream lease's grace on the monotonic
        clock, a TTL on the wall clock (its expiry is the owner's promise, in time)."""
        if s.lease_grace:
            ends = self._grace_ends.get(s.session_id)
            if ends is None:  # (not released through grace_starts: from its wall time)
                ends = self._grace_ends[s.session_id] = mono + s.lease_expires_at - now
            return ends - mono
        return s.lease_expires_at - now

    # ------------------------------------------------------------ background

    async def _lease_loop(self) -> None:
        """Sleep until the earliest lease expires (woken early when a lease changes)."""
        while True:
            self._lease_changed.clear()
            now, mono = time.time(), time.monotonic()
            leased = [s for s in self._sessions.values()
                      if s.state is SessionState.ACTIVE and (s.ttl > 0 or s.lease_grace > 0)
                      and not self.c.leases.held(s.session_id)]  # (ended by its watchdog)
            left = {s.session_id: self._left(s, now, mono) for s in leased}
            for s in leased:
                if left[s.session_id] > 0:
                    continue
                if s.lease_grace:
                    log.warning("session %r: its lease stream was lost and not taken back "
                                "within its grace of %g s; stopping it", s.session_id,
                                s.lease_grace)
                    self.c.fanout.begin_stop(s.session_id, None, "lease_lost")
                else:
                    log.warning("session %r: lease of %g s expired without keepalive; "
                                "stopping it", s.session_id, s.ttl)
                    self.c.fanout.begin_stop(s.session_id, None, "lease_expired")
            pending = [t for t in left.values() if t > 0]
            timeout = min(pending) if pending else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._lease_changed.wait()

    async def _prune_loop(self) -> None:
        every = min(PRUNE_EVERY, max(0.5, self.c.config.retain_stopped / 4))
        while True:
            await asyncio.sleep(every)
            self.prune()

    def prune(self, now: float | None = None) -> int:
        """Drop stopped sessions past retention (and beyond the cap, oldest first)."""
        now = time.time() if now is None else now
        cfg = self.c.config
        stopped = sorted((s for s in self._sessions.values()
                          if s.state is SessionState.STOPPED), key=lambda s: s.stopped_at)
        excess = max(0, len(stopped) - cfg.retain_max_stopped)
        dropped = 0
        for n, s in enumerate(stopped):
            if n >= excess and now - s.stopped_at < cfg.retain_stopped:
                break
            for t in self.c.session_groups(s.session_id):
                self.c.forget(t)
            self.c.drop_session_index(s.session_id)
            del self._sessions[s.session_id]
            self._provisional.pop(s.session_id, None)
            self.c.persist.put(("session", s.session_id), None)
            dropped += 1
        if dropped:
            log.info("dropped %d stopped session(s) past retention", dropped)
        return dropped


def _order(s: Session) -> tuple[float, str]:
    return (s.created_at, s.session_id)


def _token(s: Session) -> str:
    return f"{s.created_at!r}|{s.session_id}"


def _parse_token(token: str) -> tuple[float, str]:
    at, _, sid = token.partition("|")
    try:
        return float(at), sid
    except ValueError:
        raise InvalidSpec(f"page token {token!r} is not one this coordinator gave out",
                          field="page_token") from None
