"""Start a program inside its cgroup without fork()ing the agent.

Joining a cgroup "in the child before exec" means a ``preexec_fn``, and a
``preexec_fn`` makes ``subprocess`` fork() the whole agent (tens of MB, several
threads) and run Python in the child: several times slower than vfork() (README,
Benchmarks). (clone3's ``CLONE_INTO_CGROUP`` is the kernel's answer, but Python does
not expose it.)

So the agent vforks a tiny ``/bin/sh`` that waits on its stdin, writes the
shell's pid into the group's ``cgroup.procs`` itself, and only then lets it go:
the shell execs the real program, same pid, already in the cgroup, before any
user code ran. Spawn returns with the leader inside its cgroup.

What the shell would change is undone: it exports ``PWD`` (unset unless the
spec sets it), it searches a different default ``PATH`` (set to Python's, not
exported), and it runs a file without a ``#!`` line as a script (such files,
and anything else the shim cannot vouch for, take the direct path). Exec errors
are found before the shim runs by the same search ``subprocess`` does, so
"command not found" and "not executable" are reported exactly as exec gives them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import socket
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tether.core.errors import InvalidSpec, StartFailed
from tether.core.model import FailureClass, StdinMode
from tether.signallers import cgroups
from tether.signallers.base import LaunchSpec, RunAs
from tether.signallers.limits import Limiter, Placement, remove_v1

SHELL = "/bin/sh"

#: Read the go-ahead on stdin; without it (the agent gave up), exit without running anything.
_GATE = 'read -r go && [ "$go" = go ] && exec "$@" </dev/null'
#: With ``--stdin pipe`` the gate pipe is the program's stdin: the agent writes the
#: go-ahead into it first (``read`` takes one line, byte by byte, and not a byte more),
#: then keeps it open for writers.
_GATE_KEEP_STDIN = 'read -r go && [ "$go" = go ] && exec "$@"'
GO = b"go\n"


def shell_usable() -> bool:
    return os.access(SHELL, os.X_OK)


def _candidates(cmd: str, env: Mapping[str, str], cwd: str | None) -> list[str]:
    if os.sep in cmd:
        return [os.path.join(cwd, cmd) if cwd else cmd]
    return [os.path.join(d, cmd) for d in os.get_exec_path(dict(env))]


def resolve(cmd: str, env: Mapping[str, str], cwd: str | None) -> str:
    """The file ``execve`` would run for ``cmd``, found the way ``subprocess`` searches PATH:
    the first candidate that is an executable regular file. Otherwise the OSError exec would
    give: EACCES if some candidate exists but cannot be executed, else ENOENT."""
    denied = False
    for path in _candidates(cmd, env, cwd):
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.EACCES:
                denied = True
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return path
        denied = True
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), cmd)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cmd)


def shim_safe(path: str) -> bool:
    """True when exec of ``path`` will succeed as a program: an ELF binary, or a ``#!``
    script whose interpreter exists and is executable. Anything else (no ``#!`` line, an
    unreadable file, binfmt_misc formats) takes the direct path, whose errors are exact."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    if head.startswith(b"\x7fELF"):
        return True
    if not head.startswith(b"#!"):
        return False
    words = head[2:].split(b"\n", 1)[0].split()
    if not words:
        return False
    interp = os.fsdecode(words[0])
    return os.path.isabs(interp) and os.path.isfile(interp) and os.access(interp, os.X_OK)


def shim_argv(argv: Sequence[str], env: Mapping[str, str], keep_stdin: bool = False
              ) -> list[str]:
    """``sh -c GATE tether-launch argv...``: the shell's ``exec "$@"`` runs ``argv`` as given
    (argv[0] unchanged), with the spec's environment and nothing added."""
    prelude = []
    if "PWD" not in env:
        prelude.append("unset PWD")
    if "PATH" not in env:
        prelude.append("PATH=" + shlex.quote(os.defpath))  # not exported: the search path only
    script = "; ".join([*prelude, _GATE_KEEP_STDIN if keep_stdin else _GATE])
    return [SHELL, "-c", script, "tether-launch", *argv]


# ---------------------------------------------------------------- start failures


