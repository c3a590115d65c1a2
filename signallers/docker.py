"""The docker signaller: process groups inside running containers, through the Engine API.

Targets are ``docker:CONTAINER`` (name or id). Everything happens through the Docker SDK
for Python (blocking calls run in threads, off the event loop) and ``exec`` inside the
container; nothing here needs the agent to share a host or a PID namespace with the
container.

Starting a group
    One ``exec`` of a fixed POSIX-sh wrapper (``_WRAPPER``); the user's argv, cwd and
    log path travel as positional parameters, never inside a shell string. runc makes
    every exec'd process the leader of a new session (pid == pgid == sid inside the
    container), so the wrapper, and the command it execs into, leads a fresh group
    without a ``setsid`` fork. The wrapper reads ``/proc/$$/stat`` (pid, pgid, sid, start
    time), checks cwd, log file and command, prints one handshake line
    (``tether:ok ...`` or ``tether:fail CLASS``), points stdio at the log (appending) or
    /dev/null and execs the command by its resolved path. Start failures are classified
    from that handshake line, or, when ``sh`` itself cannot start, from the exec's exit
    status (126/127); never from the command's output. Some exec failures no check can
    foresee (a script whose ``#!`` interpreter is missing): spawn returns only once the
    leader's ``comm`` shows the exec happened, or classifies the shell's 126/127.
    Before the first spawn in a container, tiny probe execs refuse images without ``sh``
    or ``kill`` (``MissingTool``, a ``TargetUnreachable``) before anything runs.

    The environment is exactly ``LaunchSpec.env``: Docker merges the container's
    ``Config.Env`` and its own ``PATH``/``HOSTNAME``/``HOME`` into every exec, so the
    wrapper unsets those names when the spec does not give them, and resets the ones
    a shell rewrites (``PWD``, ``OLDPWD``, ``SHLVL``, ``IFS``) to the spec's values.
    Without ``PATH`` in the spec the command is looked up in the container's PATH, and
    the child still gets no PATH.

Members and containment
    A scan (one ``exec`` of ``_SCAN``) lists every ``/proc/PID/stat`` in the container and,
    with ``grep -z``, every process whose environment carries ``TETHER_GROUP=<group>``.
    Members are live processes (zombies and dead ones excluded) in the leader's process
    group or session, carrying the marker, or descending from a member. That finds
    ``setsid`` and double-fork escapees as long as they keep the marker, the same finding
    power as the local signaller's ``subreaper`` mode, so handles report
    ``Containment.SUBREAPER``. It is weaker in one way: orphans are re-parented to the
    container's PID 1, not to the agent; a process that both leaves the session and scrubs
    its environment is lost. Images without ``grep`` get ``Containment.PGID``, reported.

Signals
    An ``exec`` of ``kill -s SIG -- -PGID PID...`` (argv; busybox, procps and util-linux
    all accept it). There is no shell fallback: an image without a ``kill`` binary is
    refused at spawn with ``MissingTool``. PID reuse: a pid is only signalled right after
    a scan found it a member (one exec round trip), and a process group is dropped once
    a stranger holds the leader's pid number with another start time.

Waiting
    Leader exit is event-driven: one ``docker events`` stream per signaller (a thread)
    wakes waiters on ``exec_die`` of their leader's exec and on the container's ``die`` /
    ``destroy``, and ``exec_inspect`` gives the exit status. While the leader runs the
    group is non-empty by definition, so no scans happen. Whether the *rest* of the tree
    is gone cannot be observed through the Docker API, so after the leader exits,
    ``wait`` re-scans with bounded exponential backoff: 50 ms doubling to 1 s while a
    stop waits on a grace period, to 5 s for open-ended waits (the agent's watcher of a
    detached group). Any event resets the backoff. Missed events (daemon restart) only
    cost latency: every wait also polls ``exec_inspect`` on the same bounded schedule.

Container gone
    Every process of a container ends with it. ``wait()`` treats a stopped or removed
    container as empty (the watcher must end); ``members``, ``send_signal`` and ``kill``
    raise ``TargetUnreachable`` saying that the container stopped or was removed, so a
    stop in progress is reported as not verified rather than guessed. The container
    itself is killed only as a last resort in ``kill()``, and only when the spec said the
    group owns it (``LaunchSpec.owns_target``).

Leader status
    containerd reports a process killed by signal N as exit status 128+N; statuses above
    128 are read as signals. A leader that *exits* with 130 is reported as SIGINT: the
    Engine API cannot tell the two apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tether.core.errors import AdoptRefused, StartFailed, TargetUnreachable, TetherError
from tether.core.model import MARKER_ENV, Containment, FailureClass, LeaderStatus, OrphanPolicy
from tether.signallers.base import (
    Features,
    GroupHandle,
    LaunchSpec,
    Reachability,
    Signaller,
    SignallerContext,
)

log = logging.getLogger("tether.signallers.docker")

POLL_FIRST: Final = 0.05
POLL_MAX_BOUNDED: Final = 1.0
POLL_MAX_UNBOUNDED: Final = 5.0
KILL_SWEEP_DEADLINE: Final = 10.0
HANDSHAKE_TIMEOUT: Final = 30.0
TOOL_TIMEOUT: Final = 30.0
EVENTS_CONNECT_TIMEOUT: Final = 5.0
MAX_OUTPUT: Final = 64 * 1024 * 1024
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")  # USER_HZ: the same kernel-wide, 100 in practice

# Names Docker adds to every exec on top of the container's Config.Env.
DOCKER_INJECTED: Final = ("PATH", "HOSTNAME", "HOME", "TERM")
# Names the wrapper shell itself rewrites; restored to the spec's value (or unset).
SHELL_REWRITTEN: Final = ("PWD", "OLDPWD", "SHLVL", "IFS")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

TOOL_HINTS: Final = {
    "sh": "use an image with a POSIX shell at /bin/sh (scratch and distroless images have none)",
    "kill": "add a kill binary to the image: procps (Debian, Ubuntu) or busybox (Alpine has it)",
}

# $1 names to unset, $2 cwd, $3 log path, $4..$7 "=VALUE" or "" for PWD OLDPWD SHLVL IFS,
# then the argv. Prints exactly one "tether:" line, then execs or exits 125.
_WRAPPER: Final = r"""
__tether_fail() { printf 'tether:fail %s\n' "$1"; exit 125; }
__tether_put() { case $2 in =*) export "$1=${2#=}" ;; *) unset "$1" ;; esac; }
set -f
read -r __tether_stat </proc/$$/stat || __tether_fail proc
__tether_btime=0
while read -r __tether_k __tether_v; do
    if [ "$__tether_k" = btime ]; then __tether_btime=$__tether_v; break; fi
