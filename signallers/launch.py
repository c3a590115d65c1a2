"""Start a program inside its cgroup without fork()ing the agent.

Joining a cgroup "in the child before exec" means a ``preexec_fn``, and a
``preexec_fn`` makes ``subprocess`` fork() the whole agent (tens of MB, several
threads) and run Python in the child: about 4.5 ms per spawn here, all of it
with the event loop blocked. Without one, ``subprocess`` uses vfork() and a
spawn costs about 0.5 ms. (clone3's ``CLONE_INTO_CGROUP`` is the kernel's
answer, but Python does not expose it.)

So the agent vforks a tiny ``/bin/sh`` that waits on its stdin, writes the
shell's pid into the group's ``cgroup.procs`` itself, and only then lets it go:
the shell execs the real program, same pid, already in the cgroup, before any
user code ran. Spawn returns with the leader inside its cgroup, as before.

What the shell would change is undone: it exports ``PWD`` (unset unless the
spec sets it), it searches a different default ``PATH`` (set to Python's, not
exported), and it runs a file without a ``#!`` line as a script (such files,
and anything else the shim cannot vouch for, take the direct path). Exec errors
are found before the shim runs by the same search ``subprocess`` does, so
"command not found" and "not executable" are reported exactly as before.
"""

from __future__ import annotations

import errno
import os
import shlex
import stat
from collections.abc import Mapping, Sequence

SHELL = "/bin/sh"

#: Read the go-ahead on stdin; without it (the agent gave up), exit without running anything.
_GATE = 'read -r go && [ "$go" = go ] && exec "$@" </dev/null'
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


def shim_argv(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``sh -c GATE tether-launch argv...``: the shell's ``exec "$@"`` runs ``argv`` as given
    (argv[0] unchanged), with the spec's environment and nothing added."""
    prelude = []
    if "PWD" not in env:
        prelude.append("unset PWD")
    if "PATH" not in env:
        prelude.append("PATH=" + shlex.quote(os.defpath))  # not exported: the search path only
    script = "; ".join([*prelude, _GATE])
    return [SHELL, "-c", script, "tether-launch", *argv]
