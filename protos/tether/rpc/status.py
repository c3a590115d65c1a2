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

log = logging.getLogger("tether.grpc")

CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (e.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.IdempotencyConflict, grpc.StatusCode.ALREADY_EXISTS),
    (e.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WatchOverflow, grpc.StatusCode.ABORTED),
    (e.InvalidSpec, grpc.StatusCode.INVALID_ARGUMENT),
    (e.SignallerNotFound, grpc.StatusCode.INVALID_ARGUMENT),
    (e.GroupNotFound, grpc.StatusCode.NOT_FOUND),
    (e.SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (e.AgentNotFound, grpc.StatusCode.NOT_FOUND),
    (e.AdoptRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (e.Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (e.TargetUnreachable, grpc.StatusCode.UNAVAILABLE),
    (e.AgentUnreachable, grpc.StatusCode.UNAVAILABLE),
    (e.StartFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (IllegalTransition, grpc.StatusCode.FAILED_PRECONDITION),
    (e.TetherError, grpc.StatusCode.INTERNAL),
]



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
            await context.abort(status_for(exc), str(exc))
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
            await context.abort(status_for(exc), str(exc))

    return wrapper
