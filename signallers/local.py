"""The local signaller: process groups on this host, contained as strongly as it allows.

Containment, best first:

* ``cgroup``: a cgroup v2 directory per group, joined in the child before
  exec. ``cgroup.procs`` lists every member however it escaped (setsid,
  double fork), ``cgroup.kill`` kills them atomically, and ``cgroup.events``
  reports ``populated 0`` (watched through epoll, EPOLLPRI) when the last one
  exits.
* ``subreaper``: the agent is a child subreaper, so orphaned descendants are
  re-parented to it instead of init; every child carries the ``TETHER_GROUP``
  marker in its environment, and members are found by process group, session,
  ancestry and marker. Exits are seen through pidfds.
* ``pgid``: the process group and session only; a child that calls
  ``setsid`` *and* scrubs its environment is lost. Reported honestly.

Waiting is event-driven: a pidfd per leader (readable at exit, before the
reap), cgroup.events via epoll, pidfds on every known member in the weaker
modes, SIGCHLD to reap re-parented orphans. Nothing sleeps in a loop.

PID reuse: signals go through ``pidfd_send_signal`` on a pidfd opened after
the member was identified and re-checked (cgroup membership, or start time).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

import psutil

from tether.agent.errors import AdoptRefused, StartFailed
from tether.agent.model import MARKER_ENV, Containment, FailureClass, LeaderStatus
from tether.signallers import launch
from tether.signallers.base import (
    GroupHandle,
    LaunchSpec,
    Reachability,
    SignallerContext,
)

log = logging.getLogger("tether.signallers.local")

PR_SET_CHILD_SUBREAPER: Final = 36
KILL_SWEEP_DEADLINE: Final = 10.0


# ---------------------------------------------------------------- host facts


def find_cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """The cgroup v2 mount point, wherever the host put it (``/sys/fs/cgroup`` or ``.../unified``)."""
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def read_small(path: str) -> bytes:
    """Read a small /proc or /sys file with two syscalls (pathlib costs more than the read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def own_cgroup(pid: int | str = "self") -> str:
    """This process's path in the unified hierarchy ("0::/path")."""
    with contextlib.suppress(OSError):
        for line in read_small(f"/proc/{pid}/cgroup").decode().splitlines():
            if line.startswith("0::"):
                return line[3:].strip()
    return "/"


def make_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc, or None if it does not exist."""
    try:
        stat = read_small(f"/proc/{pid}/stat")
    except OSError:
        return None
    end = stat.rindex(b")")
    return stat[end + 2 : end + 3].decode()


def alive(pid: int) -> bool:
    """Exists and is not a zombie (zombies count as dead)."""
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def marker_of(p: psutil.Process) -> str | None:
    """The TETHER_GROUP marker of a process. A process in the middle of execve shows an
    empty environment for a moment; read again (briefly) rather than miss a member."""
    for attempt in range(5):
        try:
            env = p.environ()
        except psutil.Error:
            return None
        if env:
            return env.get(MARKER_ENV)
        time.sleep(0.001 * (attempt + 1))
    return None


def signal_pid_safely(pid: int, sig: signal.Signals | Sequence[signal.Signals],
                      check: Callable[[int], bool]) -> bool:
    """Signal ``pid`` only if, with a pidfd held, ``check(pid)`` still says it is ours.
    Several signals go out in order through the same pidfd."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not check(pid):
            return False
        for s in (sig,) if isinstance(sig, signal.Signals) else sig:
            signal.pidfd_send_signal(pidfd, s)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


# ---------------------------------------------------------------- event sources


class CgroupEventWatcher:
    """One epoll over every group's cgroup.events; resolves waiters on ``populated 0``."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, tuple[Path, list[asyncio.Future[float]]]] = {}
        self._by_path: dict[Path, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._epoll.fileno(), self._on_ready)


    def wait_empty(self, cgroup: Path) -> asyncio.Future[float]:
        """A future resolved with the ``time.monotonic()`` at which the cgroup was seen empty."""
        self._ensure_reader()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        fd = self._by_path.get(cgroup)
        if fd is not None:
            self._fds[fd][1].append(fut)
        else:
            try:
                fd = os.open(cgroup / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fut.set_result(time.monotonic())  # the cgroup is gone: nothing lives in it
                return fut
            self._epoll.register(fd, select.EPOLLPRI | select.EPOLLERR)
            self._fds[fd] = (cgroup, [fut])
            self._by_path[cgroup] = fd
        # Check after registering: the cgroup may have emptied before.
        if b"populated 1" not in os.pread(fd, 256, 0):
            self._resolve(fd)
        return fut

    def _resolve(self, fd: int) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            return
        now = time.monotonic()  # when the agent learned the cgroup is empty
        for w in entry[1]:
            if not w.done():
                w.set_result(now)
        self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, OSError):
            self._epoll.unregister(fd)
        os.close(fd)
        path, _ = self._fds.pop(fd)
        self._by_path.pop(path, None)

    def _on_ready(self) -> None:
        for fd, _ in self._epoll.poll(0):
            entry = self._fds.get(fd)
            if entry is None:
                continue
            _, waiters = entry
            try:
                text = os.pread(fd, 256, 0).decode()
            except OSError:
                text = "populated 0"
            waiters[:] = [w for w in waiters if not w.done()]
            if "populated 0" in text or not waiters:
                self._resolve(fd)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._epoll.fileno())
        for fd in list(self._fds):
            for w in self._fds[fd][1]:
                w.cancel()
            self._unregister(fd)
        self._epoll.close()


async def wait_pidfds(pids: Iterable[int], timeout: float | None) -> bool:
    """Wait until every pid in ``pids`` has exited (pidfd readable). False on timeout."""
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    futs: list[asyncio.Future[None]] = []
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue  # already gone
            fds.append(fd)
            fut: asyncio.Future[None] = loop.create_future()
            futs.append(fut)

            def ready(f: asyncio.Future[None] = fut, fd: int = fd) -> None:
                loop.remove_reader(fd)
                if not f.done():
                    f.set_result(None)

            loop.add_reader(fd, ready)
        if not futs:
            return True
        _, pending = await asyncio.wait(futs, timeout=timeout)
        return not pending
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


# ---------------------------------------------------------------- the handle


class LocalGroup:
    """A group on this host. ``repr`` shows what it is: ``<LocalGroup g-1 pid=4123 cgroup>``."""

    def __init__(
        self,
        signaller: LocalSignaller,
        group_id: str,
        leader_pid: int,
        containment: Containment,
        cgroup: Path | None,
        popen: subprocess.Popen[bytes] | None,
        leader_start_time: float,
        leader_alive: bool = True,
    ) -> None:
        self._signaller = signaller
        self.group_id = group_id
        self.leader_pid = leader_pid
        self.pgid = leader_pid
        self.sid = leader_pid
        self.containment = containment
        self.cgroup = cgroup
        self.leader_start_time = leader_start_time
        self._popen = popen
        self._leader_status: LeaderStatus | None = None
        #: time.monotonic() when the cgroup was seen empty (set by wait()); None before.
        self.emptied_at: float | None = None
        loop = asyncio.get_running_loop()
        self._leader_done: asyncio.Future[LeaderStatus] = loop.create_future()
        self._pidfd: int | None = None
        try:
            if not leader_alive:
                raise ProcessLookupError(leader_pid)
            self._pidfd = os.pidfd_open(leader_pid)
        except ProcessLookupError:
            self._leader_exited()
        else:
            loop.add_reader(self._pidfd, self._leader_exited)

    def __repr__(self) -> str:
        state = "exited" if self._leader_status else "alive"
        return f"<LocalGroup {self.group_id} pid={self.leader_pid} leader {state} {self.containment.value}>"

    # -- leader

    def _leader_exited(self) -> None:
        status = LeaderStatus()
        if self._popen is not None:
            try:
                pid, raw = os.waitpid(self.leader_pid, os.WNOHANG)
            except ChildProcessError:
                pid, raw = 0, 0
            if pid:
                status = LeaderStatus.from_wait_status(raw)
                self._popen.returncode = os.waitstatus_to_exitcode(raw)
            elif self._popen.returncode is None:
                # Reaped elsewhere: the status is unknown, but the process is gone.
                self._popen.returncode = -1
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._signaller.forget_leader(self.leader_pid)
        self._leader_status = status
        if not self._leader_done.done():
            self._leader_done.set_result(status)

    @property
    def leader_status(self) -> LeaderStatus | None:
        return self._leader_status

    async def wait_leader(self) -> LeaderStatus:
        return await asyncio.shield(self._leader_done)

    # -- membership

    def _scan(self) -> dict[int, float]:
        """Weaker modes: members by pgid/session, ancestry and marker. pid -> create time."""
        found: dict[int, float] = {}
        procs: dict[int, tuple[int, float]] = {}
        for p in psutil.process_iter(["ppid", "status", "create_time"]):
            info = p.info
            if info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) or p.pid == os.getpid():
                continue
            procs[p.pid] = (info["ppid"] or 0, info["create_time"] or 0.0)
            try:
                if os.getpgid(p.pid) == self.pgid or os.getsid(p.pid) == self.sid:
                    found[p.pid] = procs[p.pid][1]
                    continue
            except OSError:
                continue
            if self.containment is Containment.SUBREAPER and marker_of(p) == self.group_id:
                found[p.pid] = procs[p.pid][1]
        # Descendants of members are members, wherever they moved their pgid.
        changed = True
        while changed:
            changed = False
            for pid, (ppid, ctime) in procs.items():
                if pid not in found and ppid in found:
                    found[pid] = ctime
                    changed = True
        if self.leader_pid in found and self._leader_status is not None:
            found.pop(self.leader_pid, None)
        return found

    def _scan_settled(self) -> dict[int, float]:
        """A scan reads a snapshot of /proc; a member alive at the snapshot may fork and die
        while the scan runs, its child missing from the snapshot. An empty result is only
        believed when a second scan, started after the first ended, agrees."""
        found = self._scan()
        return found or self._scan()

    async def members(self) -> list[int]:
        if self.cgroup is not None:
            try:
                text = read_small(f"{self.cgroup}/cgroup.procs")
            except FileNotFoundError:
                return []
            return [pid for pid in map(int, text.split()) if alive(pid)]
        return sorted(self._scan_settled())

    # -- signals

    async def send_signal(self, sig: signal.Signals) -> int:
        return await self.send_signals([sig])

    async def send_signals(self, sigs: Sequence[signal.Signals]) -> int:
        """Each signal in order to every member, one pass (TERM then CONT in a stop)."""
        if self.cgroup is not None:
            return self._signal_cgroup(sigs)
        found = self._scan_settled()

        def same(pid: int) -> bool:
            return create_time(pid) == found.get(pid)

        return sum(signal_pid_safely(pid, sigs, same) for pid in found)

    def _signal_cgroup(self, sigs: Sequence[signal.Signals]) -> int:
        """Open a pidfd on every listed member, then read the list again: a pid still listed
        while its pidfd is held is a member (a pid reused inside the cgroup is a member
        too), so no signal reaches a process that merely inherited a member's pid."""
        procs = f"{self.cgroup}/cgroup.procs"
        try:
            listed = read_small(procs).split()
        except FileNotFoundError:
            return 0
        fds: dict[bytes, int] = {}
        try:
            for pid in listed:
                with contextlib.suppress(OSError):
                    fds[pid] = os.pidfd_open(int(pid))
            try:
                still = set(read_small(procs).split()) if fds else set()
            except FileNotFoundError:
                return 0
            sent = 0
            for pid, fd in fds.items():
                if pid in still:
                    with contextlib.suppress(ProcessLookupError):
                        for s in sigs:
                            signal.pidfd_send_signal(fd, s)
                        sent += 1
            return sent
        finally:
            for fd in fds.values():
                os.close(fd)

    async def terminate(self) -> int:
        return await self.send_signal(signal.SIGTERM)

    async def kill(self) -> int:
        """SIGKILL everything, sweeping newcomers, until empty or ``KILL_SWEEP_DEADLINE``.
        Returns how many members were listed when the kills went out."""
        deadline = time.monotonic() + KILL_SWEEP_DEADLINE
        total = 0
        atomic = self.cgroup is not None and self._signaller.cgroup_kill
        while time.monotonic() < deadline:
            if atomic:
                # A batch of groups reaching their grace together is killed in one loop
                # turn: two small syscalls per group, no per-member work.
                try:
                    listed = len(read_small(f"{self.cgroup}/cgroup.procs").split())
                    if listed == 0:
                        return total
                    fd = os.open(f"{self.cgroup}/cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(fd, b"1")
                    finally:
                        os.close(fd)
                except FileNotFoundError:
                    return total  # the cgroup is gone: so is everything that was in it
                total += listed
            else:
                n = await self.send_signal(signal.SIGKILL)
                if n == 0 and not await self.members():
                    return total
                total += n
            if await self.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                return total
        return total

    async def wait(self, timeout: float | None = None) -> bool:
        if self.cgroup is not None:
            fut = self._signaller.events.wait_empty(self.cgroup)
            if not fut.done():
                try:
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(fut)
                except TimeoutError:
                    return False
            self.emptied_at = fut.result()
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pids = self._scan_settled()
            if not pids:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            await wait_pidfds(pids, remaining)

    async def close(self) -> None:
        if self._pidfd is not None:
            # Reap now if it has exited; otherwise the SIGCHLD reaper collects it later.
            self._leader_exited()
        if self.cgroup is not None:
            with contextlib.suppress(FileNotFoundError):
                try:
                    self.cgroup.rmdir()
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    log.warning("cgroup %s still busy at close; left in place", self.cgroup)


# ---------------------------------------------------------------- the signaller


def _classify_exec_error(exc: OSError, spec: LaunchSpec) -> StartFailed:
    """Map the error subprocess read from its exec error pipe to a failure class."""
    cmd = spec.argv[0]
    cwd_failed = spec.cwd and exc.filename == spec.cwd
    if cwd_failed:
        if isinstance(exc, PermissionError):
            return StartFailed(FailureClass.PERMISSION_DENIED,
                               f"cannot enter working directory {spec.cwd!r}: permission denied; "
                               "fix its permissions or choose another --cwd")
        return StartFailed(FailureClass.CWD_MISSING,
                           f"working directory {spec.cwd!r} does not exist or is not a directory; "
                           "create it or pass an existing --cwd")
    if isinstance(exc, FileNotFoundError):
        return StartFailed(FailureClass.COMMAND_NOT_FOUND,
                           f"command {cmd!r} not found; check the spelling, give an absolute path, "
                           "or add its directory to PATH (in --env, or with --inherit-env)")
    if isinstance(exc, PermissionError):
        return StartFailed(FailureClass.PERMISSION_DENIED,
                           f"command {cmd!r} is not executable by this agent's user; "
                           f"`chmod +x {cmd}` or run it through its interpreter")
    if exc.errno == errno.ENOEXEC:
        return StartFailed(FailureClass.PERMISSION_DENIED,
                           f"command {cmd!r} is not a program this host can execute (exec format "
                           "error); add a #! line or run it through its interpreter")
    if exc.errno == errno.E2BIG:
        return StartFailed(FailureClass.INVALID_SPEC,
                           f"argv and environment of {cmd!r} exceed the kernel's limit; "
                           "pass large values through a file")
    return StartFailed(FailureClass.IMMEDIATE_CRASH, f"cannot start {cmd!r}: {exc}")


class LocalSignaller:
    """Signaller for this host. One per agent; owns the cgroup tree ``tether.<agent>``."""

    kind = "local"

    def __init__(self, context: SignallerContext | None = None) -> None:
        self.context = context or SignallerContext()
        opts = self.context.options
        self.cgroup_mount = find_cgroup2_mount()
        self.cgroup_base: Path | None = None
        self.cgroup_kill = False
        self.events = CgroupEventWatcher()
        self._leaders: set[int] = set()
        self._sigchld_loop: asyncio.AbstractEventLoop | None = None
        self._reap_scheduled = False
        self._shell_usable = launch.shell_usable()
        self.subreaper = opts.get("subreaper", "1") != "0" and make_subreaper()
        wanted = opts.get("containment", "auto")
        self._containment = self._detect(wanted)
        log.info("local signaller: containment %s (asked: %s)%s", self._containment.value, wanted,
                 f", cgroups under {self.cgroup_base}" if self.cgroup_base else "")

    def _detect(self, wanted: str) -> Containment:
        if wanted not in ("auto", "cgroup", "subreaper", "pgid"):
            raise ValueError(f"containment {wanted!r} is unknown; use auto, cgroup, subreaper or pgid")
        if wanted in ("auto", "cgroup") and self.cgroup_mount is not None:
            name = "tether." + "".join(c if c.isalnum() or c in "-_" else "_"
                                       for c in self.context.agent_name)
            base = self.cgroup_mount / own_cgroup().lstrip("/") / name
            try:
                base.mkdir(exist_ok=True)
                probe = base / ".probe"
                probe.mkdir(exist_ok=True)
                probe.rmdir()
            except OSError as exc:
                log.info("cgroup v2 at %s is not writable here (%s)", self.cgroup_mount, exc)
            else:
                self.cgroup_base = base
                # cgroup.kill (Linux 5.14+) kills every member at once, setsid escapees too.
                self.cgroup_kill = (base / "cgroup.kill").exists()
                return Containment.CGROUP
        if wanted == "cgroup":
            raise RuntimeError(
                "containment 'cgroup' was asked for but no writable cgroup v2 hierarchy was found; "
                "run as root, delegate a cgroup to this user, or use --containment auto"
            )
        if wanted in ("auto", "subreaper") and self.subreaper:
            return Containment.SUBREAPER
        return Containment.PGID

    @property
    def containment(self) -> Containment:
        return self._containment

    def cgroup_for(self, group_id: str) -> Path | None:
        return None if self.cgroup_base is None else self.cgroup_base / group_id

    # -- reaping of re-parented orphans (we are their subreaper)

    def _install_sigchld(self) -> None:
        if not self.subreaper or self._sigchld_loop is not None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signal.SIGCHLD, self._sigchld)
            self._sigchld_loop = loop
            # A full wakeup pipe only means a SIGCHLD burst: one queued byte is enough to
            # reap them all, so do not print a warning per lost byte.
            fd = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(fd, warn_on_full_buffer=False)

    def _sigchld(self) -> None:
        """A burst of SIGCHLDs (a 1000-group stop) costs one reaping pass, not 1000."""
        if not self._reap_scheduled and self._sigchld_loop is not None:
            self._reap_scheduled = True
            self._sigchld_loop.call_soon(self._reap_orphans)

    def _reap_orphans(self) -> None:
        self._reap_scheduled = False
        for pid in self._children():
            if pid in self._leaders:
                continue  # its pidfd watcher reaps it and keeps the status
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    @staticmethod
    def _children() -> list[int]:
        pids: list[int] = []
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                pids.extend(int(p) for p in (task / "children").read_text().split())
        return pids

    def forget_leader(self, pid: int) -> None:
        self._leaders.discard(pid)

    # -- Signaller

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        self._install_sigchld()
        cgroup = self.cgroup_for(spec.group_id) if self._containment is Containment.CGROUP else None
        argv = list(spec.argv)
        env = dict(spec.env)
        gated = False
        if cgroup is not None:
            cgroup.mkdir(exist_ok=True)
            # A cwd that cannot be entered is left to the direct path, which names it.
            if self._shell_usable and (not spec.cwd or (os.path.isdir(spec.cwd)
                                            and os.access(spec.cwd, os.X_OK))):
                try:
                    # Exec errors are raised here, exactly as exec would give them.
                    path = launch.resolve(argv[0], env, spec.cwd or None)
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        cgroup.rmdir()
                    raise _classify_exec_error(exc, spec) from exc
                gated = launch.shim_safe(path)
        procs_fd: int | None = None
        if cgroup is not None and not gated:
            procs_fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

        def join_cgroup() -> None:  # runs in the child, between fork and exec (slow path)
            if procs_fd is not None:
                os.write(procs_fd, b"0")

        out: int | None = None
        gate_r = gate_w = -1
        try:
            if spec.log_path:
                out = os.open(spec.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o644)
            if gated:
                gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
            # A synchronous vfork+exec (about half a millisecond) on purpose: asyncio's
            # subprocess support would add a child watcher; exits are watched through pidfds.
            popen = subprocess.Popen(  # noqa: ASYNC220
                launch.shim_argv(argv, env) if gated else argv,
                cwd=spec.cwd or None,
                env=env,
                stdin=gate_r if gated else subprocess.DEVNULL,
                stdout=out if out is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=join_cgroup if procs_fd is not None else None,
                close_fds=True,
            )
        except OSError as exc:
            if gate_w >= 0:
                os.close(gate_w)
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    cgroup.rmdir()
            if out is None and spec.log_path and exc.filename == spec.log_path:
                raise StartFailed(
                    FailureClass.PERMISSION_DENIED if isinstance(exc, PermissionError)
                    else FailureClass.CWD_MISSING,
                    f"cannot open log file {spec.log_path!r}: {exc.strerror}; "
                    "create its directory or choose another --log",
                ) from exc
            raise _classify_exec_error(exc, spec) from exc
        finally:
            for fd in (procs_fd, out, gate_r):
                if fd is not None and fd >= 0:
                    os.close(fd)
        if gated:
            assert cgroup is not None
            self._release(popen, cgroup, gate_w)
        self._leaders.add(popen.pid)
        return LocalGroup(self, spec.group_id, popen.pid, self._containment, cgroup, popen,
                          create_time(popen.pid) or time.time())

    @staticmethod
    def _release(popen: subprocess.Popen[bytes], cgroup: Path, gate: int) -> None:
        """Move the waiting shell into its cgroup, then let it exec the program."""
        try:
            try:
                fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, str(popen.pid).encode())
                finally:
                    os.close(fd)
            except OSError as exc:
                popen.kill()
                popen.wait()
                with contextlib.suppress(OSError):
                    cgroup.rmdir()
                raise StartFailed(
                    FailureClass.PERMISSION_DENIED,
                    f"cannot place the group into its cgroup {cgroup}: {exc.strerror}; check "
                    "that this agent may write there, or run it with --containment subreaper",
                ) from exc
            with contextlib.suppress(BrokenPipeError):  # it died already: its exit tells
                os.write(gate, launch.GO)
        finally:
            os.close(gate)

    async def adopt(self, group_id: str, pid: int, start_time: float | None,
                    where: str) -> GroupHandle:
        self._install_sigchld()
        try:
            proc = psutil.Process(pid)
            uids = proc.uids()
            ctime = proc.create_time()
            status = proc.status()
        except psutil.NoSuchProcess:
            raise AdoptRefused(pid, "no such process (it has exited or the pid is wrong)") from None
        except psutil.AccessDenied:
            raise AdoptRefused(pid, "access denied reading it; it belongs to another user") from None
        if status == psutil.STATUS_ZOMBIE:
            raise AdoptRefused(pid, "it has already exited (zombie)")
        if os.geteuid() != 0 and uids.real != os.getuid():
            raise AdoptRefused(pid, f"it runs as uid {uids.real}, this agent as uid {os.getuid()}")
        if start_time is not None and abs(ctime - start_time) > 0.05:
            raise AdoptRefused(
                pid, f"its start time is {ctime:.2f}, not {start_time:.2f}: the pid was reused"
            )
        if pid in (os.getpid(), 1):
            raise AdoptRefused(pid, "that is the agent itself or init")
        cgroup = None
        if self._containment is Containment.CGROUP:
            cgroup = self.cgroup_for(group_id)
            assert cgroup is not None
            cgroup.mkdir(exist_ok=True)
            # Move the whole tree: leader first, then every descendant.
            try:
                tree = [proc, *proc.children(recursive=True)]
                for p in tree:
                    with contextlib.suppress(ProcessLookupError):
                        (cgroup / "cgroup.procs").write_text(str(p.pid))
            except (OSError, psutil.Error) as exc:
                raise AdoptRefused(pid, f"cannot move it into {cgroup}: {exc}") from exc
        handle = LocalGroup(self, group_id, pid, self._containment, cgroup, None, ctime)
        # Only claim the process group / session if the adopted process leads it: a
        # child of an interactive shell shares the shell's, which is not ours to end.
        with contextlib.suppress(OSError):
            handle.pgid = pid if os.getpgid(pid) == pid else -1
            handle.sid = pid if os.getsid(pid) == pid else -1
        return handle

    async def reattach(self, group_id: str, leader_pid: int, leader_start_time: float,
                       where: str) -> GroupHandle | None:
        """After an agent restart: take back a group that survived, or None if it is gone.

        The leader counts as alive only if its start time still matches (PID reuse).
        """
        self._install_sigchld()
        ctime = create_time(leader_pid)
        leader_alive = ctime is not None and abs(ctime - leader_start_time) < 0.05 \
            and alive(leader_pid)
        cgroup = self.cgroup_for(group_id) if self._containment is Containment.CGROUP else None
        if cgroup is not None and not cgroup.is_dir():
            cgroup = None if not leader_alive else cgroup
            if cgroup is not None:
                cgroup.mkdir()
                with contextlib.suppress(OSError):
                    (cgroup / "cgroup.procs").write_text(str(leader_pid))
        containment = self._containment if cgroup is not None or \
            self._containment is not Containment.CGROUP else Containment.SUBREAPER
        handle = LocalGroup(self, group_id, leader_pid, containment, cgroup, None,
                            leader_start_time, leader_alive=leader_alive)
        if ctime is not None and not leader_alive:
            # The pid now names an unrelated process: its pgid/sid are not ours.
            handle.pgid = handle.sid = -1
        if not await handle.members():
            await handle.close()
            return None
        return handle

    async def reachable(self, where: str) -> Reachability:
        return Reachability(True)

    async def aclose(self) -> None:
        if self._sigchld_loop is not None and not self._sigchld_loop.is_closed():
            self._sigchld_loop.remove_signal_handler(signal.SIGCHLD)
        self._sigchld_loop = None
        self.events.close()
        self.events = CgroupEventWatcher()
        if self.cgroup_base is not None:
            # Empty unless `keep` groups still run (then the guardian/next agent needs it).
            with contextlib.suppress(OSError):
                self.cgroup_base.rmdir()