done </proc/stat
if [ -n "$2" ]; then cd "$2" 2>/dev/null || __tether_fail cwd; fi
if [ -n "$3" ]; then
    [ -d "${3%/*}/" ] || __tether_fail logdir
    { : >>"$3"; } 2>/dev/null || __tether_fail log
fi
__tether_unset=$1 __tether_log=$3
__tether_pwd=$4 __tether_oldpwd=$5 __tether_shlvl=$6 __tether_ifs=$7
shift 7
case $1 in
    */*) __tether_cmd=$1 ;;
    *)
        __tether_cmd=
        IFS=:
        for __tether_d in ${PATH-}; do
            if [ -f "${__tether_d:-.}/$1" ] && [ -x "${__tether_d:-.}/$1" ]; then
                __tether_cmd=${__tether_d:-.}/$1
                break
            fi
        done
        [ -n "$__tether_cmd" ] || __tether_fail notfound
        ;;
esac
IFS=' '
[ -e "$__tether_cmd" ] || __tether_fail notfound
[ -f "$__tether_cmd" ] && [ -x "$__tether_cmd" ] || __tether_fail denied
shift
unset $__tether_unset
__tether_put PWD "$__tether_pwd"
__tether_put OLDPWD "$__tether_oldpwd"
__tether_put SHLVL "$__tether_shlvl"
printf 'tether:ok %s %s\n' "$__tether_btime" "$__tether_stat"
if [ -n "$__tether_log" ]; then
    exec >>"$__tether_log" 2>&1 </dev/null
else
    exec >/dev/null 2>&1 </dev/null
fi
__tether_put IFS "$__tether_ifs"
exec "$__tether_cmd" "$@"
"""

# $1 "TETHER_GROUP=<group>" (or empty: no marker search). Output lines:
#   "P <scanner pid>", "B <btime>", "S <stat line>" per process, "/proc/<pid>/environ"
#   per marked process, "G" if the image has no grep.
_SCAN: Final = r"""
printf 'P %s\n' "$$"
while read -r __tether_k __tether_v; do
    if [ "$__tether_k" = btime ]; then printf 'B %s\n' "$__tether_v"; break; fi
done </proc/stat
for __tether_d in /proc/[0-9]*; do
    read -r __tether_s 2>/dev/null <"$__tether_d/stat" && printf 'S %s\n' "$__tether_s"
done
if [ -n "$1" ]; then
    if command -v grep >/dev/null 2>&1; then
        grep -lsxzF -e "$1" /proc/[0-9]*/environ
    else
        printf 'G\n'
    fi
