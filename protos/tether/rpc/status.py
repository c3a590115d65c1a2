"""Domain errors <-> gRPC status codes, in one place for every servicer and client."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tether.core import errors as e
from tether.core.events import WatchOverflow
from tether.core.model import IllegalTransition

log = logging.getLogger(__name__)

CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (e.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (e.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WatchOverflow, grpc.StatusCode.ABORTED),
    (e.InvalidSpec, grpc.StatusCode.INVALID_ARGUMENT),
    (e.SignallerNotFound, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (e.AdoptRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (e.Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (e.TargetUnreachable, grpc.StatusCode.UNAVAILABLE),
    (e.NotLeader, grpc.StatusCode.UNAVAILABLE),
    (e.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (e.Fenced, grpc.StatusCode.FAILED_PRECONDITION),
    (e.AgentUnreachable, grpc.StatusCode.UNAVAILABLE),
    (e.StartFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (IllegalTransition, grpc.StatusCode.FAILED_PRECONDITION),
    (e.TetherError, grpc.StatusCode.INTERNAL),
]


#: The other way: what a caller of a tether daemon makes of a status code.
FROM_CODES: dict[grpc.StatusCode, type[e.TetherError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: e.InvalidSpec,
    grpc.StatusCode.NOT_FOUND: e.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: e.Conflict,
    grpc.StatusCode.ALREADY_EXISTS: e.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: e.ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: e.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: e.PermissionDenied,
}
#: Codes that mean "not reached" (or not in time): the call may be retried.
UNREACHED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def error_from_rpc(code: grpc.StatusCode, details: str,
                   agent: tuple[str, str] | None = None) -> e.TetherError:
    """The domain error for a status a daemon answered with. For calls to an agent
    (``agent`` = (name, address)), not reaching it, or being refused by it (a credential
    problem an operator fixes while the caller retries), is ``AgentUnreachable``."""
    if agent is not None and (code in UNREACHED or code in (
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)):
        why = details if code in UNREACHED else f"it refused our credentials: {details}"
        return e.AgentUnreachable(agent[0], agent[1], why)
    cls = FROM_CODES.get(code)
    if cls is not None:
        return cls(details)
    if agent is not None:
        return e.TetherError(f"agent {agent[0]!r}: {details}")
    return e.TetherError(f"{code.name}: {details}")


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """A coordinator that stopped leading during a call names the leader (see
    ``tether.rpc.leader``): the client retries there. An agent that did not answer is
    named, so that the client does not take the leader for gone."""
    from tether.rpc.leader import AGENT_TRAILER, INTERRUPTED_TRAILER, LEADER_TRAILER

    if isinstance(exc, e.NotLeader):
        return ((LEADER_TRAILER, exc.leader), (INTERRUPTED_TRAILER, "1"))
    if isinstance(exc, e.AgentUnreachable):
        # UNAVAILABLE, but from a coordinator that answered: not a reason to look for
        # another coordinator (the agent is down, not the leader).
        return ((AGENT_TRAILER, exc.name),)
    return ()


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


R = TypeVar("R")


def unary(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Wrap a unary servicer method: tether errors become statuses with their message."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except (e.TetherError, IllegalTransition) as exc:
            await context.abort(status_for(exc), str(exc), trailing_metadata=trailers_for(exc))
            raise  # unreachable: abort raises
        except ValueError as exc:  # e.g. protobuf field range errors from our conversions
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
            raise

    return wrapper


def stream(fn: Callable[..., AsyncIterator[R]]) -> Callable[..., AsyncIterator[R]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[R]:
        try:
            async for item in fn(self, request, context):
                yield item
        except (e.TetherError, IllegalTransition) as exc:
            await context.abort(status_for(exc), str(exc), trailing_metadata=trailers_for(exc))
        except ValueError as exc:  # e.g. a timestamp out of range in a request
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")

    return wrapper


#: Initial-metadata key a watch stream sends once its subscription is in place.
SUBSCRIBED = "tether-subscribed"


async def subscribed(context: grpc.aio.ServicerContext, seq: int, epoch: str) -> None:
    """Tell a watcher its subscription is in place (initial metadata ``epoch:seq``), before
    any event: a client waits for this instead of guessing when it may act."""
    await context.send_initial_metadata(((SUBSCRIBED, f"{epoch}:{seq}"),))
