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
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from tether.client.spec import build_spec
from tether.core.audit import AuditEntry
from tether.core.errors import (
    AgentUnreachable,
    InvalidSpec,
    NotFound,
    SessionNotFound,
    StartFailed,
    TetherError,
)
from tether.core.model import FailureClass, GroupSpec, GroupState
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
    audit_event_from_pb,
    entry_from_pb,
    orphan_from_pb,
    port_owner_from_pb,
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
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

DEFAULT_ADDRESS = "127.0.0.1:7400"
#: The coordinator answers a Wait at its timeout; the call's deadline leaves it this long.
WAIT_MARGIN = 10.0
MAX_MESSAGE = 64 * 1024 * 1024
T = TypeVar("T")


class CoordinatorUnreachable(TetherError):
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
                        "Wait", "WatchSession", "ReadAudit"})
#: Connection failures that mean the call never left.
NOT_SENT = ("failed to connect", "connection refused", "name resolution", "dns resolution",
            "no route to host")
#: Between rounds over every address while none leads: a takeover is found within this.
RETRY_MAX = 0.25
#: A call to one of several coordinators taking longer than this makes the client ask the
#: others who leads (a paused leader answers nothing, not even HTTP/2 pings).
PROBE_EVERY = 2.0


class TimedOut(TetherError):
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
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_MESSAGE)]
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
        for channel in self._channels:
            await channel.close()

    async def _call(self, what: str, call: Callable[..., Awaitable[T]], request: Any,
                    timeout: float | None) -> T:
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
                pending = method(request, timeout=left, metadata=route.metadata())
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
                    **options: Any) -> GroupEntry:
        """Start a group; returns it once running. A start failure raises ``StartFailed``
        (``.failure``, ``.message``, and ``.group``: the failed group's entry)."""
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
        entry = entry_from_pb(await self._call("Spawn", self._stub.Spawn, req, deadline))
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
                   timeout: float | None = None) -> SessionReport:
        """Stop a session; returns once every group has a record (``complete``), or with
        what is known when ``timeout`` ends (the stop goes on in the coordinator). With
        ``groups``/``labels``, stop only those groups: the session stays active."""
        req = cpb.StopSessionRequest(session_id=session, selector=_selector(groups, labels))
        if grace is not None:
            req.grace_seconds = grace
        return report_from_pb(await self._session_call("StopSession", self._stub.StopSession,
                                                       req, session, timeout))

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
        req = cpb.GetSessionRequest(session_id=session)
        return session_from_pb(await self._session_call("GetSession", self._stub.GetSession,
                                                        req, session, timeout or 10))

    async def sessions(self, *, include_stopped: bool = False, include_groups: bool = False,
                       timeout: float | None = None) -> list[SessionView]:
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
        req = cpb.CreateSessionRequest(session_id=session, window=window, labels=labels or {},
                                       ttl_seconds=ttl)
        return session_from_pb(await self._call("CreateSession", self._stub.CreateSession, req,
                                                timeout or 10))

    async def keepalive(self, session: str, ttl: float, *, timeout: float | None = None
                        ) -> SessionView:
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
                            session: str, timeout: float | None) -> T:
        try:
            return await self._call(what, call, request, timeout)
        except NotFound as exc:
            if str(exc) != str(SessionNotFound(session)):
                raise  # something else was not found (a group or label of the session)
            raise SessionNotFound(session) from exc

    # ------------------------------------------------------------ agents

    async def agents(self, *, timeout: float | None = None) -> list[AgentState]:
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

    async def ports(self, port: int = 0, *, agent: str = "", timeout: float | None = None
                    ) -> PortReport:
        """Who holds TCP ports: listening ports (or ``port``) on every agent (or ``agent``),
        each with its group (session, label) or its process (pid, user, command)."""
        reply = await self._call("ListPorts", self._stub.ListPorts,
                                 cpb.CoordinatorListPortsRequest(port=port, agent=agent),
                                 timeout or 30)
        return PortReport(tuple(port_owner_from_pb(o) for o in reply.ports),
                          dict(reply.unreachable))


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