fi
exit 0
"""


# $1 a pid: its stat line, or nothing if it is gone.
_STAT: Final = r"""
read -r __tether_s 2>/dev/null </proc/$1/stat && printf '%s\n' "$__tether_s"
exit 0
"""

EXEC_CONFIRM_TIMEOUT: Final = 2.0


# ---------------------------------------------------------------- errors


class MissingTool(TargetUnreachable):
    """The container lacks a program tether runs inside it (``sh``, ``kill``)."""

    def __init__(self, target: str, container: str, tool: str, detail: str = "") -> None:
        hint = TOOL_HINTS.get(tool, f"install {tool} in the image")
        extra = f" ({detail})" if detail else ""
        super().__init__(target, f"container {container!r} has no usable `{tool}`{extra}; "
                                 f"tether runs it inside the container: {hint}")
        self.container = container
        self.tool = tool


class ContainerGone(TargetUnreachable):
    """A container that held groups stopped or was removed: every process in it ended."""

    def __init__(self, target: str, container: str, how: str) -> None:
        super().__init__(target, f"container {container!r} {how}; every process it held ended "
                                 "with it, so nothing is left to signal or inspect there")
        self.container = container


class _ExecGone(TargetUnreachable):
    """The Engine forgot an exec instance (its container was removed)."""


def _explanation(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return str(text).strip()


def translate(exc: BaseException, target: str, container: str, host: str,
              *, known: bool) -> TetherError | None:
    """The one place where Docker SDK / transport errors become tether errors.

    ``known``: the container existed before (a handle's container), so "not found" and
    "not running" mean it went away, not that the name is wrong.
    """
    import docker.errors

    if isinstance(exc, docker.errors.NotFound):
        text = _explanation(exc)
        if "exec instance" in text.lower():
            return _ExecGone(target, f"the Engine no longer knows an exec in {container!r}: {text}")
        if known:
            return ContainerGone(target, container, "was removed")
        return TargetUnreachable(target, f"container {container!r} not found; start it or fix "
                                         "the name (`docker ps -a` lists containers)")
    if isinstance(exc, docker.errors.APIError):
        text = _explanation(exc)
        lowered = text.lower()
        if exc.status_code == 409 and "paused" in lowered:
            return TargetUnreachable(target, f"container {container!r} is paused; unpause it "
                                             f"with `docker unpause {container}`")
        if exc.status_code == 409 and ("not running" in lowered or "restarting" in lowered):
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


# ---------------------------------------------------------------- /proc parsing


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    ppid: int
    pgrp: int
    sid: int
    start_ticks: int
    comm: str = ""

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X", "x")

    @classmethod
    def parse(cls, line: str) -> ProcStat | None:
        """A ``/proc/PID/stat`` line; None if it is truncated (a comm with a newline)."""
        head, sep, tail = line.rpartition(")")
        if not sep:
            return None
        pid_text, _, comm = head.partition(" (")
        fields = tail.split()
        try:
            return cls(int(pid_text.strip()), fields[0], int(fields[1]), int(fields[2]),
                       int(fields[3]), int(fields[19]), comm)
        except (ValueError, IndexError):
            return None


@dataclass(frozen=True)
class Scan:
    procs: Mapping[int, ProcStat]
    marked: frozenset[int]
    scanner: int
    btime: int
    has_grep: bool

    @classmethod
    def parse(cls, text: str) -> Scan:
        procs: dict[int, ProcStat] = {}
        marked: set[int] = set()
        scanner = btime = 0
        has_grep = True
        for line in text.splitlines():
            if line.startswith("S "):
                st = ProcStat.parse(line[2:])
                if st is not None:
                    procs[st.pid] = st
            elif line.startswith("/proc/") and line.endswith("/environ"):
                with contextlib.suppress(ValueError):
                    marked.add(int(line.split("/")[2]))
            elif line.startswith("P "):
                scanner = int(line[2:])
            elif line.startswith("B "):
                btime = int(line[2:])
            elif line == "G":
                has_grep = False
        # The scan's own shell and its grep are not anybody's members.
        mine = {scanner} | {p.pid for p in procs.values() if p.ppid == scanner}
        return cls({pid: st for pid, st in procs.items() if pid not in mine},
                   frozenset(marked - mine), scanner, btime, has_grep)

    def members(self, pgid: int, sid: int, leader_pid: int, leader_ticks: int) -> dict[int, ProcStat]:
        """Live members: same group or session, the marker, or a member's descendant."""
        leader = self.procs.get(leader_pid)
        if leader is not None and leader.start_ticks != leader_ticks:
            # The leader's pid number belongs to a stranger now: our group and session are
            # empty (the kernel keeps a pid while it names a live group), so only the marker
            # and ancestry can still find members.
            pgid = sid = -1
        found: dict[int, ProcStat] = {}
        for pid, st in self.procs.items():
            if not st.alive:
                continue
            if ((pgid > 1 and st.pgrp == pgid) or (sid > 1 and st.sid == sid)
                    or pid in self.marked):
                found[pid] = st
        changed = True
        while changed:
            changed = False
            for pid, st in self.procs.items():
                if pid not in found and st.alive and st.ppid in found:
                    found[pid] = st
                    changed = True
        return found


def status_from_exit_code(code: int | None) -> LeaderStatus:
    if code is None:
        return LeaderStatus()
    if code > 128:
        with contextlib.suppress(ValueError):
            return LeaderStatus(signal=int(signal.Signals(code - 128)))
    return LeaderStatus(exit_code=code)


# ---------------------------------------------------------------- exec plumbing


@dataclass(frozen=True)
class ExecOutcome:
    exec_id: str
    out: bytes
    err: bytes
    # None when the exec was left running (a handshake) or the Engine did not say.
    exit_code: int | None

    def first_line(self) -> str:
        """The first line of output (stdout, else stderr): context for a message, not a class."""
        for blob in (self.out, self.err):
            text = blob.decode(errors="replace").strip()
            if text:
                return text.splitlines()[0]
        return ""


class _Attached:
    """An attached exec stream that any thread can abort; closed exactly once."""

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


def _exit_code(api: Any, exec_id: str) -> int | None:
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


def _run_exec(api: Any, container_id: str, argv: list[str], env: Mapping[str, str] | None,
              handshake: bool, attached: _Attached) -> ExecOutcome:
    """Blocking: create and start an exec, read its output. Runs in a worker thread.

    With ``handshake`` the stream is closed after the first stdout line and the process
    keeps running; otherwise the output is read to the end and the exit code fetched.
    """
    created = api.exec_create(container_id, argv, stdout=True, stderr=True,
                              environment=dict(env) if env is not None else None)
    exec_id = str(created["Id"])
    out = bytearray()
    err = bytearray()
    stream = attached.set(api.exec_start(exec_id, stream=True, demux=True))
    try:
        if stream is not None:
            for chunk_out, chunk_err in stream:
                if chunk_out:
                    out += chunk_out
                if chunk_err:
                    err += chunk_err
                if handshake and b"\n" in out:
                    break
                if len(out) + len(err) > MAX_OUTPUT:
                    raise RuntimeError(f"exec {argv[0]!r} wrote more than {MAX_OUTPUT} bytes")
    finally:
        attached.close()
    code: int | None = None
    if not handshake or b"\n" not in out:
        code = _exit_code(api, exec_id)
    return ExecOutcome(exec_id, bytes(out), bytes(err), code)


# ---------------------------------------------------------------- events


class _EventWatcher:
    """One ``docker events`` stream per signaller, read by a thread; wakes asyncio waiters.

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
        if keys is None:
            for waiters in self._waiters.values():
                for w in waiters:
                    w.set()
            return
        for key in keys:
            for w in self._waiters.get(key, ()):
                w.set()

    def _post(self, fn: Any, *args: Any) -> None:
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
            backoff = min(backoff * 2, POLL_MAX_UNBOUNDED)

    def _dispatch(self, event: Mapping[str, Any]) -> None:
        actor = event.get("Actor") or {}
        attrs = actor.get("Attributes") or {}
        action = str(event.get("Action") or event.get("status") or "")
        container_id = str(actor.get("ID") or event.get("id") or "")
        keys = [container_id]
        if action == "exec_die":
            keys = [str(attrs.get("execID", ""))]
        self._post(self._wake, keys)

    async def aclose(self) -> None:
        self._stop.set()
        self._attached.abort()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 10.0)


# ---------------------------------------------------------------- the handle


@dataclass(frozen=True)
class ContainerRef:
    id: str
    name: str
    env_names: frozenset[str]


class DockerGroup(GroupHandle):
    """A group inside a container: ``<DockerGroup g-1 docker:web pid=12 alive subreaper>``."""

    def __init__(self, signaller: DockerSignaller, group_id: str, target: str,
                 container: ContainerRef, leader_pid: int, pgid: int, sid: int,
                 start_ticks: int, btime: int, exec_id: str | None, containment: Containment,
                 owns_target: bool) -> None:
        self._signaller = signaller
        self.group_id = group_id
        self.target = target
        self.container = container
        self.leader_pid = leader_pid
        self.pgid = pgid
        self.sid = sid
        self.containment = containment
        self.owns_target = owns_target
        self.exec_id = exec_id
        self._start_ticks = start_ticks
        self.leader_start_time = btime + start_ticks / CLK_TCK
        self._leader_status: LeaderStatus | None = None
        self._marker = f"{MARKER_ENV}={group_id}"
        # One scan exec at a time per group: the agent's watcher and a stop both scan, and a
        # stop that reports done must not leave the watcher's scan running in the container.
        self._scan_lock = asyncio.Lock()
        self._closed = False
        self.log = logging.LoggerAdapter(log, {"group": group_id, "container": container.name,
                                               "pid": leader_pid})

    def __repr__(self) -> str:
        state = "exited" if self._leader_status is not None else "alive"
        return (f"<DockerGroup {self.group_id} {self.target} pid={self.leader_pid} {state} "
                f"{self.containment.value}>")

    # -- leader

    @property
    def leader_status(self) -> LeaderStatus | None:
        return self._leader_status

    async def _leader_exited(self) -> bool:
        """Check (one Engine call) whether the leader has exited; records its status."""
        if self._leader_status is not None:
            return True
        if self.exec_id is None:  # adopted: no exec to inspect, look for the pid itself
            scan = await self._scan(marker=False)
            st = scan.procs.get(self.leader_pid)
            if st is not None and st.alive and st.start_ticks == self._start_ticks:
                return False
            self._leader_status = LeaderStatus()
            return True
        exec_id = self.exec_id
        try:
            info = await self._signaller.call(self.target, self.container.name,
                                              lambda api: api.exec_inspect(exec_id), known=True)
        except _ExecGone:
            self._leader_status = LeaderStatus()
            return True
        if info.get("Running"):
            return False
        code = info.get("ExitCode")
        self._leader_status = status_from_exit_code(int(code) if code is not None else None)
        return True

    async def wait_leader(self) -> LeaderStatus:
        delay = POLL_FIRST
        events = await self._signaller.events()
        async with events.listen([self.container.id, self.exec_id or ""]) as woke:
            while True:
                woke.clear()
                try:
                    if await self._leader_exited():
                        assert self._leader_status is not None
                        return self._leader_status
                except ContainerGone:
                    self._leader_status = LeaderStatus()
                    return self._leader_status
                except TargetUnreachable as exc:
                    self.log.warning("cannot check the leader (%s); retrying", exc.why)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woke.wait(), delay)
                delay = POLL_FIRST if woke.is_set() else min(delay * 2, POLL_MAX_UNBOUNDED)

    # -- membership

    async def _scan(self, marker: bool = True) -> Scan:
        async with self._scan_lock:
            return await self._signaller.scan(self.target, self.container,
                                              self._marker if marker else "", known=True)

    async def _members(self) -> dict[int, ProcStat]:
        if self._closed:
            return {}  # the authority is done with this group: no more execs for it
        scan = await self._scan()
        return scan.members(self.pgid, self.sid, self.leader_pid, self._start_ticks)

    async def members(self) -> list[int]:
        return sorted(await self._members())

    # -- signals

    async def send_signals(self, sigs: Sequence[signal.Signals]) -> int:
        n = 0
        for sig in sigs:
            n = max(n, await self.send_signal(sig))
        return n

    async def send_signal(self, sig: signal.Signals) -> int:
        found = await self._members()
        if not found:
            return 0
        targets: list[str] = []
        if self.pgid > 1 and any(st.pgrp == self.pgid for st in found.values()):
            targets.append(f"-{self.pgid}")
        targets += [str(pid) for pid, st in sorted(found.items())
                    if pid > 1 and not (self.pgid > 1 and st.pgrp == self.pgid)]
        if targets:
            await self._signaller.kill_in(self.target, self.container, sig, targets, known=True)
        return len(found)

    async def terminate(self) -> int:
        return await self.send_signal(signal.SIGTERM)

    async def kill(self) -> int:
        """SIGKILL every member, sweeping newcomers, until empty or ``KILL_SWEEP_DEADLINE``.

        If members still survive then and the group owns its container, the container is
        killed: the last resort, never taken by default.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KILL_SWEEP_DEADLINE
        total = 0
        while loop.time() < deadline:
            n = await self.send_signal(signal.SIGKILL)
            if n == 0:
                return total
            total += n
            if await self.wait(min(1.0, max(0.0, deadline - loop.time()))):
                return total
        if self.owns_target and await self._members():
            self.log.warning("members of %s survived SIGKILL for %g s; the group owns container "
                             "%r, killing the container", self.group_id, KILL_SWEEP_DEADLINE,
                             self.container.name)
            cid = self.container.id
            await self._signaller.call(self.target, self.container.name,
                                       lambda api: api.kill(cid), known=True)
        return total

    async def _empty(self) -> bool:
        if not await self._leader_exited():
            return False  # a running leader is a member
        return not await self._members()

    async def wait(self, timeout: float | None = None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        cap = POLL_MAX_UNBOUNDED if timeout is None else POLL_MAX_BOUNDED
        delay = POLL_FIRST
        warned = False
        events = await self._signaller.events()
        async with events.listen([self.container.id, self.exec_id or ""]) as woke:
            while True:
                woke.clear()
                try:
                    if await self._empty():
                        return True
                except ContainerGone:
                    return True
                except TargetUnreachable as exc:
                    if not warned:
                        self.log.warning("cannot check whether %s is empty (%s); retrying until "
                                         "the deadline", self.group_id, exc.why)
                        warned = True
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return False
                pause = delay if remaining is None else min(delay, remaining)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woke.wait(), pause)
                delay = POLL_FIRST if woke.is_set() else min(delay * 2, cap)

    async def close(self) -> None:
        """The group has ended. Wait for a scan still in flight (the watcher's, say), so
        that a stop reported done leaves no tether exec running in the container, and scan
        no more."""
        self._closed = True
        async with self._scan_lock:
            pass


# ---------------------------------------------------------------- the signaller


class DockerSignaller(Signaller):
    """Signaller for ``docker:CONTAINER`` targets. One Engine connection per agent."""

    kind = "docker"
    features = Features()

    def __init__(self, context: SignallerContext | None = None) -> None:
        self.context = context or SignallerContext()
        self.docker_host = self.context.options.get("docker_host", "") or os.environ.get(
            "DOCKER_HOST", "unix:///var/run/docker.sock")
        self._explicit_host = bool(self.context.options.get("docker_host"))
        self._api: Any = None
        self._api_lock = asyncio.Lock()
        self._events = _EventWatcher()
        self._tools: dict[str, bool] = {}  # container id -> has grep (kill was checked)

    @property
    def containment(self) -> Containment:
        return Containment.SUBREAPER

    def __repr__(self) -> str:
        return f"<DockerSignaller {self.docker_host}>"

    # -- Engine plumbing

    def _connect(self) -> Any:
        import docker

        kwargs: dict[str, Any] = (
            {"base_url": self.docker_host} if self._explicit_host
            else docker.utils.kwargs_from_env())
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
                with mapped_errors(target, container, self.docker_host, known=False):
                    self._api = await asyncio.to_thread(self._connect)
            return self._api

    async def call(self, target: str, container: str, fn: Callable[[Any], Any], *,
                   known: bool) -> Any:
        """Run one blocking SDK call in a thread, its errors mapped."""
        api = await self.api(target, container)
        with mapped_errors(target, container, self.docker_host, known=known):
            return await asyncio.to_thread(fn, api)

    async def events(self) -> _EventWatcher:
        """The events watcher, started (and connected, bounded wait) once the Engine is."""
        if self._api is not None:
            await self._events.start(self._api)
        return self._events

    async def exec(self, target: str, container: ContainerRef, argv: list[str], *,
                   env: Mapping[str, str] | None = None, handshake: bool = False,
                   timeout: float = TOOL_TIMEOUT, known: bool) -> ExecOutcome:
        """One exec in the container; aborted (socket closed) on timeout or cancellation."""
        api = await self.api(target, container.name)
        attached = _Attached()
        with mapped_errors(target, container.name, self.docker_host, known=known):
            try:
                return await asyncio.wait_for(
                    asyncio.to_thread(_run_exec, api, container.id, argv, env, handshake,
                                      attached),
                    timeout)
            except TimeoutError:
                attached.abort()
                raise TargetUnreachable(
                    target, f"`{argv[0]}` in container {container.name!r} did not finish within "
                            f"{timeout:g} s; check the container's load and the Docker engine"
                ) from None
            except asyncio.CancelledError:
                attached.abort()
                raise

    async def inspect(self, target: str, where: str, *, known: bool = False) -> ContainerRef:
        """The container, which must exist and be running."""
        info = await self.call(target, where, lambda api: api.inspect_container(where),
                               known=known)
        state = info.get("State") or {}
        name = str(info.get("Name") or where).lstrip("/")
        if not state.get("Running") or state.get("Paused") or state.get("Restarting"):
            status = state.get("Status") or "not running"
            if state.get("Paused"):
                why = f"container {name!r} is paused; unpause it with `docker unpause {name}`"
            else:
                why = (f"container {name!r} is {status}, not running; start it with "
                       f"`docker start {name}`")
            raise TargetUnreachable(target, why)
        env = (info.get("Config") or {}).get("Env") or []
        names = frozenset(str(item).partition("=")[0] for item in env)
        return ContainerRef(str(info["Id"]), name, names)

    async def check_tools(self, target: str, container: ContainerRef) -> bool:
        """Refuse containers without ``sh`` or ``kill`` before anything runs; True if grep is there.

        Three tiny execs, run once per container (cached by id).
        """
        cached = self._tools.get(container.id)
        if cached is not None:
            return cached
        sh_probe, kill_probe, grep_probe = await asyncio.gather(
            self.exec(target, container, ["sh", "-c", ":"], known=True),
            self.exec(target, container, ["kill", "-l"], known=True),
            self.exec(target, container, ["grep", "-q", "tether", "/dev/null"], known=True))
        if sh_probe.exit_code in (126, 127):
            raise MissingTool(target, container.name, "sh", sh_probe.first_line())
        if kill_probe.exit_code in (126, 127):
            raise MissingTool(target, container.name, "kill", kill_probe.first_line())
        has_grep = grep_probe.exit_code not in (126, 127)
        if not has_grep:
            log.warning("container %r has no grep: setsid escapees cannot be found by their "
                        "marker there; groups in it are held by process group only",
                        container.name)
        self._tools[container.id] = has_grep
        return has_grep

    async def scan(self, target: str, container: ContainerRef, marker: str, *,
                   known: bool) -> Scan:
        result = await self.exec(target, container, ["sh", "-c", _SCAN, "tether-scan", marker],
                                 known=known)
        if result.exit_code in (126, 127) and not result.out.startswith(b"P "):
            raise MissingTool(target, container.name, "sh", result.first_line())
        return Scan.parse(result.out.decode(errors="replace"))

    async def kill_in(self, target: str, container: ContainerRef, sig: signal.Signals,
                      targets: list[str], *, known: bool) -> None:
        if any(t in ("-1", "0", "1", "-0") for t in targets):
            raise ValueError(f"refusing to signal {targets} in {container.name!r}: not members")
        name = sig.name.removeprefix("SIG")
        result = await self.exec(target, container, ["kill", "-s", name, "--", *targets],
                                 known=known)
        if result.exit_code in (126, 127):
            raise MissingTool(target, container.name, "kill", result.first_line())
        if result.exit_code not in (0, 1, None):
            log.warning("kill -s %s %s in container %r exited %s: %s", name, " ".join(targets),
                        container.name, result.exit_code, result.first_line())

    # -- Signaller

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        where = spec.where
        target = f"docker:{where}"
        if not where:
            raise TargetUnreachable(target, "no container given; use a target like docker:NAME")
        container = await self.inspect(target, where)
        await self.events()  # subscribe before anything can exit
        has_grep = await self.check_tools(target, container)
        env = dict(spec.env)
        unset = sorted(n for n in container.env_names.union(DOCKER_INJECTED)
                       if n not in env and n not in SHELL_REWRITTEN and _IDENTIFIER.match(n))
        restore = [("=" + env[n]) if n in env else "" for n in SHELL_REWRITTEN]
        argv = ["sh", "-c", _WRAPPER, "tether", " ".join(unset), spec.cwd, spec.log_path,
                *restore, *spec.argv]
        try:
            result = await self.exec(target, container, argv, env=env, handshake=True,
                                     timeout=HANDSHAKE_TIMEOUT, known=True)
        except (TargetUnreachable, asyncio.CancelledError):
            # The wrapper may have started anyway: nothing of an abandoned start may live on.
            await asyncio.shield(self._sweep_marker(target, container, spec.group_id))
            raise
        line = result.out.decode(errors="replace").partition("\n")[0].strip()
        if line.startswith("tether:ok "):
            _, btime_text, stat_text = line.split(" ", 2)
            st = ProcStat.parse(stat_text)
            if st is None:
                raise StartFailed(FailureClass.IMMEDIATE_CRASH,
                                  f"could not read the start handshake from container "
                                  f"{container.name!r}: {line!r}")
            # runc makes every exec a session leader; if a runtime did not, hold the group
            # by marker and ancestry only instead of claiming somebody else's group.
            pgid = st.pid if st.pgrp == st.pid else -1
            sid = st.pid if st.sid == st.pid else -1
            await self._confirm_exec(target, container, st, result.exec_id, spec)
            return DockerGroup(self, spec.group_id, target, container, st.pid, pgid, sid,
                               st.start_ticks, int(btime_text), result.exec_id,
                               Containment.SUBREAPER if has_grep else Containment.PGID,
                               spec.owns_target)
        if line.startswith("tether:fail "):
            raise self._start_failure(line.split()[1], spec, container.name)
        if result.exit_code in (126, 127):
            raise MissingTool(target, container.name, "sh", result.first_line())
        raise StartFailed(FailureClass.IMMEDIATE_CRASH,
                          f"the start wrapper in container {container.name!r} ended without a "
                          f"handshake (exit {result.exit_code}): {result.first_line()!r}")

    async def _confirm_exec(self, target: str, container: ContainerRef, wrapper: ProcStat,
                            exec_id: str, spec: LaunchSpec) -> None:
        """Return once the wrapper has become the command; classify an exec that failed.

        The checks cannot foresee every exec failure (a script whose ``#!`` interpreter is
        missing, a binary for another architecture); the shell then exits 126/127. The
        exec is confirmed when the leader's ``comm`` is no longer the wrapper's ``sh``.
        The handshake line comes microseconds before the exec, and this check is an exec
        round trip later, so the first look nearly always settles it; otherwise it looks
        again with bounded backoff (5 ms doubling, at most ``EXEC_CONFIRM_TIMEOUT``).
        """
        if os.path.basename(spec.argv[0])[:15] == wrapper.comm:
            return  # the command is itself called "sh": comm cannot tell, and sh execs fine
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXEC_CONFIRM_TIMEOUT
        delay = 0.005
        while True:
            out = await self.exec(target, container,
                                  ["sh", "-c", _STAT, "tether-stat", str(wrapper.pid)],
                                  known=True)
            now = ProcStat.parse(out.out.decode(errors="replace").strip())
            if now is None or now.start_ticks != wrapper.start_ticks or not now.alive:
                break  # the leader already ended: its exit code tells how
            if now.comm != wrapper.comm or loop.time() > deadline:
                return
            await asyncio.sleep(delay)
            delay *= 2
        info = await self.call(target, container.name, lambda api: _exit_code(api, exec_id),
                               known=True)
        if info in (126, 127):
            failure = (FailureClass.COMMAND_NOT_FOUND if info == 127
                       else FailureClass.PERMISSION_DENIED)
            raise StartFailed(failure, (
                f"command {spec.argv[0]!r} could not be executed in container {container.name!r} "
                f"(exit {info} from the exec); if it is a script, check that its #! interpreter "
                "exists in the image"))

    @staticmethod
    def _start_failure(kind: str, spec: LaunchSpec, container: str) -> StartFailed:
        cmd = spec.argv[0]
        where = f"in container {container!r}"
        match kind:
            case "notfound":
                return StartFailed(FailureClass.COMMAND_NOT_FOUND,
                                   f"command {cmd!r} not found {where}; check the spelling, give "
                                   "an absolute path, install it in the image, or pass a PATH "
                                   "in --env")
            case "denied":
                return StartFailed(FailureClass.PERMISSION_DENIED,
                                   f"command {cmd!r} {where} is not an executable file; "
                                   f"`chmod +x` it in the image or run it through its interpreter")
            case "cwd":
                return StartFailed(FailureClass.CWD_MISSING,
                                   f"working directory {spec.cwd!r} does not exist {where} (or "
                                   "cannot be entered); create it or pass an existing --cwd")
            case "logdir":
                return StartFailed(FailureClass.CWD_MISSING,
                                   f"the directory of log file {spec.log_path!r} does not exist "
                                   f"{where}; create it or choose another --log")
            case "log":
                return StartFailed(FailureClass.PERMISSION_DENIED,
                                   f"cannot append to log file {spec.log_path!r} {where}; fix its "
                                   "permissions or choose another --log")
            case _:
                return StartFailed(FailureClass.IMMEDIATE_CRASH,
                                   f"cannot start {cmd!r} {where}: the wrapper could not read "
                                   f"/proc ({kind}); is /proc mounted in the container?")

    async def _sweep_marker(self, target: str, container: ContainerRef, group_id: str) -> None:
        with contextlib.suppress(TetherError):
            scan = await self.scan(target, container, f"{MARKER_ENV}={group_id}", known=True)
            pids = [str(p) for p in sorted(scan.marked) if p > 1 and scan.procs.get(p)]
            if pids:
                log.warning("killing %d process(es) of abandoned start %s in container %r",
                            len(pids), group_id, container.name)
                await self.kill_in(target, container, signal.SIGKILL, pids, known=True)

    async def adopt(self, group_id: str, pid: int, start_time: float | None, where: str,
                    policy: OrphanPolicy = OrphanPolicy.KILL) -> GroupHandle:
        target = f"docker:{where}"
        if pid <= 1:
            raise AdoptRefused(pid, f"pid {pid} is the init of container {where!r}; stop the "
                                    "container instead")
        container = await self.inspect(target, where)
        await self.events()
        has_grep = await self.check_tools(target, container)
        scan = await self.scan(target, container, f"{MARKER_ENV}={group_id}", known=True)
        st = scan.procs.get(pid)
        if st is None:
            raise AdoptRefused(pid, f"no such process in container {container.name!r} (it has "
                                    "exited or the pid is wrong; pids are the container's own)")
        if not st.alive:
            raise AdoptRefused(pid, "it has already exited (zombie)")
        started = scan.btime + st.start_ticks / CLK_TCK
        if start_time is not None and abs(started - start_time) > 0.05:
            raise AdoptRefused(pid, f"its start time is {started:.2f}, not {start_time:.2f}: "
                                    "the pid was reused")
        containment = (Containment.SUBREAPER if has_grep and pid in scan.marked
                       else Containment.PGID)
        return DockerGroup(self, group_id, target, container, pid,
                           pid if st.pgrp == pid else -1, pid if st.sid == pid else -1,
                           st.start_ticks, scan.btime, None, containment, False)

    # Kept for the signaller tests until the remote toolkit replaces them.
    async def reachable(self, where: str) -> Reachability:
        target = f"docker:{where}"
        try:
            await self.inspect(target, where)
        except TargetUnreachable as exc:
            return Reachability(False, exc.why)
        return Reachability(True)

    async def aclose(self) -> None:
        await self._events.aclose()
        self._events = _EventWatcher()
        api, self._api = self._api, None
        if api is not None:
            await asyncio.to_thread(api.close)