def classify_exec_error(exc: OSError, spec: LaunchSpec) -> StartFailed:
    """Map the error subprocess read from its exec error pipe to a failure class."""
    cmd = spec.argv[0]
    who = f"user {spec.user.name}" if spec.user is not None else "this agent's user"
    if spec.cwd and exc.filename == spec.cwd:
        if isinstance(exc, PermissionError):
            return StartFailed(FailureClass.PERMISSION_DENIED,
                               f"cannot enter working directory {spec.cwd!r}: permission denied; "
                               "fix its permissions or choose another --cwd")
        return StartFailed(FailureClass.CWD_MISSING,
                           f"working directory {spec.cwd!r} does not exist or is not a directory; "
                           "create it or pass an existing --cwd")
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
        return StartFailed(FailureClass.RESOURCE_EXHAUSTED,
                           f"cannot start {cmd!r}: {exc.strerror} (the agent or host is out of "
                           "file descriptors, processes or memory); raise the limit "
                           "(LimitNOFILE/LimitNPROC, ulimit) or stop some groups")
    if isinstance(exc, FileNotFoundError):
        return StartFailed(FailureClass.COMMAND_NOT_FOUND,
                           f"command {cmd!r} not found; check the spelling, give an absolute path, "
                           "or add its directory to PATH (in --env, or with --inherit-env)")
    if isinstance(exc, PermissionError):
        return StartFailed(FailureClass.PERMISSION_DENIED,
                           f"command {cmd!r} is not executable by {who}; "
                           f"`chmod +x {cmd}`, check the directories on its path, or run it "
                           "through its interpreter")
    if exc.errno == errno.ENOEXEC:
        return StartFailed(FailureClass.PERMISSION_DENIED,
                           f"command {cmd!r} is not a program this host can execute (exec format "
                           "error); add a #! line or run it through its interpreter")
    if exc.errno == errno.E2BIG:
        return StartFailed(FailureClass.INVALID_SPEC,
                           f"argv and environment of {cmd!r} exceed the kernel's limit; "
                           "pass large values through a file")
    return StartFailed(FailureClass.IMMEDIATE_CRASH, f"cannot start {cmd!r}: {exc}")


LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def _file_kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "not a regular file")


def open_log(path: str) -> int:
    """Open a log file for appending; only a regular file (or a new one) is accepted. The
    open never blocks (O_NONBLOCK): a FIFO without a reader fails at once instead of
    hanging the launch, and is refused like a device or a directory."""
    flags = LOG_FLAGS
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EISDIR):
            raise _not_a_file(path, "a FIFO or socket" if exc.errno == errno.ENXIO
                              else "a directory") from exc
        raise StartFailed(
            FailureClass.PERMISSION_DENIED if isinstance(exc, PermissionError)
            else FailureClass.CWD_MISSING,
            f"cannot open log file {path!r}: {exc.strerror}; create its directory or choose "
            "another --log",
        ) from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_a_file(path, _file_kind(mode))
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _not_a_file(path: str, kind: str) -> StartFailed:
    return StartFailed(FailureClass.INVALID_SPEC,
                       f"log path {path!r} is {kind}, not a regular file; tether appends a "
                       "group's output to a file: give a file path (it is created if missing)")


# ---------------------------------------------------------------- run as another user


def _as_user(spec: LaunchSpec, user: RunAs, procs_fds: Sequence[int], err: int,
             log_to: socket.socket | None = None) -> Callable[[], None]:
    """The child's last steps before exec (after fork, so only plain syscalls): join the
    cgroups (while still root: the files were opened by the agent), then setgroups,
    setresgid, setresuid, and only then, as the user, enter the working directory and open
    the log, so both are checked with the user's permissions and the log is the user's.
    With ``log_to`` (output captured by the agent) the log is sent there (SCM_RIGHTS)
    for the agent to append to, never reopened by path as root. A failure writes
    ``stage:errno`` to ``err`` for the agent to name it."""
    cwd, log_path = spec.cwd, spec.log_path
    groups = list(user.groups)

    def child() -> None:
        stage = "cgroup"
        try:
            for fd in procs_fds:
                os.write(fd, b"0")
            stage = "user"
            os.setgroups(groups)
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            if cwd:
                stage = "cwd"
                os.chdir(cwd)
            if log_path:
                stage = "log"
                fd = os.open(log_path, LOG_FLAGS, 0o644)
                mode = os.fstat(fd).st_mode
                if not stat.S_ISREG(mode):
                    stage = f"notfile:{mode}"
                    raise OSError(errno.EINVAL, "not a regular file")
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                if log_to is not None:
                    socket.send_fds(log_to, [b"log"], [fd])
                else:
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.write(err, f"{stage}:{exc.errno}".encode())
            raise

    return child


