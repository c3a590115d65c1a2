"""Stream leases: a session that lives as long as its client's connection (``OpenLease``).

A client opens a lease on a session with the first message of a stream and renews it
with each later one. While a stream holds the lease the session cannot expire (its
``lease_expires_at`` is 0, stored so: a restarted coordinator knows it was held). When
the stream ends, or its renewals stop for ``renew_timeout`` seconds (a client that
stalls, a network cut), the holder is released and the session's grace starts
(``lease_expires_at`` = then + grace); the lease loop in ``sessions.py`` stops the
session with cause ``lease_lost`` when the grace runs out. A client that comes back
within the grace with the resume token it was given takes the lease back (an editor
window that reloads); one lease has one holder at a time, so a second stream with the
token takes the lease over from the first (whose connection may not be known dead
yet), and a stream without the token is refused.

The resume token is 256 random bits; only its SHA-256 is kept (and stored, so a
restarted coordinator or the next leader honours it), compared in constant time.
The number of lease streams is bounded per credential and in all. Nothing here
imports gRPC: the service (``service.py``) drives a ``Holder`` from its stream.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether.core.errors import (
    Conflict,
    InvalidSpec,
    PermissionDenied,
    ResourceExhausted,
    SessionNotFound,
)
from tether.core.model import check_name
from tether.core.sessions import (
    DEFAULT_LEASE_GRACE,
    LeaseState,
    Session,
    SessionState,
    check_lease_grace,
)

if TYPE_CHECKING:
    from tether.coordinator.core import Coordinator

log = logging.getLogger(__name__)

#: How long a new stream may take to send its opening message.
OPEN_WITHIN = 10.0
#: Streams one credential may have open past its limit, each waiting to show a resume
#: token that takes back a held lease (a reconnecting window whose old stream is not
#: known dead yet).
PAST_LIMIT = 1
#: Renewal cadence, from the grace: a quarter of it, between these bounds; a stream
#: silent for ``RENEW_TIMEOUT_FACTOR`` intervals counts as lost.
RENEW_INTERVAL_MIN = 0.2
RENEW_INTERVAL_MAX = 2.0
RENEW_TIMEOUT_FACTOR = 3.0


def renew_interval(grace: float) -> float:
    return min(RENEW_INTERVAL_MAX, max(RENEW_INTERVAL_MIN, grace / 4))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


#: Why a holder's stream ends (``Holder.why``).
TAKEN_OVER = "taken_over"
STOPPED = "stopped"
CLOSING = "closing"
TIMED_OUT = "timed_out"
#: The client ended its stream (or its connection went away).
GONE = "stream_ended"


@dataclass(eq=False)
class Holder:
    """One stream holding one session's lease."""

    session_id: str
    credential: str
    grace: float
    interval: float
    timeout: float
    resumed: bool = False
    renewals: int = 0
    #: Set when the stream must end; ``why`` says why (see the reasons above).
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    why: str = ""
    #: The stream's task, and whether it is writing an answer right now (a client that
    #: stops reading leaves it blocked there: the watchdog cancels it).
    task: asyncio.Task[Any] | None = None
    writing: bool = False
    _watchdog: asyncio.TimerHandle | None = None

    def end(self, why: str) -> None:
        if not self.why:
            self.why = why
        self.ended.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class Leases:
    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self._holders: dict[str, Holder] = {}
        #: Open lease streams (counted from their first byte), per credential.
        self._streams: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------ queries

    def held(self, session_id: str) -> bool:
        return session_id in self._holders

    @property
    def streams(self) -> int:
        return sum(self._streams.values())

    # ------------------------------------------------------------ streams

    def admit(self, credential: str) -> bool:
        """Count a new lease stream, or refuse it past the limit of all streams. Returns
        whether it is within its credential's limit: one past it is let through only to
        take back a held lease with its token (``may_exceed``; it replaces a stream of
        that lease, whose connection may not be known dead yet), else ``too_many``."""
        cfg = self.c.config
        if self.streams >= cfg.max_lease_streams:
            raise ResourceExhausted(
                f"this coordinator has {self.streams} lease streams open, its limit; retry "
                "later, or use TTL leases (KeepAlive) for clients that need no stream")
        within = self._streams[credential] < cfg.max_lease_streams_per_credential
        if self._streams[credential] >= cfg.max_lease_streams_per_credential + PAST_LIMIT:
            # Past its limit a credential has one stream waiting to show a resume token,
            # no more: silent streams must not take all the coordinator's places.
            raise self.too_many(credential, counted=False)
        self._streams[credential] += 1
        return within

    def too_many(self, credential: str, counted: bool = True) -> ResourceExhausted:
        cfg = self.c.config
        n = self._streams[credential] - counted  # not counting the stream refused
        return ResourceExhausted(
            f"this credential ({credential}) already has {n} lease streams open, the most "
            f"one credential may hold (--max-lease-streams "
            f"{cfg.max_lease_streams_per_credential}); close some, or hold several sessions' "
            "processes in one session's windows")

    def may_exceed(self, session_id: str, token: str) -> bool:
        """A stream past its credential's limit that takes back a lease a stream holds,
        with its token: the held stream ends, so the count comes back within limits."""
        s = self.c.sessions.find(session_id)
        return bool(token) and session_id in self._holders and s is not None \
            and bool(s.lease_token) and len(token) <= 256 \
            and hmac.compare_digest(token_hash(token), s.lease_token)

    def leave(self, credential: str) -> None:
        self._streams[credential] -= 1
        if self._streams[credential] <= 0:
            del self._streams[credential]

    def open(self, session_id: str, *, window: str = "", labels: dict[str, str] | None = None,
             grace: float | None = None, token: str = "", credential: str = ""
             ) -> tuple[Holder, LeaseState]:
        """Open (or, with ``token``, take back) the lease on ``session_id`` for a stream.
        Returns its holder and the first answer (with the token for a new lease)."""
        check_name(session_id, "session")
        if grace is not None:
            check_lease_grace(grace)
        if len(token) > 256:
            raise InvalidSpec("the resume token is longer than any this coordinator gives "
                              "out", field="resume_token")
        s = self.c.sessions.find(session_id)
        new_token = ""
        if token:
            s = self._resumable(session_id, s, token)
            if grace is not None:
                s.lease_grace = grace
            resumed = True
        else:
            if s is not None and s.state is SessionState.ACTIVE and s.lease_grace:
                raise Conflict(
                    f"session {session_id!r} already has a stream lease, held by another "
                    "client or waiting out its grace for that client to come back; give "
                    "its resume token to take it over, or use another session name")
            if s is not None and s.state is SessionState.STOPPING:
                raise Conflict(f"session {session_id!r} is stopping; open the lease once it "
                               "has stopped (a new run), or use another session name")
            if s is not None and s.state is SessionState.ACTIVE and not s.ttl and (
                    any(not t.ended for t in self.c.session_groups(session_id))
                    or self.c.inflight.get(session_id)):
                raise Conflict(
                    f"session {session_id!r} is in use (processes, no lease): a window would "
                    "make them live only as long as this client. Use another session name; "
                    "or, to hand them to a window, give the session a TTL lease first "
                    f"(`tether keepalive {session_id} --ttl SECONDS`, KeepAlive) and open the "
                    "window then")
            s, _ = self.c.sessions.create(session_id, window, labels, explicit=True)
            s.ttl = 0.0  # a TTL lease becomes this stream lease
            s.lease_grace = DEFAULT_LEASE_GRACE if grace is None else grace
            new_token = secrets.token_urlsafe(32)
            s.lease_token = token_hash(new_token)
            resumed = False
        interval = renew_interval(s.lease_grace)
        holder = Holder(session_id, credential, s.lease_grace, interval,
                        interval * RENEW_TIMEOUT_FACTOR, resumed)
        previous = self._holders.get(session_id)
        if previous is not None:
            log.warning("session %r: its lease is taken over by a new stream with its resume "
                        "token (%s); ending the previous stream (%s)", session_id, credential,
                        previous.credential)
            previous.end(TAKEN_OVER)
        self._holders[session_id] = holder
        self.renew(holder)
        self.c.save_session(s)
        log.info("session %r: lease %s by a stream (%s), grace %g s, renewals every %g s",
                 session_id, "taken back" if resumed else "opened", credential, s.lease_grace,
                 interval)
        return holder, self.state(holder, new_token)

    def _resumable(self, session_id: str, s: Session | None, token: str) -> Session:
        if s is None:
            raise SessionNotFound(session_id)
        if not s.lease_token or not hmac.compare_digest(token_hash(token), s.lease_token):
            raise PermissionDenied(
                f"the resume token does not match the lease of session {session_id!r}; only "
                "the stream that opened the lease was given it (open a new lease without a "
                "token on another session name)")
        if s.state is not SessionState.ACTIVE:
            raise Conflict(f"session {session_id!r} is {s.state.value} ({s.stop_cause}): its "
                           "lease is over and cannot be taken back; open a new one")
        return s

    def state(self, holder: Holder, token: str = "") -> LeaseState:
        s = self.c.sessions.find(holder.session_id)
        held = self._holders.get(holder.session_id) is holder and s is not None \
            and s.state is SessionState.ACTIVE
        return LeaseState(holder.session_id, held, token, holder.grace, holder.interval,
                          holder.timeout, holder.resumed, holder.renewals,
                          s.stop_cause if s is not None and not held else "")

    def renew(self, holder: Holder) -> None:
        """A renewal (or the opening): the stream is alive for another ``timeout``."""
        if self._holders.get(holder.session_id) is not holder:
            return
        s = self.c.sessions.find(holder.session_id)
        if s is None:
            return
        # Held: no expiry (a held lease ends only through its watchdog), and so stored:
        # a coordinator that restarts knows the lease was held and gives the whole grace.
        self.c.sessions.held_again(s)
        if holder._watchdog is not None:
            holder._watchdog.cancel()
        holder._watchdog = asyncio.get_running_loop().call_later(
            holder.timeout, self._silent, holder)

    def _silent(self, holder: Holder) -> None:
        holder._watchdog = None
        if holder.why:
            return
        log.warning("session %r: no lease renewal within %g s; its grace of %g s starts now",
                    holder.session_id, holder.timeout, holder.grace)
        holder.end(TIMED_OUT)
        self.release(holder)
        if holder.writing and holder.task is not None:
            holder.task.cancel()  # blocked writing to a client that stopped reading

    def release(self, holder: Holder) -> None:
        """The stream ended (or went silent): the session's grace starts."""
        holder.end(holder.why or GONE)
        if self._holders.get(holder.session_id) is not holder:
            return
        del self._holders[holder.session_id]
        s = self.c.sessions.find(holder.session_id)
        if s is None or s.state is not SessionState.ACTIVE:
            return
        self.c.sessions.grace_starts(s)  # measured on the monotonic clock
        self.c.save_session(s)
        log.info("session %r: lease stream gone (%s); stopping the session in %g s unless "
                 "its owner takes the lease back", holder.session_id, holder.why,
                 s.lease_grace)

    def session_ended(self, s: Session) -> None:
        """The session is stopping (or stopped): its stream is told, and ends."""
        holder = self._holders.pop(s.session_id, None)
        if holder is not None:
            holder.end(STOPPED)

    def close(self) -> None:
        """This coordinator stops serving: every stream ends (clients come back, to this
        one after a restart or to the next leader, with their tokens)."""
        for holder in list(self._holders.values()):
            holder.end(CLOSING)
        self._holders.clear()
