"""Fencing: an agent obeys only the newest coordinator epoch it has seen.

Coordinators that share a store send their leader's epoch with every call
(``tether-epoch``). The agent remembers the newest epoch it has admitted (in its state
directory, written before the call that raised it goes on, so a restarted agent does
not forget it) and refuses calls from an older one with ``FAILED_PRECONDITION`` and
``tether-fence: NEWEST`` in the trailers; with the epoch comes the leader's lease holder
(``tether-leader-id``), and a second holder of the epoch it obeys is refused too (a
restored database that handed one epoch out twice): a paused or partitioned old leader can do no
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
import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tether.core.errors import Fenced
from tether.core.private import touch_private
from tether.rpc.auth import CALLER, RoleKind
from tether.rpc.leader import EPOCH_HEADER, FENCE_TRAILER, HOLDER_HEADER
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
        #: The lease holder of ``newest`` ("" unknown: any holder of it is obeyed, and
        #: the first one that says who it is is remembered).
        self.holder = ""
        self._lock = asyncio.Lock()
        #: An epoch obeyed but not yet in ``path`` (its write failed: a full disk);
        #: retried in the background.
        self.unsaved = 0
        self._retry: asyncio.Task[None] | None = None
        if path is not None:
            self.newest, self.holder = _read(path)

    async def admit(self, epoch: int, holder: str = "") -> None:
        """Let a call of coordinator ``epoch`` (held by ``holder``, if said) through, or
        raise ``Fenced``. Two holders of one epoch (a restored database handed it out
        twice): only the first is obeyed; the other, if the store names it, moves above."""
        if epoch < self.newest or (epoch == self.newest and self._other(holder)):
            self.on_refused()
            raise Fenced(self.agent, epoch, self.newest)
        if epoch == self.newest and holder == self.holder:
            return
        async with self._lock:
            if epoch < self.newest or (epoch == self.newest and self._other(holder)):
                self.on_refused()
                raise Fenced(self.agent, epoch, self.newest)
            if epoch > self.newest or (holder and not self.holder):
                if self.path is not None:
                    try:
                        await asyncio.to_thread(_write, self.path, epoch, holder)
                    except OSError as exc:
                        # Obey it anyway: refusing every call of the new leader while the
                        # disk is full would leave its stops undone. Until the file is
                        # written, a restarted agent would not remember this epoch.
                        log.error("agent %r: cannot write coordinator epoch %d to %s (%s); "
                                  "obeying it from memory and retrying (an agent restarted "
                                  "before it is written forgets it)", self.agent, epoch,
                                  self.path, exc)
                        self.unsaved = epoch
                        self._keep_trying()
                if epoch > self.newest:
                    log.info("agent %r: coordinator epoch %d now leads (was %d); calls of "
                             "older epochs are refused", self.agent, epoch, self.newest)
                self.newest, self.holder = epoch, holder

    def _other(self, holder: str) -> bool:
        """Not the known holder of the obeyed epoch: another one, or a call that does not
        say (a coordinator too old to send it, or one that would hide)."""
        return bool(self.holder) and holder != self.holder

    def _keep_trying(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.get_running_loop().create_task(
                self._persist(), name="fence: write the coordinator epoch")

    async def _persist(self) -> None:
        delay = 0.5
        while self.unsaved and self.path is not None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            async with self._lock:
                epoch = self.newest
                try:
                    await asyncio.to_thread(_write, self.path, epoch, self.holder)
                except OSError as exc:
                    log.warning("agent %r: still cannot write coordinator epoch %d to %s: %s",
                                self.agent, epoch, self.path, exc)
                    continue
                log.info("agent %r: coordinator epoch %d written to %s", self.agent, epoch,
                         self.path)
                if self.newest == epoch:
                    self.unsaved = 0


def _read(path: Path) -> tuple[int, str]:
    """The epoch and its holder in ``path`` (0 if there is none). Opened without blocking: a FIFO or a
    device there is refused with a message instead of hanging the agent's start."""
    advice = "remove it if the agent should obey whichever coordinator calls next"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return 0, ""
    except OSError as exc:
        raise ValueError(f"cannot read the coordinator epoch file {path}: {exc}; "
                         f"{advice}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"the coordinator epoch file {path} is not a regular file (a "
                             f"FIFO, device or socket: reading it could block forever); "
                             f"{advice}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(4096)
        found = json.loads(data)
        return int(found["epoch"]), str(found.get("holder", ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ValueError) and "not a regular file" in str(exc):
            raise
        raise ValueError(f"cannot read the coordinator epoch file {path}: {exc}; "
                         f"{advice}") from exc
    finally:
        os.close(fd)


def _write(path: Path, epoch: int, holder: str = "") -> None:
    tmp = path.with_suffix(".tmp")
    touch_private(str(tmp))
    with open(tmp, "w") as f:
        f.write(json.dumps({"epoch": epoch, "holder": holder}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _holder_of(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == HOLDER_HEADER:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            # Long ids (a long host name) are told apart by a digest of all of them, never
            # cut: two holders must not look alike by their first characters.
            return text if len(text) <= 64 else \
                "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:56]
    return ""


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
        holder = _holder_of(details.invocation_metadata)
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
                await fence.admit(epoch, holder)
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