def _child_error(data: bytes, spec: LaunchSpec) -> StartFailed | None:
    """What ``_as_user`` reported, as a start failure naming the user and the object."""
    if not data:
        return None
    user = spec.user.name if spec.user is not None else "?"
    stage, _, rest = data.decode(errors="replace").partition(":")
    if stage == "notfile":
        mode_text, _, _ = rest.partition(":")
        kind = _file_kind(int(mode_text)) if mode_text.isdigit() else "not a regular file"
        return _not_a_file(spec.log_path, kind)
    code = int(rest) if rest.lstrip("-").isdigit() else 0
    why = os.strerror(code) if code else "unknown error"
    if stage == "cgroup":
        return StartFailed(FailureClass.PERMISSION_DENIED,
                           f"cannot place the group into its cgroup: {why}; check that this "
                           "agent may write there, or run it with --containment subreaper")
    if stage == "user":
        return StartFailed(FailureClass.PERMISSION_DENIED,
                           f"cannot switch to user {user}: {why}; the agent must run as root "
                           "to start groups as another user")
    if stage == "cwd":
        if code in (errno.EACCES, errno.EPERM):
            return StartFailed(FailureClass.PERMISSION_DENIED,
                               f"user {user} cannot enter working directory {spec.cwd!r} "
                               f"({why}); fix its permissions or choose another --cwd")
        return StartFailed(FailureClass.CWD_MISSING,
                           f"working directory {spec.cwd!r} does not exist or is not a "
                           f"directory ({why}); create it or pass an existing --cwd")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StartFailed(FailureClass.PERMISSION_DENIED,
                           f"user {user} cannot write log file {spec.log_path!r} ({why}); "
                           "give it a path that user may write, or fix the permissions")
    if code in (errno.ENXIO, errno.EISDIR):
        return _not_a_file(spec.log_path, "a FIFO or socket" if code == errno.ENXIO
                           else "a directory")
    return StartFailed(FailureClass.CWD_MISSING,
                       f"cannot open log file {spec.log_path!r} as user {user}: {why}; create "
                       "its directory or choose another --log")


# ---------------------------------------------------------------- the launch (a thread)


@dataclass
class Launched:
    popen: subprocess.Popen[bytes]
    #: Where the group's limits live (v1 cgroups to remove when it ends).
    placement: Placement = field(default_factory=Placement)
    #: ``LaunchSpec.capture``: the agent's ends, (stdout, stderr, stdin or -1, log or -1).
    pipes: tuple[int, int, int, int] | None = None

    def close_pipes(self) -> None:
        for fd in self.pipes or ():
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pipes = None


def _discard(cgroup: Path | None, placement: Placement) -> None:
    if cgroup is not None:
        with contextlib.suppress(OSError):
            cgroups.remove(cgroup)
    remove_v1(placement.v1)


