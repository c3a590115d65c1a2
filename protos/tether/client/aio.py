"""``AsyncClient``: the coordinator's API for Python programs (asyncio).

Typed values in, typed values out (``tether.core`` dataclasses, no protobuf), and
errors as exceptions (``tether.core.errors`` plus ``CoordinatorUnreachable`` and
``TimedOut``). The `tether` CLI is built on this client; so can editors and
orchestrators be.

Several coordinators (``"a:7400,b:7400,c:7400"``): calls go to the leader. A standby
answers with the leader's address and the client goes there; a coordinator that does
not answer (the leader died) makes the client try the others, for up to ``failover``
seconds, while a standby takes over. What is safe to send again is sent again (spawns
carry an idempotency key, made up if the caller gave none; stops, keepalives and reads
are idempotent); a signal or an adoption cut off mid-way is not, and raises
``Interrupted`` saying so. ``watch`` resumes on the new leader from the last event it
delivered, losing none and repeating none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from tether.client.lease import AsyncWindow
from tether.client.spec import build_spec
from tether.core import trace
from tether.core.audit import AuditEntry
from tether.core.errors import (
    AgentUnreachable,
    Conflict,
    InvalidSpec,
    NotFound,
    SessionNotFound,
    StartFailed,
    TetherError,
)
from tether.core.model import FailureClass, GroupSpec, GroupState
from tether.core.output import (
    AttachOpen,
    LogQuery,
    Note,
    OutputChunk,
    check_since,
    check_tail,
)
from tether.core.sessions import (
    AgentState,
    GroupEntry,
    GroupSelector,
    OrphanReport,
    PortReport,
    SessionEvent,
    SessionReport,
    SessionView,
)
from tether.rpc.convert import (
    agent_from_pb,
    attach_open_to_pb,
    audit_event_from_pb,
    chunk_from_pb,
    entry_from_pb,
    orphan_from_pb,
    port_owner_from_pb,
    query_to_pb,
    report_from_pb,
    selector_to_pb,
    session_event_from_pb,
    session_from_pb,
    spec_to_pb,
    ts,
)
from tether.rpc.leader import (
    AGENT_TRAILER,
    READS,
    STALE_OK_HEADER,
    addresses,
    redirect_of,
    trailer,
)
from tether.rpc.security import ClientSecurity
from tether.rpc.status import error_from_rpc
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

DEFAULT_ADDRESS = "127.0.0.1:7400"
#: The coordinator answers a Wait at its timeout; the call's deadline leaves it this long.
WAIT_MARGIN = 10.0
MAX_MESSAGE = 64 * 1024 * 1024
#: An Attach write larger than this goes as several messages.
ATTACH_WRITE = 1 << 20
T = TypeVar("T")


class CoordinatorUnreachable(TetherError):
    """No coordinator answered (``address``: the one, or the several, tried; ``why``)."""

    def __init__(self, address: str, why: str) -> None:
        if "," in address:  # several coordinators sharing a store
            super().__init__(f"no leader among coordinators {address} ({why}); see "
                             "`tether coordinators` for each one's view, and retry")
        else:
            super().__init__(f"coordinator {address} is unreachable ({why}); start it with "
                             "`tether serve` or point --coordinator / TETHER_COORDINATOR at it")
        self.address = address
        self.why = why


class LeaderMoved(Exception):
    """Raised inside the client: another coordinator leads now than the one being called."""

    def __init__(self, leader: str) -> None:
        super().__init__(leader)
        self.leader = leader


class Unresponsive(Exception):
    """Raised inside the client: a coordinator did not answer a read in time."""


class Interrupted(CoordinatorUnreachable):
    """A call that is not safe to repeat was cut off: it may or may not have been done."""

    def __init__(self, address: str, what: str, why: str) -> None:
        TetherError.__init__(
            self, f"{what} on coordinator {address} was cut off ({why}); it may or may not "
            "have been done: check (e.g. `tether show SESSION`) and retry if needed")
        self.address = address
        self.why = why
        self.what = what


#: Calls that may be sent again after a break, whatever happened to the first one.
IDEMPOTENT = frozenset({"Spawn", "StopSession", "KeepAlive", "CreateSession", "GetSession",
                        "ListSessions", "ListAgents", "ListOrphans", "GetLeader", "ListPorts",
                        "Wait", "WatchSession", "ReadAudit", "OpenLease", "Logs"})
#: Connection failures that mean the call never left.
NOT_SENT = ("failed to connect", "connection refused", "name resolution", "dns resolution",
            "no route to host")
#: Between rounds over every address while none leads: a takeover is found within this.
RETRY_MAX = 0.25
#: A call to one of several coordinators taking longer than this makes the client ask the
#: others who leads (a paused leader answers nothing, not even HTTP/2 pings).
PROBE_EVERY = 2.0


class TimedOut(TetherError):
    """A call did not answer within its timeout; the coordinator may still be at it."""

    def __init__(self, address: str, what: str, timeout: float | None) -> None:
        after = f" within {timeout:g} s" if timeout else ""
        super().__init__(f"{what} on coordinator {address} did not answer{after}; it may "
                         "still be working on it (raise --timeout, or look with `tether show`)")
        self.address = address
        self.what = what


@dataclass(frozen=True)
class Leader:
    """One coordinator's view of who leads (``AsyncClient.leader``)."""

    #: The leader's address; empty while none leads.
    leader: str
    epoch: int
    #: The coordinator that answered, and whether it leads.
    address: str
    leading: bool
    lease_remaining: float
    store: str
    #: Why none leads, if none does.
    problem: str = ""


