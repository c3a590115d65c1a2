"""The AgentService stub surface, served by an AgentServicer in this process.

`tether serve` runs the coordinator and its agent in one process and one event
loop. Dialing that agent over loopback gRPC cost, per call, two protobuf
encodings and decodings, two trips through gRPC's C core and its poller
threads, and the thread hand-offs between them: most of the CPU of a spawn and
of a 100-group stop. This stub calls the servicer's coroutines directly and
keeps the gRPC contract the coordinator relies on: deadlines become
DEADLINE_EXCEEDED, aborts and unexpected errors become ``grpc.aio.AioRpcError``
with the code and message a remote agent would have sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message

from tether.agent.service import AgentServicer

log = logging.getLogger("tether.coordinator.inprocess")


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Context:
    """The part of ``grpc.aio.ServicerContext`` the agent's servicer uses."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise rpc_error(code, details)

    def peer(self) -> str:
        return "in-process"


def _private(request: Message) -> Message:
    """The servicer may fill in defaults on its request; the caller's stays untouched."""
    copy = type(request)()
    copy.CopyFrom(request)
    return copy


class _Unary:
    def __init__(self, name: str, method: Callable[[Any, Any], Awaitable[Any]]) -> None:
        self._name = name
        self._method = method

    async def __call__(self, request: Message, timeout: float | None = None,
                       **_: Any) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await self._method(_private(request), _Context())
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"{self._name}: deadline of {timeout} s exceeded") from None
        except grpc.aio.AioRpcError:
            raise
        except Exception as exc:  # what a gRPC server turns into UNKNOWN
            log.exception("in-process %s failed", self._name)
            raise rpc_error(grpc.StatusCode.UNKNOWN, f"{self._name}: {exc}") from exc


class InProcessAgentStub:
    """Drop-in for ``AgentServiceStub`` on the coordinator's side of `tether serve`."""

    def __init__(self, servicer: AgentServicer) -> None:
        self._servicer = servicer
        for name in ("Spawn", "Adopt", "Signal", "Stop", "StopGroups", "Get", "List",
                     "ListOrphans", "Info"):
            setattr(self, name, _Unary(name, getattr(servicer, name)))

    def Watch(self, request: Message, timeout: float | None = None, **_: Any
              ) -> AsyncIterator[Any]:
        return self._servicer.Watch(_private(request), _Context())