def start(spec: LaunchSpec, cgroup: Path | None, shell_ok: bool,
          limiter: Limiter | None = None) -> Launched:
    """Runs on the launch pool: everything here may block (stat, open, vfork)."""
    argv = list(spec.argv)
    env = dict(spec.env)
    gated = False
    placement = Placement()
    if spec.limits and (cgroup is None or limiter is None):
        raise StartFailed(FailureClass.INVALID_SPEC,
                          "limits need cgroup containment, which this agent does not have")
    if cgroup is not None:
        try:
            cgroup.mkdir(exist_ok=True)
        except OSError as exc:
            raise StartFailed(
                FailureClass.TARGET_UNREACHABLE,
                f"cannot create the group's cgroup {cgroup}: {exc.strerror}; the agent's cgroup "
                "tree is gone or not writable (removed by hand?): restart the agent") from exc
        if spec.limits:
            assert limiter is not None
            try:
                placement = limiter.prepare(spec.group_id, cgroup, spec.limits)
            except InvalidSpec as exc:
                _discard(cgroup, placement)
                raise StartFailed(FailureClass.INVALID_SPEC, str(exc)) from exc
        # A cwd that cannot be entered is left to the direct path, which names it; an
        # argv[0] that looks like an option would be one to the shell's `exec`. A group
        # run as another user takes the direct path: its exec errors are the user's.
        if spec.user is None and shell_ok and not argv[0].startswith("-") and (
                not spec.cwd or (os.path.isdir(spec.cwd) and os.access(spec.cwd, os.X_OK))):
            try:
                # Exec errors are raised here, exactly as exec would give them.
                path = resolve(argv[0], env, spec.cwd or None)
            except OSError as exc:
                _discard(cgroup, placement)
                raise classify_exec_error(exc, spec) from exc
            gated = shim_safe(path)
    procs_fds: list[int] = []
    out: int | None = None
    gate_r = gate_w = err_r = err_w = -1
    piped = spec.capture and spec.stdin is StdinMode.PIPE
    ours: list[int] = []  # the agent's pipe ends (kept on success)
    theirs: list[int] = []  # the child's (closed here once it has them)
    log_back: tuple[socket.socket, socket.socket] | None = None
    started = False
    try:
        if cgroup is not None and not gated:
            for f in (*placement.procs_files, cgroup / "cgroup.procs"):
                procs_fds.append(os.open(f, os.O_WRONLY | os.O_CLOEXEC))
        if spec.log_path and spec.user is None:
            out = open_log(spec.log_path)  # captured: the agent's tee appends to it
        if spec.capture:
            for _ in range(2):
                r, w = os.pipe2(os.O_CLOEXEC)
                ours.append(r)
                theirs.append(w)
            if spec.log_path and spec.user is not None:
                log_back = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        if piped:
            # The program's stdin; when gated, the gate reads its go-ahead from it first.
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        elif gated:
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        preexec: Callable[[], None] | None = None
        if spec.user is not None:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            preexec = _as_user(spec, spec.user, procs_fds, err_w,
                               log_back[1] if log_back is not None else None)
        elif procs_fds:
            def join_cgroup() -> None:  # runs in the child, between fork and exec (slow path)
                for fd in procs_fds:
                    os.write(fd, b"0")

            preexec = join_cgroup

        popen = subprocess.Popen(
            shim_argv(argv, env, keep_stdin=piped) if gated else argv,
            # As another user, the child enters its cwd itself, after dropping privileges.
            cwd=(spec.cwd or None) if spec.user is None else None,
            env=env,
            stdin=gate_r if gate_r >= 0 else subprocess.DEVNULL,
            stdout=theirs[0] if theirs else out if out is not None else subprocess.DEVNULL,
            stderr=theirs[1] if theirs else subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
            close_fds=True,
        )
        started = True
    except BaseException as exc:
        for fd in (gate_w, *ours, *([out] if spec.capture and out is not None else [])):
            if fd >= 0:
                os.close(fd)
        reported = None
        if err_r >= 0:
            os.close(err_w)
            err_w = -1
            reported = _child_error(os.read(err_r, 256), spec)
        _discard(cgroup, placement)
        if reported is not None:
            raise reported from exc
        if isinstance(exc, OSError):
            raise classify_exec_error(exc, spec) from exc
        raise
    finally:
        kept = out if spec.capture else None
        done: list[int | None] = [*procs_fds, *theirs, out if out is not kept else None,
                                  gate_r, err_r, err_w]
        for end in done:
            if end is not None and end >= 0:
                os.close(end)
        if log_back is not None:
            if started and out is None:
                out = _received_log(log_back[0])
            for sock in log_back:
                sock.close()
    launched = Launched(popen, placement)
    if spec.capture:
        launched.pipes = (ours[0], ours[1], gate_w if piped else -1,
                          out if out is not None else -1)
    if gated:
        assert cgroup is not None
        try:
            release(popen, cgroup, gate_w, placement, keep=piped)
        except BaseException:
            launched.close_pipes()
            raise
    return launched


def _received_log(sock: socket.socket) -> int | None:
    """The log file a ``--user`` child opened as that user and sent back (the child has
    run its preexec by now: it is there, or the start failed)."""
    try:
        _, fds, _, _ = socket.recv_fds(sock, 16, 1, socket.MSG_DONTWAIT)
    except OSError:
        return None
    return fds[0] if fds else None


def release(popen: subprocess.Popen[bytes], cgroup: Path, gate: int,
            placement: Placement | None = None, keep: bool = False) -> None:
    """Move the waiting shell into its cgroups (v1 limits first, then its v2 cgroup), then
    let it exec the program. ``keep``: the gate pipe is the program's stdin (the caller
    keeps it open)."""
    placement = placement or Placement()
    try:
        try:
            for f in (*placement.procs_files, cgroup / "cgroup.procs"):
                cgroups.write(f, str(popen.pid).encode())
        except OSError as exc:
            popen.kill()
            popen.wait()
            _discard(cgroup, placement)
            raise StartFailed(
                FailureClass.PERMISSION_DENIED,
                f"cannot place the group into its cgroup {exc.filename or cgroup}: "
                f"{exc.strerror}; check that this agent may write there, or run it with "
                "--containment subreaper",
            ) from exc
        with contextlib.suppress(BrokenPipeError):  # it died already: its exit tells
            os.write(gate, GO)
    finally:
        if not keep:
            os.close(gate)
