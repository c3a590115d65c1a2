"""Fencing: an agent obeys only the newest coordinator epoch it has seen.

Coordinators that share a store send their leader's epoch with every call
(``tether-epoch``). The agent remembers the newest epoch it has admitted (in its state
directory, written before the call that raised it goes on, so a restarted agent does
not forget it) and refuses calls from an older one with ``FAILED_PRECONDITION`` and
``tether-fence: NEWEST`` in the trailers: a paused or partitioned old leader can do no
harm, whatever it sends, reads included (it learns at once that it was replaced).

Only callers with the ``coordinator`` (or ``admin``) role move the fence: a reader
sending a huge epoch must not lock the real coordinator out. A call without the header
(an administrator calling the agent directly, a coordinator alone on SQLite) is not
fenced, except that once this agent has obeyed an epoch, a *coordinator* credential's
mutating call without one is refused: every call a leader makes carries its epoch, so
such a call comes from something that bypasses fencing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tether.core.errors import Fenced
from tether.core.private import touch_private
from tether.rpc.auth import CALLER, RoleKind
from tether.rpc.leader import EPOCH_HEADER, FENCE_TRAILER
from tether.rpc.security import wrap_handler

log = logging.getLogger(__name__)

AGENT_SERVICE = "/tether.v1.AgentService/"
#: Roles whose epoch counts (the others' header is ignored).
FENCING_ROLES = (RoleKind.COORDINATOR, RoleKind.ADMIN)
#: Calls that change something on the agent: refused from a coordinator credential
#: without an epoch once the agent has obeyed one.
MUTATING = frozenset({"Spawn", "Adopt", "Signal", "Stop", "StopGroups", "Restart", "Forget"})


class Fence:
    """The newest coordinator epoch this agent obeys; kept in ``path`` if given."""

    def __init__(self, agent: str, path: Path | None = None,
                 on_refused: Callable[[], None] = lambda: None) -> None:
        self.agent = agent
        self.path = path
        self.on_refused = on_refused
        self.newest = 0
        self._lock = asyncio.Lock()
        if path is not None and path.exists():
            try:
                self.newest = int(json.loads(path.read_text())["epoch"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"cannot read the coordinator epoch file {path}: {exc}; "
                                 "remove it if the agent should obey whichever coordinator "
                                 "calls next") from exc

    async def admit(self, epoch: int) -> None:
        """Let a call of coordinator ``epoch`` through, or raise ``Fenced``."""
        if epoch < self.newest:
            self.on_refused()
            raise Fenced(self.agent, epoch, self.newest)
        if epoch == self.newest:
            return
        async with self._lock:
            if epoch < self.newest:
                self.on_refused()
                raise Fenced(self.agent, epoch, self.newest)
            if epoch > self.newest:
                if self.path is not None:
                    await asyncio.to_thread(_write, self.path, epoch)
                log.info("agent %r: coordinator epoch %d now leads (was %d); calls of older "
                         "epochs are refused", self.agent, epoch, self.newest)
                self.newest = epoch


def _write(path: Path, epoch: int) -> None:
    tmp = path.with_suffix(".tmp")
    touch_private(str(tmp))
    with open(tmp, "w") as f:
        f.write(json.dumps({"epoch": epoch}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _epoch_of(metadata: Any) -> int | None:
    for key, value in metadata or ():
        if key == EPOCH_HEADER:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return int(text) if text.isdigit() and len(text) < 20 else -1
    return None


class FenceInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks ``tether-epoch`` on every AgentService call, after authentication."""

    def __init__(self, fence: Fence) -> None:
        self.fence = fence

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(AGENT_SERVICE):
            return handler
        epoch = _epoch_of(details.invocation_metadata)
        fence = self.fence
        method = details.method.removeprefix(AGENT_SERVICE)
        if epoch is None:
            if method not in MUTATING:
                return handler

            async def unfenced(request: Any, context: Any) -> Any:
                caller = CALLER.get()
                if fence.newest > 0 and caller is not None \
                        and caller.role.kind == RoleKind.COORDINATOR:
                    log.warning("agent %r: refused %s from a coordinator credential without "
                                "%s (obeying epoch %d)", fence.agent, method, EPOCH_HEADER,
                                fence.newest)
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"agent {fence.agent!r} obeys coordinator epoch {fence.newest}: a "
                        f"coordinator's {method} must carry {EPOCH_HEADER}",
                        trailing_metadata=((FENCE_TRAILER, str(fence.newest)),))
                return request

            return wrap_handler(handler, unfenced, handler.request_deserializer)

        async def admit(request: Any, context: Any) -> Any:
            caller = CALLER.get()
            if caller is None or caller.role.kind not in FENCING_ROLES:
                return request
            try:
                if epoch < 0:
                    raise ValueError("malformed")
                await fence.admit(epoch)
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{EPOCH_HEADER} must be a coordinator epoch (digits)")
            except Fenced as exc:
                log.warning("agent %r: refused %s from coordinator epoch %d (obeying %d)",
                            fence.agent, method, epoch, exc.newest)
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc),
                                    trailing_metadata=((FENCE_TRAILER, str(exc.newest)),))
            return request

        return wrap_handler(handler, admit, handler.request_deserializer)
