"""Windows: a session whose processes live exactly as long as the client holds it.

``AsyncClient.window()`` opens a stream lease (``OpenLease``) on a session and keeps it
renewed from the client's event loop (the blocking ``Client`` runs that loop in its
background thread), so the caller never has to call anything to keep it::

    with Client() as c, c.window("editor-window-1", lease_grace=5) as w:
        lsp = w.spawn(["pyright-langserver", "--stdio"], label="lsp")
        ...
    # leaving the block stops the session and waits for its report (w.report)

If the client process dies, its stream ends with it, and the coordinator stops the
session once ``lease_grace`` seconds have passed without the lease being taken back
(cause ``lease_lost``). A client that loses its connection (a coordinator restart, a
failover, a network blip) reconnects by itself with the lease's resume token, within
the grace; another process can take the lease back with that token too
(``window(..., resume_token=w.resume_token)``: an editor window that reloads). A
coordinator that restarts (or fails over) gives every lease its grace from its restart,
so while the coordinator cannot be reached at all the window keeps trying for
``reconnect_timeout`` seconds (at least the grace; default ``RECONNECT_TIMEOUT``), and
once a coordinator answers without a verdict (too many lease streams for now: the one
it replaces may still count), for the grace from then. If that runs out, or the
coordinator says the lease is over, the window is *lost*: ``lost`` is true,
``wait_lost()`` returns, and ``spawn`` raises ``LeaseLost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from tether.core.errors import Conflict, ResourceExhausted, TetherError
from tether.core.model import GroupSpec
from tether.core.sessions import GroupEntry, LeaseState, SessionReport, SessionView
from tether.rpc.auth import ADMITTED_HEADER
from tether.rpc.convert import lease_state_from_pb
from tether.v1 import coordinator_pb2 as cpb

if TYPE_CHECKING:
    from tether.client.aio import AsyncClient

log = logging.getLogger(__name__)

#: Codes after which a lease stream is reconnected (within the grace): the connection or
#: the coordinator went away, or the stream was cut; anything else is a refusal.
RECONNECT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
#: Codes of a stream that broke without a verdict: tried again like an unreachable one.
BROKEN = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL})
#: How long one attempt to open a stream may take.
OPEN_TIMEOUT = 5.0
BACKOFF_MAX = 0.5
#: How long a window keeps trying to reach a coordinator it cannot reach (from its last
#: answer), by default: a restart or failover may take longer than a short grace.
RECONNECT_TIMEOUT = 60.0


class LeaseLost(Conflict):
    """The window's lease is over: its grace ran out before the client came back, the
    token was refused, or somebody stopped the session."""

    def __init__(self, session: str, why: str) -> None:
        super().__init__(f"the lease of session {session!r} is lost ({why}); its processes "
                         "are being (or were) stopped. Open a new window to start again")
        self.session = session
        self.why = why


class AsyncWindow:
    """A session held by a lease stream while this object is entered (``async with``).

    ``session``: the session's name; ``window``: the window name its groups get;
    ``lease_grace``: seconds the session outlives a lost stream (default: the
    coordinator's, 10 s); ``resume_token``: take back a lease another process (or an
    earlier run of this one) held; ``stop_grace`` / ``stop_timeout``: for the stop on
    leaving the block; ``reconnect_timeout``: how long to keep trying to reach a
    coordinator that cannot be reached (default ``RECONNECT_TIMEOUT``, at least the
    grace)."""

    def __init__(self, client: AsyncClient, session: str, *, window: str = "",
                 labels: dict[str, str] | None = None, lease_grace: float | None = None,
                 resume_token: str = "", stop_grace: float | None = None,
                 stop_timeout: float | None = None,
                 reconnect_timeout: float | None = None) -> None:
        self.client = client
        self.session = session
        self.window = window
        self.labels = dict(labels or {})
        self.lease_grace = lease_grace
        #: The token that takes this lease back (keep it like a password).
        self.resume_token = resume_token
        self.stop_grace = stop_grace
        self.stop_timeout = stop_timeout
        self.reconnect_timeout = RECONNECT_TIMEOUT if reconnect_timeout is None \
            else reconnect_timeout
        #: The last lease state the coordinator sent.
        self.state: LeaseState | None = None
        #: The session's stop report, once the block was left.
        self.report: SessionReport | None = None
        #: Why the lease was lost (empty while it holds).
        self.lost_why = ""
        self._lost = asyncio.Event()
        self._call: Any = None
        self._holding: asyncio.Task[None] | None = None
        self._closing = False
        self._heard = 0.0

    def __repr__(self) -> str:
        held = "lost" if self.lost else ("held" if self.state is not None else "not open")
        return f"<AsyncWindow {self.session!r} {held}>"

    @property
    def lost(self) -> bool:
        """The lease is over (``lost_why`` says why): spawns raise ``LeaseLost``."""
        return self._lost.is_set()

    async def __aenter__(self) -> AsyncWindow:
        await self.open()
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        await self.close(raise_errors=exc_type is None)

    # ------------------------------------------------------------ the caller's calls

    async def spawn(self, argv: Sequence[str] | GroupSpec, **options: Any) -> GroupEntry:
        """``AsyncClient.spawn`` into this window's session (and window name)."""
        if self.lost:
            raise LeaseLost(self.session, self.lost_why)
        if self.window and not isinstance(argv, GroupSpec):
            options.setdefault("window", self.window)
        return await self.client.spawn(argv, session=self.session, **options)

    async def view(self) -> SessionView:
        """The window's session as the coordinator shows it (``lease_held``, groups)."""
        return await self.client.session(self.session)

    async def wait_lost(self) -> str:
        """Return once the lease is lost, with why."""
        await self._lost.wait()
        return self.lost_why

    # ------------------------------------------------------------ the lease

    async def open(self) -> LeaseState:
        """Open the lease (or take it back with ``resume_token``) and start renewing it."""
        self._call, self.state = await self._connect()
        if self.state.resume_token:
            self.resume_token = self.state.resume_token
        self._holding = asyncio.ensure_future(self._hold())
        return self.state

    async def close(self, raise_errors: bool = True) -> None:
        """Stop the session (waiting for its report) and end the lease stream. A lost lease
        is not stopped again: its session may be another client's by now."""
        self._closing = True
        error: BaseException | None = None
        try:
            if not self.lost and self.state is not None:
                self.report = await self.client.stop(self.session, grace=self.stop_grace,
                                                     timeout=self.stop_timeout)
                holding = self._holding
                if holding is not None:  # the stream's last answer ("stopped") and its end
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.state.renew_timeout):
                            await asyncio.shield(holding)
        except TetherError as exc:
            error = exc
            log.warning("window %r: could not stop the session (%s); its lease stream ends "
                        "now, so the coordinator stops it after the grace", self.session, exc)
        finally:
            await self._drop()
        if error is not None and raise_errors:
            raise error

    async def _drop(self) -> None:
        task, self._holding = self._holding, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _mark_lost(self, why: str) -> None:
        if not self.lost:
            self.lost_why = why
            self._lost.set()
            if not self._closing:
                log.warning("window %r: lease lost: %s", self.session, why)

    async def _connect(self) -> tuple[Any, LeaseState]:
        """One stream, through to its first answer; follows the leader like other calls."""
        from tether.client.aio import CoordinatorUnreachable, _Route

        route = _Route(self.client, "OpenLease")
        while True:
            try:
                return await self._open_once(self.client._stub)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in BROKEN:  # e.g. a write that met a standby's refusal (#36066)
                    raise CoordinatorUnreachable(self.client.address,
                                                 f"{code.name}: {exc.details()}") from exc
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise self.client._error(exc, "OpenLease", OPEN_TIMEOUT) from exc
                await route.next(exc)

    async def _open_once(self, stub: Any) -> tuple[Any, LeaseState]:
        req = cpb.LeaseRequest(session_id=self.session, window=self.window, labels=self.labels,
                               resume_token=self.resume_token)
        if self.lease_grace is not None:
            req.lease_grace_seconds = self.lease_grace
        call = stub.OpenLease()
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                headers = await call.initial_metadata()
                # Write only into an admitted call (grpc/grpc#36066).
                if any(k == ADMITTED_HEADER for k, _ in headers or ()):
                    # Admitted, then perhaps turned away (a standby): read says how.
                    with contextlib.suppress(asyncio.InvalidStateError):
                        await call.write(req)
                msg = await call.read()
        except TimeoutError:
            call.cancel()
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, None, None,
                                       f"no answer within {OPEN_TIMEOUT:g} s") from None
        except BaseException:
            call.cancel()
            raise
        if msg is grpc.aio.EOF:
            call.cancel()
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None,
                                       "the lease stream ended before its first answer")
        return call, lease_state_from_pb(msg)

    async def _hold(self) -> None:
        """Renew while the stream lasts; reconnect (with the token) when it breaks, until
        the grace runs out."""
        while True:
            assert self.state is not None
            self._heard = time.monotonic()
            try:
                await self._renew(self._call)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RECONNECT:
                    self._mark_lost(f"{exc.code().name}: {exc.details()}")
                    return
                log.info("window %r: lease stream broke (%s: %s); reconnecting",
                         self.session, exc.code().name, exc.details())
            except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                log.info("window %r: lease stream broke (%s); reconnecting", self.session, exc)
            if self.lost or self._closing:
                return
            if not await self._reconnect():
                return

    async def _renew(self, call: Any) -> None:
        """Send renewals and read answers until the stream ends (``_heard``: when the last
        answer came). Marks the window lost if the session stopped."""
        assert self.state is not None
        state = self.state

        async def renewals() -> None:
            while True:
                await asyncio.sleep(state.renew_interval)
                await call.write(cpb.LeaseRequest())

        writer = asyncio.ensure_future(renewals())
        try:
            while True:
                try:
                    async with asyncio.timeout(state.renew_timeout):
                        msg = await call.read()
                except TimeoutError:
                    call.cancel()  # the coordinator went quiet (paused, cut off)
                    return
                if msg is grpc.aio.EOF:
                    return
                self._heard = time.monotonic()
                self.state = lease_state_from_pb(msg)
                if not self.state.held:
                    self._mark_lost(f"the session stopped ({self.state.stop_cause or 'stopped'})")
                    # Read to the stream's end: once it came, the coordinator has let the
                    # stream go (it no longer counts against this credential's streams).
                    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError,
                                             asyncio.InvalidStateError, grpc.aio.UsageError):
                        async with asyncio.timeout(state.renew_timeout):
                            while await call.read() is not grpc.aio.EOF:
                                pass
                    return
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.InvalidStateError,
                                     grpc.aio.AioRpcError, grpc.aio.UsageError):
                await writer

    async def _reconnect(self) -> bool:
        """Take the lease back with the token. While no coordinator can be reached, for
        ``reconnect_timeout`` (at least the grace) from the last answer: a restarted
        coordinator gives the lease its grace from its restart, so the client's own clock
        of the grace means nothing until a coordinator answers; from its first answer
        that is no verdict, for the grace."""
        from tether.client.aio import CoordinatorUnreachable, TimedOut

        assert self.state is not None
        grace = self.state.grace
        unreachable_until = self._heard + max(grace, self.reconnect_timeout)
        answered_until: float | None = None
        warned = False
        backoff = 0.05
        while True:
            now = time.monotonic()
            deadline = unreachable_until if answered_until is None else answered_until
            if now >= deadline:
                break
            if not warned and answered_until is None and now >= self._heard + grace:
                warned = True
                log.warning("window %r: the coordinator has been unreachable for longer than "
                            "the lease grace (%g s); still trying (a restarted coordinator "
                            "gives the grace from its restart), for up to %g s",
                            self.session, grace, unreachable_until - now)
            try:
                self._call, self.state = await self._connect()
                log.info("window %r: lease taken back", self.session)
                return True
            except (CoordinatorUnreachable, TimedOut) as exc:
                why = str(exc)
            except ResourceExhausted as exc:
                # Reachable, and no verdict: too many streams for now (the one this
                # replaces may still count). The grace runs from the first such answer.
                why = str(exc)
                if answered_until is None:
                    answered_until = time.monotonic() + grace
            except TetherError as exc:
                self._mark_lost(str(exc))
                return False
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, BACKOFF_MAX)
            log.debug("window %r: reconnecting: %s", self.session, why)
        self._mark_lost(
            "the coordinator could not be reached again within "
            f"{max(grace, self.reconnect_timeout):g} s (reconnect_timeout; the lease grace "
            f"is {grace:g} s)" if answered_until is None else
            f"the lease grace ({grace:g} s) ran out before the coordinator let the stream in")
        return False
