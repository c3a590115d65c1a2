"""Which coordinator answers a call: the leader serves, a standby redirects.

A server interceptor in front of CoordinatorService, after authentication. While this
coordinator leads (and has loaded the state), calls go through. Otherwise every call
gets ``UNAVAILABLE`` with the leader's address in the ``tether-leader`` trailer, and
clients go there (``tether.rpc.leader``); reads (``GetSession``, ``ListSessions``,
``ListAgents``) from a client that could not reach the leader (``tether-stale-ok``)
are answered from the store (``standby.py``).

Redirect, not forward: a forwarded call would reach the leader under the standby's
credential, not the caller's (roles, name bindings and the audit log are per caller,
and a client certificate cannot be forwarded); a forwarded stream would break with
either of two processes; and when the leader dies there is nobody to forward to, so
clients need the other addresses anyway.

A call that was being served when this coordinator stopped leading (lease lost, store
gone, shutdown) ends with ``UNAVAILABLE``, the new leader's address if known and
``tether-interrupted: 1``: the client retries what is safe to retry there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import grpc

from tether.coordinator.leader import Leadership
from tether.rpc.leader import (
    INTERRUPTED_TRAILER,
    LEADER_TRAILER,
    REDIRECTED,
    STALE_OK_HEADER,
)
from tether.rpc.security import handler_kind
from tether.v1 import coordinator_pb2 as cpb

log = logging.getLogger(__name__)

SERVICE = "/tether.v1.CoordinatorService/"
Read = Callable[[Any, Any], Awaitable[Any]]


class Control(Protocol):
    """What the gate asks of the daemon."""

    #: Read calls a standby answers itself, by method name.
    reads: Mapping[str, Read]

    async def serving(self) -> Leadership | None:
        """The current term if this coordinator leads and serves (waits while it loads)."""
        ...

    def still(self, lead: Leadership) -> bool:
        """Whether ``lead`` is still the term this coordinator serves under."""
        ...

    def leader_address(self) -> str: ...

    def leader_info(self) -> cpb.LeaderInfo: ...

    def describe(self) -> str:
        """This coordinator, for messages (its address, "a standby")."""
        ...


class LeaderGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, control: Control) -> None:
        self.control = control

    async def _refuse(self, context: Any, method: str) -> None:
        REDIRECTED.set(True)
        leader = self.control.leader_address()
        where = (f"the leader is at {leader}: call it there (clients given several "
                 "--coordinator addresses follow it)") if leader else \
            "no coordinator leads right now (a failover, or the store does not answer): " \
            "retry in a few seconds"
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"{method}: {self.control.describe()} does not lead; {where}",
                            trailing_metadata=((LEADER_TRAILER, leader),))

    async def _interrupted(self, context: Any, method: str, lead: Leadership) -> None:
        leader = self.control.leader_address()
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{method}: this coordinator stopped leading (epoch {lead.epoch}) while serving "
            f"the call; it may have been partly done. "
            + (f"The leader is now at {leader}: retry there" if leader else
               "Retry in a few seconds, once another coordinator leads"),
            trailing_metadata=((LEADER_TRAILER, leader), (INTERRUPTED_TRAILER, "1")))

    def _gone(self, lead: Leadership) -> bool:
        """The term ended under the call (not: the client went away)."""
        task = asyncio.current_task()
        return not self.control.still(lead) and not (task is not None and task.cancelling())

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(SERVICE):
            return handler
        name = method.removeprefix(SERVICE)
        control = self.control
        kind = handler_kind(handler)
        if name == "GetLeader":
            async def leader_info(request: Any, context: Any) -> Any:
                return control.leader_info()

            return grpc.unary_unary_rpc_method_handler(
                leader_info, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        # A standby answers a read itself only for a client that could not reach the
        # leader: everyone else reads from the leader what they just wrote there.
        stale_ok = any(k == STALE_OK_HEADER for k, _ in details.invocation_metadata or ())
        read = control.reads.get(name) if stale_ok else None

        if kind == "unary_unary":
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                lead = await control.serving()
                if lead is None:
                    if read is not None:
                        return await read(request, context)
                    await self._refuse(context, name)
                assert lead is not None
                try:
                    return await inner(request, context)
                except BaseException:
                    if self._gone(lead) and not _aborted(context):
                        await self._interrupted(context, name, lead)
                    raise

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        if kind in ("unary_stream", "stream_stream"):  # OpenLease (a lease lives on the
            # leader only), Attach, Logs, the watches: one request or a stream of them
            inner_stream = getattr(handler, kind)

            async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
                lead = await control.serving()
                if lead is None:
                    await self._refuse(context, name)
                assert lead is not None
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException:
                    if self._gone(lead) and not _aborted(context):
                        await self._interrupted(context, name, lead)
                    raise
                if self._gone(lead):  # the stream ended because the term did
                    await self._interrupted(context, name, lead)

            make = (grpc.unary_stream_rpc_method_handler if kind == "unary_stream"
                    else grpc.stream_stream_rpc_method_handler)
            return make(streamed, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        return handler  # CoordinatorService has no other kind of call


def _aborted(context: Any) -> bool:
    """Whether the servicer already answered with a status (abort sends it at once)."""
    try:
        code = context.code()
    except Exception:
        return False
    return code is not None and code != grpc.StatusCode.OK
