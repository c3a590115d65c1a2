"""The Docker Engine, as the docker signaller uses it: one API client, its own bounded
thread pool, error translation in one place, ``exec`` and the event stream.

Every blocking Docker SDK call runs on the signaller's own ``ThreadPoolExecutor``
(``ENGINE_THREADS`` workers), never on asyncio's default pool: a hung probe or file read
elsewhere in the agent never delays a Docker call, and a hung Engine never starves
them. An exec that overruns its timeout, or whose caller is cancelled, has its socket
closed so its worker is freed at once. The event stream (``exec_die``, ``die``,
``destroy``) is read by one dedicated thread per signaller and wakes asyncio waiters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from tether.core.errors import TargetUnreachable, TetherError
from tether.signallers.remote.wire import TargetGone

log = logging.getLogger("tether.signallers.docker")

ENGINE_THREADS: Final = 8
TOOL_TIMEOUT: Final = 30.0
EVENTS_CONNECT_TIMEOUT: Final = 5.0
EVENTS_BACKOFF_MAX: Final = 5.0
MAX_OUTPUT: Final = 64 * 1024 * 1024

TOOL_HINTS: Final = {
    "sh": "use an image with a POSIX shell at /bin/sh (scratch and distroless images have none)",
    "kill": "add a kill binary to the image: procps (Debian, Ubuntu) or busybox (Alpine has it)",
    "env": "add env to the image: coreutils (Debian, Ubuntu) or busybox (Alpine has it)",
}

T = TypeVar("T")


# ---------------------------------------------------------------- errors


class MissingTool(TargetUnreachable):
    """The container lacks a program tether runs inside it (``sh``, ``kill``, ``env``)."""

    def __init__(self, target: str, container: str, tool: str, detail: str = "") -> None:
        hint = TOOL_HINTS.get(tool, f"install {tool} in the image")
        extra = f" ({detail})" if detail else ""
        super().__init__(target, f"container {container!r} has no usable `{tool}`{extra}; "
                                 f"tether runs it inside the container: {hint}")
        self.container = container
        self.tool = tool


class ContainerGone(TargetGone):
    """A container that held groups stopped or was removed: every process in it ended."""

    def __init__(self, target: str, container: str, how: str) -> None:
        super().__init__(target, f"container {container!r} {how}; every process it held ended "
                                 "with it, so nothing is left to signal or inspect there")
        self.container = container


class ExecGone(TargetUnreachable):
    """The Engine forgot an exec instance (its container was removed)."""


class _TooMuchOutput(Exception):
    """An exec wrote more than ``MAX_OUTPUT`` bytes."""


def translate(exc: BaseException, target: str, container: str, host: str,
              *, known: bool) -> TetherError | None:
    """The one place where Docker SDK and transport errors become tether errors.

    ``known``: the container existed before (a handle's container), so "not found" and
    "not running" mean it went away, not that the name is wrong.
    """
    import docker.errors

    text = str(exc.explanation if isinstance(exc, docker.errors.APIError) and exc.explanation
               else exc).strip()
    lowered = text.lower()
    if isinstance(exc, _TooMuchOutput):
        return TargetUnreachable(target, f"an exec in container {container!r} wrote more than "
                                         f"{MAX_OUTPUT} bytes; its answer was not used")
    if isinstance(exc, docker.errors.NotFound):
        if "exec instance" in lowered:
            return ExecGone(target, f"the Engine no longer knows an exec in {container!r}: {text}")
        if known:
            return ContainerGone(target, container, "was removed")
        return TargetUnreachable(target, f"container {container!r} not found; start it or fix "
                                         "the name (`docker ps -a` lists containers)")
    if isinstance(exc, docker.errors.APIError):
        if exc.status_code == 409 and "paused" in lowered:
            return TargetUnreachable(target, f"container {container!r} is paused; unpause it "
                                             f"with `docker unpause {container}`")
        # 409 from most calls; an exec started as the container dies gets a 500 saying so.
        if exc.status_code in (409, 500) and ("not running" in lowered
                                              or "restarting" in lowered):
            if known:
                return ContainerGone(target, container, "stopped")
            return TargetUnreachable(target, f"container {container!r} is not running; start it "
                                             f"with `docker start {container}`")
        return TargetUnreachable(target, f"the Docker engine refused a request for container "
                                         f"{container!r}: {text}")
    if isinstance(exc, docker.errors.DockerException | OSError):
        # requests' ConnectionError / Timeout are OSErrors; SDK setup errors are DockerExceptions.
        return TargetUnreachable(target, f"the Docker engine at {host} is unreachable ({exc}); "
                                         "check that dockerd runs and that the agent's "
                                         "docker_host option (or DOCKER_HOST) points at it")
    return None


@contextlib.contextmanager
def mapped_errors(target: str, container: str, host: str, *, known: bool) -> Iterator[None]:
    try:
        yield
    except TetherError:
        raise
    except Exception as exc:
        mapped = translate(exc, target, container, host, known=known)
        if mapped is None:
            raise
        raise mapped from exc


# ---------------------------------------------------------------- exec plumbing


@dataclass(frozen=True)
class ContainerRef:
    id: str
    name: str


@dataclass(frozen=True)
class LiveExec:
    """An exec left running after its handshake with its output stream still attached
    (``Engine.exec(keep=True)``): what followed the handshake in the same reads, and the
    rest of the demultiplexed stream, (stdout, stderr) pairs, for one reader thread."""

    stream: Any
    attached: _Attached
    out: bytes = b""
    err: bytes = b""


@dataclass(frozen=True)
class ExecOutcome:
    exec_id: str
    out: bytes
    err: bytes
    # None when the exec was left running (a handshake) or the Engine did not say.
    exit_code: int | None
    #: ``keep``: the stream after the handshake (None when the exec ended before it).
    live: LiveExec | None = None

    def first_line(self) -> str:
        """The first line of output (stdout, else stderr): context for a message."""
        for blob in (self.out, self.err):
            text = blob.decode(errors="replace").strip()
            if text:
                return text.splitlines()[0]
        return ""


class _Attached:
    """An attached stream that any thread can abort; closed exactly once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: Any = None
        self._aborted = False

    def set(self, stream: Any) -> Any:
        """Hold ``stream``; returns it, or None if an abort came first (then it is closed)."""
        with self._lock:
            self._stream = stream
            aborted = self._aborted
        if aborted:
            self.close()
            return None
        return stream

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
        self.close()

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is None:
            return
        # CancellableStream.close() shuts the socket down (unblocking a reader in another
        # thread) but leaves the response's file object open; close that too, or the
        # socket is only released by the garbage collector (a ResourceWarning).
        with contextlib.suppress(Exception):
            stream.close()
        response = getattr(stream, "_response", None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()


def exit_code(api: Any, exec_id: str) -> int | None:
    """The exit code once the Engine has recorded it (the stream can end a moment before)."""
    delay = 0.005
    for _ in range(10):
        info = api.exec_inspect(exec_id)
        if not info.get("Running"):
            code = info.get("ExitCode")
            return int(code) if code is not None else None
        time.sleep(delay)
        delay *= 2
    return None


def _run_exec(api: Any, container_id: str, argv: list[str], until: bytes,
              attached: _Attached, keep: bool = False) -> ExecOutcome:
    """Blocking, on the engine pool: create and start an exec and read its output to the
    end, or, with ``until``, only until a complete line starting with it (the process
    keeps running: a start's handshake). ``keep``: leave the stream attached after the
    handshake (``ExecOutcome.live``) for the caller to read the process's output."""
    created = api.exec_create(container_id, argv, stdout=True, stderr=True)
    exec_id = str(created["Id"])
    out = bytearray()
    err = bytearray()
    cut = False
    live = None
    stream = attached.set(api.exec_start(exec_id, stream=True, demux=True))
    try:
        if stream is not None:
            for chunk_out, chunk_err in stream:
                out += chunk_out or b""
                err += chunk_err or b""
                if until:
                    at = (b"\n" + out).find(b"\n" + until)
                    if at >= 0 and b"\n" in out[at:]:
                        cut = True
                        if keep:
                            end = out.index(b"\n", at) + 1
                            live = LiveExec(stream, attached, bytes(out[end:]), bytes(err))
                            del out[end:]
                            err.clear()
                        break
                if len(out) + len(err) > MAX_OUTPUT:
                    raise _TooMuchOutput(argv[0])
    finally:
        if live is None:
            attached.close()
    return ExecOutcome(exec_id, bytes(out), bytes(err), None if cut else exit_code(api, exec_id),
                       live)


# ---------------------------------------------------------------- events


class EventWatcher:
    """One ``docker events`` stream, read by a dedicated thread; wakes asyncio waiters.

    Waiters register keys (a container id, an exec id) and get an ``asyncio.Event`` set on
    ``die`` / ``destroy`` of that container or ``exec_die`` of that exec, and on every
    (re)connection of the stream, so they re-check instead of trusting a gap.
    """

    FILTERS: Final = {"type": "container", "event": ["exec_die", "die", "destroy"]}

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._attached = _Attached()
        self._connected: asyncio.Event | None = None

    async def start(self, api: Any) -> bool:
        """Start the reader if needed; True once the stream is live (bounded wait)."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._connected = asyncio.Event()
            self._thread = threading.Thread(target=self._run, args=(api,),
                                            name="tether-docker-events", daemon=True)
            self._thread.start()
        assert self._connected is not None
        if not self._connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), EVENTS_CONNECT_TIMEOUT)
        return self._connected.is_set()

    @contextlib.asynccontextmanager
    async def listen(self, keys: Iterable[str]) -> AsyncIterator[asyncio.Event]:
        woke = asyncio.Event()
        keys = [k for k in keys if k]
        for key in keys:
            self._waiters.setdefault(key, set()).add(woke)
        try:
            yield woke
        finally:
            for key in keys:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(woke)
                    if not waiters:
                        del self._waiters[key]

    def _wake(self, keys: Iterable[str] | None) -> None:
        for key, waiters in list(self._waiters.items()):
            if keys is None or key in keys:
                for w in waiters:
                    w.set()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _set_connected(self, up: bool) -> None:
        if self._connected is None:
            return
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        self._wake(None)

    def _run(self, api: Any) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            attached = _Attached()
            self._attached = attached
            try:
                stream = attached.set(api.events(decode=True, filters=self.FILTERS))
                if stream is None or self._stop.is_set():
                    break
                self._post(self._set_connected, True)
                backoff = 0.1
                for event in stream:
                    self._dispatch(event)
            except Exception as exc:  # the stream is an accelerator; waiters also poll
                if not self._stop.is_set():
                    log.warning("docker events stream failed (%s); retrying in %.1f s", exc,
                                backoff)
            finally:
                attached.close()
                self._post(self._set_connected, False)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, EVENTS_BACKOFF_MAX)

    def _dispatch(self, event: Mapping[str, Any]) -> None:
        actor = event.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        action = str(event.get("Action") or event.get("status") or "")
        keys = {str(actor.get("ID") or event.get("id") or "")}
        if action == "exec_die":
            keys = {str(attrs.get("execID", ""))}
        self._post(self._wake, keys)

    def stop(self) -> threading.Thread | None:
        self._stop.set()
        self._attached.abort()
        thread, self._thread = self._thread, None
        return thread


# ---------------------------------------------------------------- the engine


class Engine:
    """One Engine connection per signaller, with its own pool and event stream."""

    def __init__(self, docker_host: str, explicit: bool) -> None:
        self.host = docker_host
        self._explicit = explicit
        self._pool = self._new_pool()
        self._api: Any = None
        self._api_lock = asyncio.Lock()
        self.events = EventWatcher()

    @staticmethod
    def _new_pool() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(ENGINE_THREADS,
                                                     thread_name_prefix="tether-docker")

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _connect(self) -> Any:
        import docker

        kwargs: dict[str, Any] = (
            {"base_url": self.host} if self._explicit else docker.utils.kwargs_from_env())
        url = str(kwargs.get("base_url") or "unix:///var/run/docker.sock")
        for scheme in ("unix://", "http+unix://"):
            if url.startswith(scheme):
                # Try the socket ourselves first: the SDK leaks the socket of a failed
                # connect (a ResourceWarning), and "auto" negotiates on construction.
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(5.0)
                    probe.connect(url.removeprefix(scheme))
        return docker.APIClient(version="auto", **kwargs)

    async def api(self, target: str, container: str) -> Any:
        async with self._api_lock:
            if self._api is None:
                with mapped_errors(target, container, self.host, known=False):
                    self._api = await self._blocking(self._connect)
            return self._api

    async def call(self, target: str, container: str, fn: Callable[[Any], T], *,
                   known: bool) -> T:
        """One blocking SDK call on the engine pool, its errors mapped."""
        api = await self.api(target, container)
        with mapped_errors(target, container, self.host, known=known):
            return await self._blocking(fn, api)

    async def watch(self) -> EventWatcher:
        """The event stream, started (and connected, bounded wait) once the Engine is."""
        if self._api is not None:
            await self.events.start(self._api)
        return self.events

    async def exec(self, target: str, container: ContainerRef, argv: list[str], *,
                   until: bytes = b"", timeout: float = TOOL_TIMEOUT,
                   known: bool = True, keep: bool = False) -> ExecOutcome:
        """One exec in the container; its socket is closed on timeout or cancellation.
        ``keep`` (with ``until``): its stream stays attached after the handshake
        (``ExecOutcome.live``; the caller closes it)."""
        api = await self.api(target, container.name)
        attached = _Attached()
        with mapped_errors(target, container.name, self.host, known=known):
            try:
                async with asyncio.timeout(timeout):
                    return await self._blocking(_run_exec, api, container.id, argv, until,
                                                attached, keep)
            except TimeoutError:
                attached.abort()
                raise TargetUnreachable(
                    target, f"`{argv[0]}` in container {container.name!r} did not finish within "
                            f"{timeout:g} s; check the container's load and the Docker engine"
                ) from None
            except asyncio.CancelledError:
                attached.abort()
                raise

    async def inspect(self, target: str, where: str) -> ContainerRef:
        """The container, which must exist and be running."""
        info = await self.call(target, where, lambda api: api.inspect_container(where),
                               known=False)
        state = info.get("State") or {}
        name = str(info.get("Name") or where).lstrip("/")
        if not state.get("Running") or state.get("Paused") or state.get("Restarting"):
            if state.get("Paused"):
                why = f"container {name!r} is paused; unpause it with `docker unpause {name}`"
            else:
                why = (f"container {name!r} is {state.get('Status') or 'not running'}, not "
                       f"running; start it with `docker start {name}`")
            raise TargetUnreachable(target, why)
        return ContainerRef(str(info["Id"]), name)

    async def aclose(self) -> None:
        thread = self.events.stop()
        self.events = EventWatcher()
        if thread is not None:
            await self._blocking(thread.join, 10.0)
        api, self._api = self._api, None
        if api is not None:
            await self._blocking(api.close)
        # A later call (the signaller is used again) gets a fresh pool and connection.
        pool, self._pool = self._pool, self._new_pool()
        pool.shutdown(wait=False)
