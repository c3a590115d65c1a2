"""``AsyncClient``: the coordinator's API for Python programs (asyncio).

Typed values in, typed values out (``tether.core`` dataclasses, no protobuf), and
errors as exceptions (``tether.core.errors`` plus ``CoordinatorUnreachable`` and
``TimedOut``). The `tether` CLI is built on this client; so can editors and
orchestrators be.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from tether.client.spec import build_spec
from tether.core.errors import (
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
    SessionEvent,
    SessionReport,
    SessionView,
)
from tether.rpc.convert import (
    agent_from_pb,
    entry_from_pb,
    orphan_from_pb,
    report_from_pb,
    selector_to_pb,
    session_event_from_pb,
    session_from_pb,
    spec_to_pb,
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
        super().__init__(f"coordinator {address} is unreachable ({why}); start it with "
                         "`tether serve` or point --coordinator / TETHER_COORDINATOR at it")
        self.address = address
        self.why = why


class TimedOut(TetherError):
    def __init__(self, address: str, what: str, timeout: float | None) -> None:
        after = f" within {timeout:g} s" if timeout else ""
        super().__init__(f"{what} on coordinator {address} did not answer{after}; it may "
                         "still be working on it (raise --timeout, or look with `tether show`)")
        self.address = address
        self.what = what


def _selector(groups: Sequence[str], labels: Sequence[str]) -> cpb.GroupSelector:
    if isinstance(groups, str) or isinstance(labels, str):
        raise InvalidSpec("groups and labels are lists of names, not one string",
                          field="selector")
    return selector_to_pb(GroupSelector(tuple(groups), tuple(labels)))


def default_address() -> str:
    return os.environ.get("TETHER_COORDINATOR") or DEFAULT_ADDRESS


class AsyncClient:
    """``async with AsyncClient() as c: await c.spawn(["sleep", "60"], session="s")``."""

    def __init__(self, address: str | None = None, *, token: str = "", token_file: str = "",
                 tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                 server_name: str = "", timeout: float | None = None) -> None:
        self.address = address or default_address()
        self.timeout = timeout
        security = ClientSecurity(ca=tls_ca, cert=tls_cert, key=tls_key, token_file=token_file,
                                  server_name=server_name, token=token,
                                  options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        self._channel = security.channel(self.address)
        self._stub = cgrpc.CoordinatorServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, what: str, call: Callable[..., Awaitable[T]], request: Any,
                    timeout: float | None) -> T:
        timeout = timeout if timeout is not None else self.timeout
        try:
            return await call(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, what, timeout) from exc

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
        req = cpb.CoordinatorSpawnRequest(agent=agent, spec=spec_to_pb(spec),
                                          idempotency_key=idempotency_key)
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
        """A session's events as they happen (first its current groups, with ``initial``)."""
        req = cpb.WatchSessionRequest(session_id=session, initial=initial, since_seq=since,
                                      epoch=epoch)
        stream = self._stub.WatchSession(req, timeout=timeout)
        try:
            async for msg in stream:
                yield session_event_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise SessionNotFound(session) from exc
            raise self._error(exc, "WatchSession", timeout) from exc
        finally:
            stream.cancel()

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

    async def orphans(self, *, sweep: bool = False, timeout: float | None = None
                      ) -> OrphanReport:
        reply = await self._call("ListOrphans", self._stub.ListOrphans,
                                 cpb.CoordinatorListOrphansRequest(sweep=sweep), timeout or 30)
        return OrphanReport(tuple(orphan_from_pb(o) for o in reply.orphans),
                            dict(reply.unreachable))

