"""``Client``: the same API as ``AsyncClient`` for programs without an event loop.

Calls run on a private event loop in a background thread; each method blocks until
its call is done and raises what the async call raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from tether.client.aio import AsyncClient, Leader
from tether.client.aio import Attachment as AsyncAttachment
from tether.client.lease import AsyncWindow
from tether.core.audit import AuditEntry
from tether.core.model import GroupSpec
from tether.core.output import OutputChunk
from tether.core.sessions import (
    AgentState,
    GroupEntry,
    LeaseState,
    OrphanReport,
    PortReport,
    SessionEvent,
    SessionReport,
    SessionView,
)

T = TypeVar("T")


class Client:
    """``with Client() as c: c.spawn(["sleep", "60"], session="s")``."""

    def __init__(self, address: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tether-client",
                                        daemon=True)
        self._thread.start()
        self._async = self._run(_make(address, options))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    @property
    def aio(self) -> AsyncClient:
        """The ``AsyncClient`` underneath (its calls run on this client's thread)."""
        return self._async

    def spawn(self, argv: Sequence[str] | GroupSpec, **kw: Any) -> GroupEntry:
        return self._run(self._async.spawn(argv, **kw))

    def adopt(self, pid: int, **kw: Any) -> GroupEntry:
        return self._run(self._async.adopt(pid, **kw))

    def signal(self, session: str, signal: str, **kw: Any) -> SessionReport:
        return self._run(self._async.signal(session, signal, **kw))

    def stop(self, session: str, **kw: Any) -> SessionReport:
        return self._run(self._async.stop(session, **kw))

    def restart(self, session: str, **kw: Any) -> SessionReport:
        return self._run(self._async.restart(session, **kw))

    def forget(self, session: str, **kw: Any) -> list[str]:
        return self._run(self._async.forget(session, **kw))

    def wait(self, session: str, **kw: Any) -> SessionReport:
        return self._run(self._async.wait(session, **kw))

    def session(self, session: str, **kw: Any) -> SessionView:
        return self._run(self._async.session(session, **kw))

    def sessions(self, **kw: Any) -> list[SessionView]:
        return self._run(self._async.sessions(**kw))

    def create_session(self, session: str, **kw: Any) -> SessionView:
        return self._run(self._async.create_session(session, **kw))

    def window(self, session: str, **kw: Any) -> Window:
        """``with c.window("editor-window-1", lease_grace=5) as w: w.spawn([...])``: see
        ``AsyncClient.window``; the lease is renewed on this client's background thread."""
        return Window(self, self._async.window(session, **kw))

    def keepalive(self, session: str, ttl: float, **kw: Any) -> SessionView:
        return self._run(self._async.keepalive(session, ttl, **kw))

    def agents(self, **kw: Any) -> list[AgentState]:
        return self._run(self._async.agents(**kw))

    def forget_agent(self, name: str, **kw: Any) -> list[str]:
        return self._run(self._async.forget_agent(name, **kw))

    def orphans(self, **kw: Any) -> OrphanReport:
        return self._run(self._async.orphans(**kw))

    def leader(self, **kw: Any) -> Leader:
        return self._run(self._async.leader(**kw))

    def audit(self, **kw: Any) -> list[AuditEntry]:
        return self._run(self._async.audit(**kw))


    def ports(self, port: int = 0, **kw: Any) -> PortReport:
        return self._run(self._async.ports(port, **kw))

    def watch(self, session: str, **kw: Any) -> Iterator[SessionEvent]:
        return self._iterate(self._async.watch(session, **kw))

    def logs(self, session: str, **kw: Any) -> Iterator[OutputChunk]:
        """``AsyncClient.logs``, as an iterator (closing it ends the call)."""
        return self._iterate(self._async.logs(session, **kw))

    def attach(self, session: str, group: str, **kw: Any) -> Attachment:
        """``AsyncClient.attach``: ``with c.attach(s, g, write=True) as a: a.write(b"..")``."""
        return Attachment(self, self._run(self._async.attach(session, group, **kw)))

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await anext(stream)

        async def close() -> None:
            await stream.aclose()  # type: ignore[attr-defined]

        try:
            while True:
                try:
                    yield self._run(step())
                except StopAsyncIteration:
                    return
        finally:
            ending = close()
            try:
                self._run(ending)
            finally:  # a client closed first cannot run it: no "never awaited" warning
                with contextlib.suppress(RuntimeError, ValueError):
                    ending.close()


class Window:
    """A session held by a lease stream while the ``with`` block lasts (``Client.window``).
    The lease is renewed on the client's background thread: nothing to call."""

    def __init__(self, client: Client, inner: AsyncWindow) -> None:
        self._client = client
        self.aio = inner

    def __repr__(self) -> str:
        return repr(self.aio).replace("AsyncWindow", "Window", 1)

    def __enter__(self) -> Window:
        self._client._run(self.aio.open())
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._client._run(self.aio.close(raise_errors=exc_type is None))

    @property
    def session(self) -> str:
        """The session this window holds."""
        return self.aio.session

    @property
    def resume_token(self) -> str:
        """The token that takes this lease back (keep it like a password)."""
        return self.aio.resume_token

    @property
    def state(self) -> LeaseState | None:
        """The last lease state the coordinator sent."""
        return self.aio.state

    @property
    def report(self) -> SessionReport | None:
        """The session's stop report, once the block was left."""
        return self.aio.report

    @property
    def lost(self) -> bool:
        return self.aio.lost

    def spawn(self, argv: Sequence[str] | GroupSpec, **kw: Any) -> GroupEntry:
        """``Client.spawn`` into this window's session."""
        return self._client._run(self.aio.spawn(argv, **kw))

    def view(self) -> SessionView:
        return self._client._run(self.aio.view())

    def wait_lost(self, timeout: float | None = None) -> str:
        """Block until the lease is lost (returns why), or raise ``TimeoutError``."""
        async def wait() -> str:
            async with asyncio.timeout(timeout):
                return await self.aio.wait_lost()

        return self._client._run(wait())


class Attachment:
    """A group's stdio, attached (``Client.attach``): ``write``, ``close_stdin``, ``read``
    (the next ``OutputChunk``, None at the end; ``timeout`` in seconds raises
    ``TimeoutError``), iteration, ``close`` (or leaving ``with``) detaches."""

    def __init__(self, client: Client, inner: AsyncAttachment) -> None:
        self._client = client
        self._inner = inner

    @property
    def writer(self) -> bool:
        return self._inner.writer

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[OutputChunk]:
        while (chunk := self.read()) is not None:
            yield chunk

    def write(self, data: bytes) -> None:
        self._client._run(self._inner.write(data))

    def close_stdin(self) -> None:
        self._client._run(self._inner.close_stdin())

    def read(self, timeout: float | None = None) -> OutputChunk | None:
        async def bounded() -> OutputChunk | None:
            async with asyncio.timeout(timeout):
                return await self._inner.read()

        return self._client._run(bounded())

    def close(self) -> None:
        self._client._run(self._inner.close())


async def _make(address: str | None, options: dict[str, Any]) -> AsyncClient:
    return AsyncClient(address, **options)