def _selector(groups: Sequence[str], labels: Sequence[str]) -> cpb.GroupSelector:
    if isinstance(groups, str) or isinstance(labels, str):
        raise InvalidSpec("groups and labels are lists of names, not one string",
                          field="selector")
    return selector_to_pb(GroupSelector(tuple(groups), tuple(labels)))


def _traceparent(given: str | None) -> str:
    """The traceparent a call carries: the one given (checked: a malformed one is refused
    here, the caller's mistake), else this process's TRACEPARENT if valid, else none."""
    if given is None:
        return trace.parse(os.environ.get(trace.ENV, ""))
    if given and not trace.valid(given):
        raise InvalidSpec(f"traceparent {given[:80]!r} is not a W3C traceparent "
                          "(<2 hex version, not ff>-<32 hex>-<16 hex>-<2 hex>, lower case)",
                          field="traceparent")
    return trace.parse(given) if given else ""


def default_address() -> str:
    return os.environ.get("TETHER_COORDINATOR") or DEFAULT_ADDRESS


class AsyncClient:
    """``async with AsyncClient() as c: await c.spawn(["sleep", "60"], session="s")``.

    ``address``: one coordinator, or several comma-separated (they share a store and
    elect a leader); ``failover``: how long to look for a leader among them."""

    def __init__(self, address: str | None = None, *, token: str = "", token_file: str = "",
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                 server_name: str = "", timeout: float | None = None,
                 failover: float = 30.0) -> None:
        self.addresses = addresses(address or default_address()) or [DEFAULT_ADDRESS]
        #: The coordinator calls go to (the leader, once found).
        self.address = self.addresses[0]
        self.timeout = timeout
        self.failover = failover
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            # A coordinator that comes back (a restart) is reached again within about a
            # second, not after gRPC's default backoff (up to 2 minutes): a window has only
            # its lease's grace, counted by the coordinator from its restart.
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)]
        if len(self.addresses) > 1:
            # HTTP/2 pings: a leader that stops answering (paused, cut off) fails the call
            # in seconds, and the client looks for the next leader, instead of waiting out
            # the whole deadline.
            options += [("grpc.keepalive_time_ms", 2000), ("grpc.keepalive_timeout_ms", 2000),
                        ("grpc.keepalive_permit_without_calls", 1),
                        ("grpc.http2.max_pings_without_data", 0)]
        self._security = ClientSecurity(
            ca=tls_ca, cert=tls_cert, key=tls_key, token_file=token_file,
            server_name=server_name, token=token, options=options)
        self._stubs: dict[str, cgrpc.CoordinatorServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._stub_at(self.address)  # a bad TLS file fails here, not at the first call

    def _stub_at(self, address: str) -> cgrpc.CoordinatorServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = self._security.channel(address)
            self._channels.append(channel)
            stub = self._stubs[address] = cgrpc.CoordinatorServiceStub(channel)
        return stub

    @property
    def _stub(self) -> cgrpc.CoordinatorServiceStub:
        return self._stub_at(self.address)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client's channels (``async with`` does it on leaving)."""
        for channel in self._channels:
            await channel.close()

    async def _call(self, what: str, call: Callable[..., Awaitable[T]], request: Any,
                    timeout: float | None, traceparent: str = "") -> T:
        """One call to the leader: method ``what`` of whichever coordinator leads (``call``,
        the current one's, names the same method)."""
        timeout = timeout if timeout is not None else self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        route = _Route(self, what)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                route.timed_out(timeout)
            address = self.address
            try:
                method: Callable[..., Any] = getattr(self._stub, what)
                md = route.metadata() or ()
                if traceparent:
                    md = (*md, (trace.HEADER, traceparent))
                pending = method(request, timeout=left, metadata=md or None)
                if not self._several(address):
                    return await pending  # type: ignore[no-any-return]
                return await self._watched(  # type: ignore[no-any-return]
                    pending, address, impatient=what in READS)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    route.timed_out(timeout)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise self._error(exc, what, timeout) from exc
                agent = _agent_unreachable(exc)
                if agent is not None:  # the leader answered: its agent did not
                    raise agent from exc
                await route.next(exc)
            except LeaderMoved as moved:
                route.moved(address, moved.leader)
            except Unresponsive:
                await route.unresponsive(address)

    def _several(self, address: str) -> bool:
        """Whether another coordinator than ``address`` could answer."""
        return len(self.addresses) > 1 or address not in self.addresses

    async def _watched(self, call: Any, address: str, impatient: bool = False) -> Any:
        """Await a call to ``address``; while it takes long, ask the other coordinators
        whether another one leads now (``address`` paused or cut off: its lease lapsed and
        a standby took over), and if so give up on it (``LeaderMoved``). ``impatient``
        (a read): give up after ``PROBE_EVERY`` (``Unresponsive``): a standby answers it."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=PROBE_EVERY)
                if done:
                    return task.result()
                if impatient:
                    raise Unresponsive(address)
                leader = await self._leader_elsewhere(address)
                if leader:
                    raise LeaderMoved(leader)  # the task (and with it the call) is cancelled
        finally:
            if not task.done():
                task.cancel()

    async def _leader_elsewhere(self, address: str) -> str:
        """Another leader than ``address``, as some other coordinator names it, or ""."""
        async def ask(other: str) -> str:
            try:
                info = await self._stub_at(other).GetLeader(cpb.GetLeaderRequest(),
                                                            timeout=PROBE_EVERY / 2)
            except grpc.aio.AioRpcError:
                return ""
            return str(info.leader) if info.leader and info.leader != address else ""

        found = await asyncio.gather(*(ask(a) for a in self.addresses if a != address))
        return next((f for f in found if f), "")

    def _error(self, exc: grpc.aio.AioRpcError, what: str, timeout: float | None
               ) -> TetherError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TimedOut(self.address, what, timeout)
        if code == grpc.StatusCode.UNAVAILABLE:
            return CoordinatorUnreachable(self.address, details)
        return error_from_rpc(code, details)

    # ------------------------------------------------------------ groups

    async def spawn(self, argv: Sequence[str] | GroupSpec, *, session: str = "",
                    agent: str = "", idempotency_key: str = "", timeout: float | None = None,
                    traceparent: str | None = None, **options: Any) -> GroupEntry:
        """Start a group; returns it once running. A start failure raises ``StartFailed``
        (``.failure``, ``.message``, and ``.group``: the failed group's entry).

        ``options`` go to ``build_spec``. ``traceparent``: the W3C trace context the
        group is started under (its processes get it as ``TRACEPARENT``; it is on the
        group's events and records); default: this process's ``TRACEPARENT`` variable,
        ``""`` for none. A malformed one raises ``InvalidSpec`` here."""
        spec = argv if isinstance(argv, GroupSpec) else build_spec(argv, session=session,
                                                                    **options)
        if not spec.session_id:
            raise InvalidSpec("spawn needs a session", field="session")
        # A key even if the caller gave none: a retry through a failover then returns the
        # group the first attempt started instead of starting a second one.
        req = cpb.CoordinatorSpawnRequest(agent=agent, spec=spec_to_pb(spec),
                                          idempotency_key=idempotency_key or
                                          f"auto-{secrets.token_hex(12)}")
        deadline = timeout if timeout is not None else self.timeout or spec.start_timeout + 60
        entry = entry_from_pb(await self._call("Spawn", self._stub.Spawn, req, deadline,
                                               _traceparent(traceparent)))
        if entry.state is GroupState.FAILED and entry.view.exit is not None:
            rec = entry.view.exit
            failed = StartFailed(rec.failure or FailureClass.IMMEDIATE_CRASH, rec.message)
            failed.group = entry  # type: ignore[attr-defined]
            raise failed
        return entry

    async def adopt(self, pid: int, *, session: str, agent: str = "", label: str = "",
                    grace: float | None = None, orphan_policy: str = "kill",
                    start_time: float | None = None, timeout: float | None = None
                    ) -> GroupEntry:
        """Put a running process tree (``pid``, its leader) under tether's care, in
        ``session``, on ``agent``; ``start_time`` guards against a reused pid."""
        if not 0 < pid < 2**31:
            raise InvalidSpec(f"pid {pid} is not a process id; give the pid of the tree's "
                              "leader (1 to 2147483647)", field="pid")
        spec = build_spec([f"adopted:{pid}"], session=session, label=label, grace=grace,
                          orphan_policy=orphan_policy)
        req = cpb.CoordinatorAdoptRequest(agent=agent, pid=pid, spec=spec_to_pb(spec))
        if start_time is not None:
            req.start_time = start_time
        return entry_from_pb(await self._call("Adopt", self._stub.Adopt, req, timeout or 30))

    # ------------------------------------------------------------ sessions

    async def signal(self, session: str, signal: str, *, groups: Sequence[str] = (),
                     labels: Sequence[str] = (), timeout: float | None = None
                     ) -> SessionReport:
        """Signal every live group of a session, or only ``groups`` (ids) and the groups
        with one of ``labels``."""
        req = cpb.SignalSessionRequest(session_id=session, signal=signal,
                                       selector=_selector(groups, labels))
        return report_from_pb(await self._session_call(
            "SignalSession", self._stub.SignalSession, req, session, timeout or 30))

    async def stop(self, session: str, *, grace: float | None = None,
                   groups: Sequence[str] = (), labels: Sequence[str] = (),
                   timeout: float | None = None, traceparent: str | None = None
                   ) -> SessionReport:
        """Stop a session; returns once every group has a record (``complete``), or with
        what is known when ``timeout`` ends (the stop goes on in the coordinator). With
        ``groups``/``labels``, stop only those groups: the session stays active.
        ``traceparent``: as for ``spawn`` (the stop's spans join that trace)."""
        req = cpb.StopSessionRequest(session_id=session, selector=_selector(groups, labels))
        if grace is not None:
            req.grace_seconds = grace
        return report_from_pb(await self._session_call("StopSession", self._stub.StopSession,
                                                       req, session, timeout,
                                                       _traceparent(traceparent)))

    async def restart(self, session: str, *, groups: Sequence[str] = (),
                      labels: Sequence[str] = (), grace: float | None = None,
                      timeout: float | None = None) -> SessionReport:
        """Restart live groups in place (all of the session's, or the ones named): each ends
        its run and starts again with the same spec and id; the old run's record stays in
        the group's ``runs``. Returns once each runs again (``complete``)."""
        req = cpb.RestartGroupsRequest(session_id=session, selector=_selector(groups, labels))
        if grace is not None:
            req.grace_seconds = grace
        return report_from_pb(await self._session_call(
            "RestartGroups", self._stub.RestartGroups, req, session, timeout))

    async def forget(self, session: str, *, groups: Sequence[str] = (),
                     labels: Sequence[str] = (), timeout: float | None = None) -> list[str]:
        """Drop ended groups from a session's listing; returns their ids."""
        req = cpb.ForgetGroupsRequest(session_id=session, selector=_selector(groups, labels))
        reply = await self._session_call("ForgetGroups", self._stub.ForgetGroups, req,
                                         session, timeout or 30)
        return list(reply.forgotten)

    async def wait(self, session: str, *, timeout: float | None = None) -> SessionReport:
        """Return once the session has no live group (``complete``), with every group's
        record; or after ``timeout`` seconds with what is known (``complete`` false)."""
        req = cpb.WaitRequest(session_id=session)
        if timeout is not None:
            req.timeout_seconds = timeout
        deadline = None if timeout is None else timeout + WAIT_MARGIN
        return report_from_pb(await self._session_call("Wait", self._stub.Wait, req, session,
                                                       deadline))

    async def session(self, session: str, *, timeout: float | None = None) -> SessionView:
        """One session with its groups (``SessionNotFound`` if unknown)."""
        req = cpb.GetSessionRequest(session_id=session)
        return session_from_pb(await self._session_call("GetSession", self._stub.GetSession,
                                                        req, session, timeout or 10))

    async def sessions(self, *, include_stopped: bool = False, include_groups: bool = False,
                       timeout: float | None = None) -> list[SessionView]:
        """Every session (active ones, or all with ``include_stopped``), fetched page by
        page; with ``include_groups``, each with its groups."""
        out: list[SessionView] = []
        token = ""
        while True:  # page by page: a long history never needs one huge message
            reply = await self._call("ListSessions", self._stub.ListSessions,
                                     cpb.ListSessionsRequest(
                                         include_stopped=include_stopped,
                                         include_groups=include_groups, page_size=500,
                                         page_token=token), timeout or 10)
            out.extend(session_from_pb(s) for s in reply.sessions)
            token = reply.next_page_token
            if not token:
                return out

    async def create_session(self, session: str, *, window: str = "",
                             labels: dict[str, str] | None = None, ttl: float = 0.0,
                             timeout: float | None = None) -> SessionView:
        """Create a session (or a new run of a stopped one), with a TTL lease if ``ttl``."""
        req = cpb.CreateSessionRequest(session_id=session, window=window, labels=labels or {},
                                       ttl_seconds=ttl)
        return session_from_pb(await self._call("CreateSession", self._stub.CreateSession, req,
                                                timeout or 10))

    def window(self, session: str, *, window: str = "", labels: dict[str, str] | None = None,
               lease_grace: float | None = None, resume_token: str = "",
               stop_grace: float | None = None, stop_timeout: float | None = None,
               reconnect_timeout: float | None = None) -> AsyncWindow:
        """A session held by a lease stream while ``async with c.window(...) as w`` lasts:
        ``w.spawn(...)`` starts groups in it; leaving the block stops the session and
        waits for its report (``w.report``); if this process dies, the coordinator stops
        it ``lease_grace`` seconds later (cause ``lease_lost``). The lease is renewed on
        this event loop and reconnected after a break: while the coordinator cannot be
        reached, for ``reconnect_timeout`` seconds (default 60, at least the grace; a
        restarted coordinator gives the grace from its restart), then within the grace.
        ``resume_token`` (another window's ``resume_token``) takes an existing lease back:
        an editor window that reloads keeps its processes."""
        return AsyncWindow(self, session, window=window, labels=labels,
                           lease_grace=lease_grace, resume_token=resume_token,
                           stop_grace=stop_grace, stop_timeout=stop_timeout,
                           reconnect_timeout=reconnect_timeout)

    async def keepalive(self, session: str, ttl: float, *, timeout: float | None = None
                        ) -> SessionView:
        """Renew (or set) a session's TTL lease: it is stopped if not renewed within
        ``ttl`` seconds (cause ``lease_expired``). For clients that cannot hold a stream;
        ``window`` is the lease that ends with the client's connection."""
        req = cpb.KeepAliveRequest(session_id=session, ttl_seconds=ttl)
        return session_from_pb(await self._session_call("KeepAlive", self._stub.KeepAlive,
                                                        req, session, timeout or 10))

    async def watch(self, session: str, *, initial: bool = True, since: int = 0,
                    epoch: str = "", timeout: float | None = None
                    ) -> AsyncIterator[SessionEvent]:
        """A session's events as they happen (first its current groups, with ``initial``).
        When the leader changes, the stream resumes on the new one after the last event
        delivered (with a snapshot instead, marked ``initial``, if those are gone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        route = _Route(self, "WatchSession")
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                route.timed_out(timeout)
            req = cpb.WatchSessionRequest(session_id=session, initial=initial, since_seq=since,
                                          epoch=epoch)
            address = self.address
            stream = self._stub.WatchSession(req, timeout=left)
            try:
                while True:
                    msg = await self._next_message(stream, address)
                    if msg is None:
                        return
                    event = session_event_from_pb(msg)
                    since, epoch, initial = event.seq, event.epoch, True
                    route = _Route(self, "WatchSession")  # it works here: start afresh
                    yield event
            except LeaderMoved as moved:
                route.moved(address, moved.leader)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise SessionNotFound(session) from exc
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise self._error(exc, "WatchSession", timeout) from exc
                await route.next(exc)
            finally:
                stream.cancel()

    async def _next_message(self, stream: Any, address: str) -> Any:
        """The next message of a stream from ``address`` (None at its end). With several
        coordinators, a quiet stream makes the client check that ``address`` still leads
        (``LeaderMoved`` if not: a paused leader's stream is quiet forever)."""
        if not self._several(address):
            msg = await stream.read()
        else:
            msg = await self._watched(stream.read(), address)
        return None if msg is grpc.aio.EOF else msg

    async def _session_call(self, what: str, call: Callable[..., Awaitable[T]], request: Any,
                            session: str, timeout: float | None, traceparent: str = "") -> T:
        try:
            return await self._call(what, call, request, timeout, traceparent)
        except NotFound as exc:
            if str(exc) != str(SessionNotFound(session)):
                raise  # something else was not found (a group or label of the session)
            raise SessionNotFound(session) from exc

    # ------------------------------------------------------------ agents

    async def agents(self, *, timeout: float | None = None) -> list[AgentState]:
        """The registered agents, each with whether it is up."""
        reply = await self._call("ListAgents", self._stub.ListAgents, cpb.ListAgentsRequest(),
                                 timeout or 10)
        return [agent_from_pb(a) for a in reply.agents]

    async def forget_agent(self, name: str, *, force: bool = False,
                           timeout: float | None = None) -> list[str]:
        """Give up an agent gone for good (admin): its live groups are recorded lost, and
        stops waiting on it finish. Returns the ids of the groups recorded lost."""
        reply = await self._call("ForgetAgent", self._stub.ForgetAgent,
                                 cpb.ForgetAgentRequest(name=name, force=force), timeout or 30)
        return list(reply.lost_group_ids)

    async def orphans(self, *, sweep: bool = False, timeout: float | None = None
                      ) -> OrphanReport:
        """Live processes of agents that belong to no live group (``sweep``: kill them)."""
        reply = await self._call("ListOrphans", self._stub.ListOrphans,
                                 cpb.CoordinatorListOrphansRequest(sweep=sweep), timeout or 30)
        return OrphanReport(tuple(orphan_from_pb(o) for o in reply.orphans),
                            dict(reply.unreachable))

    # ------------------------------------------------------------ coordinators

    async def leader(self, *, address: str = "", timeout: float | None = None) -> Leader:
        """Which coordinator leads, as coordinator ``address`` (default: the current one)
        sees it; asked there and nowhere else."""
        at = address or self.address
        try:
            msg = await self._stub_at(at).GetLeader(cpb.GetLeaderRequest(),
                                                    timeout=timeout or 10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise CoordinatorUnreachable(at, exc.details() or "UNAVAILABLE") from exc
            raise self._error(exc, "GetLeader", timeout) from exc
        return Leader(msg.leader, msg.epoch, msg.address or at, msg.leading,
                      msg.lease_remaining_seconds, msg.store, msg.problem)

    # ------------------------------------------------------------ audit

    async def audit(self, *, since: float = 0.0, limit: int = 0,
                    timeout: float | None = None) -> list[AuditEntry]:
        """The coordinator's audit log (needs the admin role): every mutating call, who
        made it and how it ended, oldest first; at or after ``since`` (seconds since the
        epoch), at most ``limit`` (0: the last 1000)."""
        req = cpb.ReadAuditRequest(limit=limit)
        if since:
            req.since.CopyFrom(ts(since))
        timeout = timeout if timeout is not None else self.timeout or 30
        stream = self._stub.ReadAudit(req, timeout=timeout)
        try:
            return [audit_event_from_pb(msg) async for msg in stream]
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "ReadAudit", timeout) from exc
        finally:
            stream.cancel()

    # ------------------------------------------------------------ output and stdio

    async def logs(self, session: str, *, groups: Sequence[str] = (), tail: int | None = None,
                   since: float = 0.0, follow: bool = False, timeout: float | None = None
                   ) -> AsyncIterator[OutputChunk]:
        """Captured stdout and stderr of a session's groups (or only ``groups``), interleaved
        in the order they were read: everything kept, or the last ``tail`` lines of each
        group, or what was read at or after ``since`` (seconds since the epoch); then, with
        ``follow``, new output until each group (a whole session: the session) has ended
        and its output is complete. Chunks are bytes as written (``chunk.data``), tagged
        ``stdout``/``stderr``, or ``tether`` notes (``chunk.event``: run boundaries, the
        end); ``chunk.dropped`` says how many older bytes a reader that fell behind will
        not get. A leader change before the first chunk is followed; later, it ends the
        call with ``CoordinatorUnreachable`` (call again with ``since``)."""
        if isinstance(groups, str):
            raise InvalidSpec("groups is a list of group ids, not one string", field="groups")
        req = query_to_pb(LogQuery(tuple(groups), session, check_tail(tail),
                                   check_since(since), follow))
        deadline = None if timeout is None else time.monotonic() + timeout
        route = _Route(self, "Logs")
        delivered = False
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                route.timed_out(timeout)
            stream = self._stub.Logs(req, timeout=left)
            try:
                while True:
                    msg = await stream.read()
                    if msg is grpc.aio.EOF:
                        return
                    delivered = True
                    yield chunk_from_pb(msg)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and follow:
                    return  # followed for as long as asked
                if exc.code() == grpc.StatusCode.NOT_FOUND and \
                        (exc.details() or "") == str(SessionNotFound(session)):
                    raise SessionNotFound(session) from exc
                if exc.code() != grpc.StatusCode.UNAVAILABLE or delivered:
                    raise self._error(exc, "Logs", timeout) from exc
                await route.next(exc)
            finally:
                stream.cancel()

    async def attach(self, session: str, group: str, *, write: bool = False,
                     tail: int | None = None, close_stdin_on_detach: bool = False
                     ) -> Attachment:
        """Attach to a group's stdio: its output from now on (after the last ``tail``
        lines), and with ``write`` its stdin (``--stdin pipe``; one writer at a time: a
        second is refused with ``Conflict`` naming the holder). Use it as an async
        context manager; leaving it detaches (the writer role goes; stdin stays open
        unless ``close_stdin_on_detach``, or ``close_stdin()`` was called)."""
        opened = AttachOpen(group, session, write, check_tail(tail), close_stdin_on_detach)
        call = self._stub.Attach()
        attachment = Attachment(self, call, write)
        try:
            await call.initial_metadata()  # admitted (or refused) before anything is written
            await call.write(attach_open_to_pb(opened))
            hello = await attachment.read()
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            raise self._error(exc, "Attach", None) from exc
        except asyncio.InvalidStateError:
            # Refused (a reader's credential, an unknown group) in a trailers-only answer:
            # the call ended before the first write; its status says why.
            _release_writes(call)
            raise await attachment._ended() from None
        except BaseException:
            call.cancel()
            raise
        if hello is None or hello.event != Note.ATTACHED.value:
            call.cancel()
            raise TetherError(f"Attach: the coordinator did not confirm the attachment "
                              f"({hello!r})")
        return attachment

    async def ports(self, port: int = 0, *, agent: str = "", timeout: float | None = None
                    ) -> PortReport:
        """Who holds TCP ports: listening ports (or ``port``) on every agent (or ``agent``),
        each with its group (session, label) or its process (pid, user, command)."""
        reply = await self._call("ListPorts", self._stub.ListPorts,
                                 cpb.CoordinatorListPortsRequest(port=port, agent=agent),
                                 timeout or 30)
        return PortReport(tuple(port_owner_from_pb(o) for o in reply.ports),
                          dict(reply.unreachable))


class Attachment:
    """A group's stdio, attached (``AsyncClient.attach``). ``await write(b"...")`` (the
    writer: bytes to the program's stdin, in order; waits while the program does not
    read), ``await close_stdin()`` (it reads end-of-file), ``await read()`` (the next
    ``OutputChunk``, or None once the group's output ended), ``async for chunk in it``;
    ``await close()`` (or leaving ``async with``) detaches."""

    def __init__(self, client: AsyncClient, call: Any, writer: bool) -> None:
        self._client = client
        self._call = call
        self.writer = writer
        self._writing = writer
        #: Chunks ``close_stdin`` read while it waited for its acknowledgement.
        self._early: collections.deque[OutputChunk] = collections.deque()
        self._reading = asyncio.Lock()
        self._stdin_closed = False

    async def __aenter__(self) -> Attachment:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[OutputChunk]:
        while (chunk := await self.read()) is not None:
            yield chunk

    async def read(self) -> OutputChunk | None:
        """The next chunk of the group's output (or a note: drops, run boundaries, the
        ``stdin_closed`` acknowledgement), None once the stream ended (the group ended, or
        ``close``)."""
        if self._early:
            return self._early.popleft()
        async with self._reading:
            if self._early:
                return self._early.popleft()
            return await self._pull()

    async def _pull(self) -> OutputChunk | None:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return None
            raise self._client._error(exc, "Attach", None) from exc
        if msg is grpc.aio.EOF:
            return None
        chunk = chunk_from_pb(msg)
        if chunk.event == Note.STDIN_CLOSED.value:
            self._stdin_closed = True
        return chunk

    async def write(self, data: bytes) -> None:
        """Write ``data`` to the group's stdin (the writer only: ``attach(write=True)``).
        Returns once gRPC took it for sending (flow control: a program that does not read
        slows only this writer), not once the agent wrote it to the pipe: a ``close()``
        right after may lose it. ``close_stdin()`` waits until every byte written before
        it was handed to the pipe."""
        if not self.writer:
            raise Conflict("this attachment is not the writer; attach with write=True")
        if not self._writing:
            raise Conflict("stdin was closed through this attachment; nothing more can be "
                           "written")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidSpec("write takes bytes (encode text first)", field="stdin")
        view = memoryview(data)
        try:
            while view:  # gRPC messages stay well below the receive limit
                await self._call.write(pb.AttachRequest(stdin=bytes(view[:ATTACH_WRITE])))
                view = view[ATTACH_WRITE:]
        except grpc.aio.AioRpcError as exc:
            raise self._client._error(exc, "Attach", None) from exc
        except asyncio.InvalidStateError:
            raise await self._ended() from None

    async def close_stdin(self) -> None:
        """Close the program's stdin after what was written (it reads end-of-file), and
        wait until the agent did: every byte written before went to the pipe and the pipe
        is closed (its ``stdin_closed`` note; output that came meanwhile is kept for
        ``read``), so leaving ``with`` right after loses nothing. The output keeps coming
        until the group's output ends."""
        if not self._writing:
            return
        self._writing = False
        try:
            await self._call.write(pb.AttachRequest(close_stdin=True))
            await self._call.done_writing()
        except grpc.aio.AioRpcError as exc:
            raise self._client._error(exc, "Attach", None) from exc
        except asyncio.InvalidStateError:
            raise await self._ended() from None
        while not self._stdin_closed:
            async with self._reading:
                if self._stdin_closed:
                    return
                chunk = await self._pull()
                if chunk is None:
                    return  # the group's output ended: its stdin is gone with it
                self._early.append(chunk)

    async def _ended(self) -> TetherError:
        code = await self._call.code()
        details = await self._call.details()
        return error_from_rpc(code, details or code.name)

    async def close(self) -> None:
        """Detach: the writer role goes; stdin stays open unless the attachment said
        ``close_stdin_on_detach`` (or ``close_stdin`` was called)."""
        self._call.cancel()
        _release_writes(self._call)


def _release_writes(call: Any) -> None:
    """End the task grpc.aio feeds an intercepted stream call's writes through: only
    ``cancel()`` ends it, and that does nothing once the call has ended by itself (a
    refused Attach, a group whose output ended), so it would wait forever (and warn
    "Task was destroyed but it is pending" when the loop closes)."""
    queue = getattr(call, "_write_to_iterator_queue", None)
    sentinel = getattr(type(call), "_FINISH_ITERATOR_SENTINEL", None)
    if isinstance(queue, asyncio.Queue) and sentinel is not None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(sentinel)


def _agent_unreachable(exc: grpc.aio.AioRpcError) -> AgentUnreachable | None:
    """The ``AgentUnreachable`` a coordinator answered with (it names the agent in the
    ``tether-agent-unreachable`` trailer), or None."""
    try:
        name = trailer(exc.trailing_metadata(), AGENT_TRAILER)
    except Exception:  # no trailers: the call never reached a coordinator
        return None
    if name is None:
        return None
    err = AgentUnreachable(name, "", exc.details() or "UNAVAILABLE")
    err.args = (exc.details() or f"agent {name!r} is unreachable",)
    return err


class _Route:
    """Where a call goes next after ``UNAVAILABLE``: to the leader a coordinator named, to
    the next address, or nowhere (raises)."""

    def __init__(self, client: AsyncClient, what: str) -> None:
        self.client = client
        self.what = what
        self.tried: set[str] = set()
        self.backoff = 0.05
        self.give_up = time.monotonic() + client.failover
        self.last = ""
        #: The leader could not be reached: a standby may answer a read from the store.
        self.stale_ok = False

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return ((STALE_OK_HEADER, "1"),) if self.stale_ok and self.what in READS else None

    def timed_out(self, timeout: float | None) -> NoReturn:
        if self.last:  # looking for a leader all along: say why none answered
            raise CoordinatorUnreachable(", ".join(self.client.addresses),
                                         f"no leader answered within {timeout:g} s; last: "
                                         f"{self.last}")
        raise TimedOut(self.client.address, self.what, timeout)

    def moved(self, address: str, leader: str) -> None:
        """The call to ``address`` was abandoned: ``leader`` leads now."""
        self.last = f"{address}: another coordinator ({leader}) leads now"
        self.stale_ok = True
        if self.what not in IDEMPOTENT:
            raise Interrupted(address, self.what, f"{leader} leads now")
        self.client.address = leader

    async def unresponsive(self, address: str) -> None:
        """``address`` did not answer a read in time: any coordinator may answer it."""
        self.last = f"{address}: no answer within {PROBE_EVERY:g} s"
        self.stale_ok = True
        if time.monotonic() >= self.give_up:
            raise CoordinatorUnreachable(", ".join(self.client.addresses), self.last)
        await self._rotate(address)

    async def next(self, exc: grpc.aio.AioRpcError) -> None:
        c = self.client
        address = c.address
        details = exc.details() or exc.code().name
        self.last = f"{address}: {details}"
        answered, leader, interrupted = redirect_of(exc)
        sent = (answered and interrupted) or (not answered and not any(
            hint in details.lower() for hint in NOT_SENT))
        if sent and self.what not in IDEMPOTENT:
            raise Interrupted(address, self.what, details)
        self.tried.add(address)
        if not answered or not leader:
            self.stale_ok = True
        if answered and leader and leader not in self.tried:
            c.address = leader
            return
        if c.addresses == [address] and not answered:  # one coordinator, and it is gone
            raise CoordinatorUnreachable(address, details)
        if time.monotonic() >= self.give_up:
            names = ", ".join(c.addresses)
            raise CoordinatorUnreachable(names, f"no leader found within {c.failover:g} s; "
                                         f"last: {address}: {details}; retry")
        await self._rotate(address)

    async def _rotate(self, address: str) -> None:
        c = self.client
        self.tried.add(address)
        ring = c.addresses if address in c.addresses else [*c.addresses, address]
        c.address = ring[(ring.index(address) + 1) % len(ring)]
        if c.address in self.tried:  # a full round: give the standbys time to take over
            self.tried.clear()
            await asyncio.sleep(self.backoff)
            self.backoff = min(self.backoff * 2, RETRY_MAX)
