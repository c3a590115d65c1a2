"""The ssh signaller: process groups on hosts without an agent, reached through asyncssh.

Target: ``ssh:[USER@]HOST[:PORT]`` (IPv6 as ``[::1]:2222``). Nothing is installed
on the remote host; it needs a POSIX ``sh``, ``setsid`` and ``env`` (util-linux
and coreutils, or BusyBox), ``/proc`` and, for the marker scan, GNU ``grep -z``
(a slower ``tr`` fallback is used without it).

Connections
    One asyncssh connection per (user, host, port), shared by every group there,
    opened on first use and re-opened when it drops. Host keys are verified
    against ``known_hosts`` (option ``known_hosts``, default ``~/.ssh/known_hosts``);
    ``ssh_insecure_no_host_key_check=1`` turns that off with a warning. Key
    authentication only: ``ssh_key`` (comma-separated paths), else asyncssh's
    defaults (``~/.ssh/id_*``, ssh-agent, ``~/.ssh/config``). A command whose
    connection drops is retried on a new connection with exponential backoff
    (``ssh_retries``, default 3): every operation except the start itself is
    idempotent (a signal may be delivered twice across a reconnect: at least
    once, never silently zero). A start whose connection drops after the
    command was sent is cleaned up by marker and retried once; the orphaned
    wrapper writes to its dead channel before it forks, so it dies of SIGPIPE
    instead of starting a second leader.

Commands
    Every remote command is ``shlex.join`` of an argv (``sh -s -- ARGS...``);
    the helper script itself, a constant of this module, goes through stdin, so
    user data never meets a shell except as quoted positional arguments. The
    login shell of the remote user must parse POSIX single quotes (sh, bash,
    dash, zsh, ksh do; fish and csh may not).

Start
    The wrapper checks the working directory, resolves the command the way
    ``execvp`` will (PATH from the group's env, else ``/bin:/usr/bin``) and opens
    the log, so "not found" (127), "not executable" (126), a missing cwd and an
    unwritable log are classified from the wrapper's exit status, never from
    output text. Then ``setsid env -i -- K=V... ARGV`` runs in the background
    with stdin from /dev/null and stdout/stderr appended to the log (or
    /dev/null): it outlives the SSH channel, leads its own session and process
    group (pgid == pid), and its environment is exactly the group's (with the
    ``TETHER_GROUP`` marker). The wrapper returns once the exec is confirmed:
    the marker appears in ``/proc/PID/environ`` only when ``env`` has exec'd
    the command. A leader that dies first (an exec failure the checks could not
    foresee, e.g. a missing ``#!`` interpreter) is the wrapper's child: it is
    reaped and classified by its exit status (127/126) too.

Containment
    ``cgroup`` where the remote user has a delegated cgroup v2 directory: the one
    named by ``ssh_cgroup_root``, else the parent of (or else the) cgroup the SSH
    session runs in, if the user can write it and its ``cgroup.procs``. The
    wrapper joins ``ROOT/tether-GROUP`` before it forks the leader; members are
    ``cgroup.procs`` plus marker carriers, the kill is ``cgroup.kill``.
    Otherwise ``pgid``: members are the processes whose process group *or
    session* is the leader's, plus every process readable by our user whose
    ``/proc/PID/environ`` carries the marker (that finds setsid and double-fork
    escapees that keep their environment). Reported as ``pgid``, not
    ``subreaper``: nothing re-parents orphans to us, so a process that both
    leaves the session and scrubs its environment (or changes uid) is lost.
    ``ssh_containment=pgid|cgroup|auto`` forces or prefers a level.
    Zombies count as dead everywhere.

Signals and kill
    One remote script finds the members and signals them: ``kill -s NAME --
    -PGID`` once for the process group, ``kill -s NAME PID`` for every other
    member (session, cgroup, marker), each once per attempt. Signal *names* go over
    the wire, never numbers (they differ between architectures). ``kill()``
    sweeps remotely until the group is empty: ``cgroup.kill`` where held, then
    SIGKILL to the process group and to every member by pid, with backoff from
    10 ms, up to ``ssh_kill_deadline`` (default 10 s); what is still alive then
    (another user's process, one stuck in the kernel) is logged and named in
    ``detail``.

Waiting
    ``wait()`` runs one remote command per call that exits when the group is
    empty; it checks at the remote edge (the same membership scan) with
    exponential backoff from 10 ms to 200 ms and prints a heartbeat each
    round, so it dies of SIGPIPE as soon as we close the channel. This is
    polling, at the remote edge and cheap (no fork per process), because a
    remote host offers nothing to subscribe to over plain SSH. Long waits hold
    an SSH channel; to stay under OpenSSH's ``MaxSessions`` (default 10) at most
    ``ssh_max_channels - 2`` (default 6) run at once per host, and waits beyond
    that poll with short commands and a local backoff from 50 ms to 1 s.
    ``wait_leader()`` works the same way on the leader alone.

Record
    ``SSHGroup.detail`` says what holds the group and what happened on the
    way (reconnections, retried commands, what could not be verified, kill
    survivors): meant for the exit record's ``detail``.

Options (``SignallerContext.options``)
    ``known_hosts``, ``ssh_insecure_no_host_key_check``, ``ssh_key``,
    ``ssh_config``, ``ssh_containment`` (auto|cgroup|pgid), ``ssh_cgroup_root``,
    ``ssh_connect_timeout`` (15 s), ``ssh_command_timeout`` (30 s),
    ``ssh_kill_deadline`` (10 s), ``ssh_keepalive`` (15 s), ``ssh_retries`` (3),
    ``ssh_max_channels`` (8).

Limits
    The leader's exit status is not known (it is not our child once the wrapper
    has returned): ``leader_status`` is ``LeaderStatus()`` once it has exited,
    unless it died during the start. PID reuse: members are found and signalled
    in one remote script; process-group members must have started no earlier
    than the leader, and once the leader's session is seen empty it is never
    used again. The marker scan sees only processes of the ssh user.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shlex
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import asyncssh

from tether.core.errors import AdoptRefused, InvalidSpec, StartFailed, TargetUnreachable
from tether.core.model import MARKER_ENV, Containment, FailureClass, LeaderStatus, OrphanPolicy
from tether.signallers.base import (
    Features,
    GroupHandle,
    LaunchSpec,
    Reachability,
    Signaller,
    SignallerContext,
)

log = logging.getLogger("tether.signallers.ssh")

KILL_SWEEP_DEADLINE: Final = 10.0
_TRUE: Final = frozenset({"1", "true", "yes", "on"})

# ---------------------------------------------------------------- remote scripts
#
# Both scripts are read by ``sh -s`` from stdin; every command that could read
# stdin is redirected, so none of them eats the script.

_COMMON: Final = r"""
set -u
me=$$
if sleep 0.001 2>/dev/null; then frac=1; else frac=0; fi
delay=0.01 delay_ms=10
backoff() {
  if [ $frac = 0 ]; then sleep 1; delay_ms=$((delay_ms + 1000)); return; fi
  sleep $delay
  case $delay in
    0.01) delay=0.02 delay_ms=20 ;;
    0.02) delay=0.04 delay_ms=40 ;;
    0.04) delay=0.08 delay_ms=80 ;;
    0.08) delay=0.16 delay_ms=160 ;;
    *) delay=0.2 delay_ms=200 ;;
  esac
}
# Fields of /proc/PID/stat after the command name: st_state st_pgid st_sid st_start.
stat_of() {
  s=
  { IFS= read -r s < "/proc/$1/stat"; } 2>/dev/null
  [ -n "$s" ] || return 1
  s=${s##*) }
  set -- $s
  st_state=$1 st_pgid=$3 st_sid=$4 st_start=${20}
}
live() {
  stat_of "$1" || return 1
  case $st_state in Z|X) return 1 ;; esac
  return 0
}
"""

_OPS: Final = _COMMON + r"""
op=$1 mark=$2 pgid=$3 lstart=$4 cg=$5 lpid=$6
shift 6
if printf 'x\0' | grep -qzx x 2>/dev/null; then zgrep=1; else zgrep=0; fi

# Live members, one "PID TAG" line each: c cgroup, g process group, s session, m marker.
markers() {
  if [ $zgrep = 1 ]; then
    grep -lzxF -e "$mark" /proc/[0-9]*/environ 2>/dev/null
  else
    for f in /proc/[0-9]*/environ; do
      { tr '\0' '\n' < "$f" | grep -qxF -e "$mark"; } 2>/dev/null && echo "$f"
    done
  fi | while IFS=/ read -r _ _ p _; do
    [ "$p" = "$me" ] && continue
    live "$p" && echo "$p m"
  done
}
scan() {
  if [ -n "$cg" ] && [ -r "$cg/cgroup.procs" ]; then
    while read -r p; do
      [ "$p" = "$me" ] && continue
      live "$p" && echo "$p c"
    done < "$cg/cgroup.procs"
  fi
  if [ -n "$pgid" ]; then
    for d in /proc/[0-9]*; do
      p=${d#/proc/}
      [ "$p" = "$me" ] && continue
      stat_of "$p" || continue
      case $st_state in Z|X) continue ;; esac
      [ "$st_start" -ge "$lstart" ] || continue
      if [ "$st_pgid" = "$pgid" ]; then echo "$p g"
      elif [ "$st_sid" = "$pgid" ]; then echo "$p s"
      fi
    done
  fi
  markers
}
# Signal every member once: the process group with one kill, the rest by pid.
signal_all() {
  list=$(scan)
  seen=" "
  case $list in *" g"*)
    kill -s "$1" -- "-$pgid" 2>/dev/null
    while read -r p t; do
      [ "$t" = g ] && seen="$seen$p "
    done <<EOF
$list
EOF
  ;; esac
  while read -r p t; do
    [ -n "$p" ] || continue
    case $seen in *" $p "*) ;; *) kill -s "$1" "$p" 2>/dev/null; seen="$seen$p " ;; esac
  done <<EOF
$list
EOF
  [ -n "$list" ] && echo "$list"
  return 0
}
leader_alive() {
  stat_of "$lpid" || return 1
  [ "$st_start" = "$lstart" ] || return 1
  case $st_state in Z|X) return 1 ;; esac
  return 0
}
case $op in
  members)
    scan ;;
  signal)
    signal_all "$1" ;;
  kill)
    left=$1
    while :; do
      list=$(scan)
      if [ -z "$list" ]; then echo empty; exit 0; fi
      echo "$list"
      if [ -n "$cg" ] && [ -w "$cg/cgroup.kill" ]; then
        { echo 1 > "$cg/cgroup.kill"; } 2>/dev/null
      fi
      signal_all KILL > /dev/null
      if [ "$left" -le 0 ]; then
        scan | while read -r p t; do echo "left $p $t"; done
        exit 1
      fi
      backoff
      left=$((left - delay_ms))
    done ;;
  wait)
    while :; do
      if [ -z "$(scan)" ]; then echo empty; exit 0; fi
      echo . || exit 3
      backoff
    done ;;
  leader)
    while leader_alive; do
      [ "$1" = once ] && exit 1
      echo . || exit 3
      backoff
    done
    exit 0 ;;
  rmcg)
    [ -n "$cg" ] && [ -d "$cg" ] && rmdir "$cg"
    exit 0 ;;
  adopt)
    p=$1
    if live "$p"; then echo "proc $st_pgid $st_sid $st_start"; else echo gone; exit 0; fi
    while read -r k v; do [ "$k" = btime ] && echo "btime $v"; done < /proc/stat
    echo "clk $(getconf CLK_TCK 2>/dev/null || echo 100)"
    if { tr '\0' '\n' < "/proc/$p/environ" | grep -qxF -e "$mark"; } 2>/dev/null; then
      echo marker yes
    elif [ -r "/proc/$p/environ" ]; then echo marker no
    else echo marker unreadable; fi
    while IFS= read -r line; do
      case $line in 0::*) echo "cgroup ${line#0::}" ;; esac
    done < "/proc/$p/cgroup"
    while read -r _ _ _ mroot mpoint rest; do
      case " $rest " in *" - cgroup2 "*) echo "mount $mroot $mpoint"; break ;; esac
    done < /proc/self/mountinfo
    exit 0 ;;
  *)
    echo "unknown op $op" >&2; exit 2 ;;
esac
"""

_SPAWN: Final = _COMMON + r"""
mode=$1 cgroot=$2 cwd=$3 log=$4 haspath=$5 spath=$6 cgname=$7 mark=$8 nenv=$9
shift 9
echo "tether-spawn 1"
fail() { echo "fail $*"; exit "$1"; }
command -v setsid > /dev/null 2>&1 || fail 121 "setsid is not installed (PATH=$PATH)"
command -v env > /dev/null 2>&1 || fail 121 "env is not installed (PATH=$PATH)"

if [ -n "$cwd" ]; then
  cd "$cwd" 2>/dev/null || { [ -d "$cwd" ] && fail 124 "cannot enter"; fail 125 "missing"; }
fi

i=0 cmd=
for a; do
  if [ "$i" -eq "$nenv" ]; then cmd=$a; break; fi
  i=$((i + 1))
done
# The resolution execvp will do, with the PATH the command will get.
resolve() {
  case $1 in
    */*) if [ -f "$1" ] && [ -x "$1" ]; then return 0; fi
         if [ -e "$1" ]; then return 126; fi
         return 127 ;;
  esac
  if [ "$haspath" = 1 ]; then search=$spath; else search=/bin:/usr/bin; fi
  denied=0
  set -f
  oldifs=$IFS
  IFS=:
  for d in $search; do
    [ -n "$d" ] || d=.
    if [ -f "$d/$1" ]; then
      if [ -x "$d/$1" ]; then IFS=$oldifs; set +f; return 0; fi
      denied=1
    fi
  done
  IFS=$oldifs
  set +f
  [ $denied = 1 ] && return 126
  return 127
}
resolve "$cmd"
rc=$?
[ $rc = 0 ] || fail $rc "resolve"

out=/dev/null
if [ -n "$log" ]; then
  if ! ( : >> "$log" ) 2>/dev/null; then
    dir=${log%/*}
    [ -d "${dir:-/}" ] && fail 123 "log not writable"
    fail 122 "log directory missing"
  fi
  out=$log
fi

# A delegated cgroup v2 directory we may create groups in and move into.
detect_root() {
  mp= mr=
  while read -r _ _ _ mroot mpoint rest; do
    case " $rest " in *" - cgroup2 "*) mp=$mpoint mr=$mroot; break ;; esac
  done < /proc/self/mountinfo
  [ -n "$mp" ] || return 0
  rel=
  while IFS= read -r line; do
    case $line in 0::*) rel=${line#0::} ;; esac
  done < /proc/self/cgroup
  [ -n "$rel" ] || return 0
  [ "$mr" = / ] || rel=${rel#"$mr"}
  cur=$mp${rel%/}
  for c in "${cur%/*}" "$cur"; do
    [ "${#c}" -gt "${#mp}" ] || continue
    if [ -w "$c" ] && [ -w "$c/cgroup.procs" ]; then echo "$c"; return 0; fi
  done
}
cg=
if [ "$mode" != pgid ]; then
  root=$cgroot
  [ -n "$root" ] || root=$(detect_root)
  if [ -n "$root" ]; then
    c=$root/tether-$cgname
    { rmdir "$c"; } 2>/dev/null
    if { mkdir "$c" && echo $$ > "$c/cgroup.procs"; } 2>/dev/null; then
      cg=$c
    else
      { rmdir "$c"; } 2>/dev/null
      echo "note cgroup $c could not be created or joined"
    fi
  else
    who=$(id -un 2>/dev/null)
    echo "note no delegated cgroup v2 directory is writable by $who"
  fi
  [ "$mode" = cgroup ] && [ -z "$cg" ] && fail 120 "no cgroup"
fi

# The marker shows in /proc/PID/environ once env has exec'd the command: that is
# the exec succeeding. A leader that dies first is our child: its status says why.
if printf 'x\0' | grep -qzx x 2>/dev/null; then
  has_marker() { grep -qzxF -e "$mark" "/proc/$1/environ" 2>/dev/null; }
else
  has_marker() { { tr '\0' '\n' < "/proc/$1/environ" | grep -qxF -e "$mark"; } 2>/dev/null; }
fi
# Still connected? A wrapper whose channel died (the client will sweep and retry) must
# not start a second leader: writing to the dead channel kills it with SIGPIPE here.
echo "forking" || exit 118
myuid=$(id -u)
other_uid() {
  { while read -r k _ e _; do
      if [ "$k" = Uid: ]; then [ "$e" != "$myuid" ]; return; fi
    done < "/proc/$1/status"; } 2>/dev/null
  return 1
}
setsid env -i -- "$@" < /dev/null >> "$out" 2>&1 &
pid=$!
n=0 seen=0 gone=0 st_state=R st_start=0
while :; do
  # Gone: reaped by this shell while it waited for grep; `wait` still has the status.
  if ! stat_of "$pid"; then gone=1; break; fi
  case $st_state in Z|X) gone=1; break ;; esac
  if [ "$st_pgid" = "$pid" ]; then
    if has_marker "$pid"; then seen=1; break; fi
    other_uid "$pid" && break  # a setuid program: its environ is not ours to read
  fi
  n=$((n + 1))
  if [ $n -gt 20 ]; then sleep 0.01 2>/dev/null || sleep 1; fi
  [ $n -gt 520 ] && break
done
btime=0
while read -r k v; do [ "$k" = btime ] && btime=$v; done < /proc/stat
echo "ok $pid $st_start $btime $(getconf CLK_TCK 2>/dev/null || echo 100)"
[ -n "$cg" ] && echo "cgroup $cg"
if [ $gone = 1 ]; then
  wait "$pid"
  echo "exited $?"
elif [ $seen = 0 ]; then
  echo "note the exec of the command was not confirmed (pid $pid shows no marker)"
fi
exit 0
"""


# ---------------------------------------------------------------- targets and options


@dataclass(frozen=True)
class SSHTarget:
    """``[USER@]HOST[:PORT]``; user and port None mean "ssh config or defaults"."""

    host: str
    port: int | None = None
    user: str | None = None

    @classmethod
    def parse(cls, where: str) -> SSHTarget:
        hint = "use ssh:[USER@]HOST[:PORT], e.g. ssh:deploy@build-1:2222 or ssh:[::1]:22"
        text = where.strip()
        user: str | None = None
        if "@" in text:
            user, _, text = text.rpartition("@")
            if not user or any(c.isspace() for c in user):
                raise InvalidSpec(f"ssh target {where!r} has a bad user name; {hint}",
                                  field="target")
        port_text = ""
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise InvalidSpec(f"ssh target {where!r} is not understood; {hint}",
                                  field="target")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        else:
            host = text  # a bare name, IPv4, or an IPv6 address without a port
        if not host or any(c.isspace() or c in "/@" for c in host):
            raise InvalidSpec(f"ssh target {where!r} has no usable host; {hint}", field="target")
        port: int | None = None
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise InvalidSpec(f"ssh target {where!r}: {port_text!r} is not a TCP port; {hint}",
                                  field="target")
            port = int(port_text)
        return cls(host=host, port=port, user=user)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and self.port else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{host}{port}"

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH writes this host in known_hosts."""
        return f"[{self.host}]:{self.port}" if self.port and self.port != 22 else self.host


def _float_opt(opts: Mapping[str, str], name: str, default: float) -> float:
    text = opts.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"option {name}={text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise ValueError(f"option {name}={text!r} is out of range (0, 86400]")
    return value


def _int_opt(opts: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = opts.get(name, "")
    if not text:
        return default
    if not text.strip().isdigit() or not low <= int(text) <= high:
        raise ValueError(f"option {name}={text!r} must be a whole number from {low} to {high}")
    return int(text)


@dataclass(frozen=True)
class SSHOptions:
    """The ssh signaller's part of ``SignallerContext.options``."""

    known_hosts: str | None  # None: host keys are not verified (explicitly asked for)
    keys: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    containment: str = "auto"
    cgroup_root: str = ""
    connect_timeout: float = 15.0
    command_timeout: float = 30.0
    kill_deadline: float = KILL_SWEEP_DEADLINE
    keepalive: float = 15.0
    retries: int = 3
    max_channels: int = 8

    @classmethod
    def from_context(cls, context: SignallerContext) -> SSHOptions:
        opts = context.options
        insecure = opts.get("ssh_insecure_no_host_key_check", "").strip().lower() in _TRUE
        known = os.path.expanduser(opts.get("known_hosts") or "~/.ssh/known_hosts")
        containment = opts.get("ssh_containment", "auto") or "auto"
        if containment not in ("auto", "cgroup", "pgid"):
            raise ValueError(
                f"option ssh_containment={containment!r} is unknown; use auto, cgroup or pgid"
            )
        root = opts.get("ssh_cgroup_root", "")
        if root and not root.startswith("/"):
            raise ValueError(f"option ssh_cgroup_root={root!r} must be an absolute path")
        return cls(
            known_hosts=None if insecure else known,
            keys=tuple(os.path.expanduser(k.strip())
                       for k in opts.get("ssh_key", "").split(",") if k.strip()),
            config=tuple(os.path.expanduser(c.strip())
                         for c in opts.get("ssh_config", "").split(",") if c.strip()),
            containment=containment,
            cgroup_root=root.rstrip("/"),
            connect_timeout=_float_opt(opts, "ssh_connect_timeout", 15.0),
            command_timeout=_float_opt(opts, "ssh_command_timeout", 30.0),
            kill_deadline=_float_opt(opts, "ssh_kill_deadline", KILL_SWEEP_DEADLINE),
            keepalive=_float_opt(opts, "ssh_keepalive", 15.0),
            retries=_int_opt(opts, "ssh_retries", 3, 0, 20),
            max_channels=_int_opt(opts, "ssh_max_channels", 8, 3, 1000),
        )


# ---------------------------------------------------------------- foreign errors, in one place


class _ChannelDropped(Exception):
    """The channel closed without an exit status: the connection under it went away."""


class _HelperFailed(Exception):
    """Our remote helper exited in a way it never does on purpose (killed, no sh)."""


class _NotConfigured(Exception):
    """A local precondition for connecting is missing (known_hosts file)."""


def _explain(exc: BaseException, target: SSHTarget, opts: SSHOptions) -> tuple[bool, str]:
    """``(transient, why)`` for an error met while talking to ``target``.

    The only place where asyncssh's and the socket layer's exceptions are
    understood; everything else sees ``TargetUnreachable`` (raised ``from`` the
    original).
    """
    where = f"{target.host}:{target.port or 22}"
    user = target.user or "the default user (ssh config, else the local user)"
    keys = ", ".join(opts.keys) if opts.keys else "asyncssh's defaults (~/.ssh/id_*, ssh-agent)"
    if isinstance(exc, _NotConfigured):
        return False, str(exc)
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        name = target.known_hosts_name
        port = f"-p {target.port} " if target.port else ""
        return False, (
            f"the host key of {name} is not trusted: it is not in {opts.known_hosts} or differs "
            f"from the key recorded there ({exc.reason}). Check the host's fingerprint, then add "
            f"it with `ssh-keyscan {port}{target.host} >> {opts.known_hosts}`, or pass "
            "ssh_insecure_no_host_key_check=1 to skip verification (not recommended)"
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return False, (
            f"authentication as {user} failed with key(s) {keys}; add the public key to "
            f"~{target.user or ''}/.ssh/authorized_keys on {target.host}, or pass ssh_key=PATH"
        )
    if isinstance(exc, asyncssh.KeyImportError):
        return False, f"cannot load the client key(s) {keys}: {exc}; check ssh_key"
    if isinstance(exc, asyncssh.ConnectionLost):
        return True, f"the connection to {where} was lost ({exc.reason})"
    if isinstance(exc, asyncssh.KeyExchangeFailed | asyncssh.ProtocolNotSupported |
                  asyncssh.IllegalUserName | asyncssh.ProtocolError):
        return False, f"{where} refused the SSH handshake: {exc.reason}"
    if isinstance(exc, asyncssh.DisconnectError):
        return True, f"{where} disconnected: {exc.reason}"
    if isinstance(exc, asyncssh.ChannelOpenError):
        return True, (f"{where} refused to open a session channel ({exc.reason}); "
                      "its MaxSessions may be lower than ssh_max_channels")
    if isinstance(exc, _ChannelDropped):
        return True, f"the connection to {where} dropped while a command ran"
    if isinstance(exc, _HelperFailed):
        return False, str(exc)
    if isinstance(exc, TimeoutError):  # before OSError: TimeoutError is one
        return True, f"{where} did not answer in time"
    if isinstance(exc, socket.gaierror):
        return False, f"host name {target.host!r} does not resolve ({exc.strerror}); check it"
    if isinstance(exc, ConnectionRefusedError):
        return True, f"connection to {where} refused; check that sshd runs there on that port"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return False, f"{exc.filename} does not exist; check ssh_key / known_hosts / ssh_config"
    if isinstance(exc, OSError):
        return True, f"cannot reach {where} ({exc.strerror or exc}); check the network path"
    return False, f"unexpected {type(exc).__name__} from {where}: {exc}"


_FOREIGN: Final = (asyncssh.Error, OSError, _ChannelDropped, _HelperFailed, _NotConfigured,
                   asyncssh.KeyImportError)


# ---------------------------------------------------------------- connections


@dataclass
class _Link:
    conn: asyncssh.SSHClientConnection


@dataclass(frozen=True)
class _Done:
    status: int
    out: str
    err: str

    def lines(self, first: str | None = None) -> list[list[str]]:
        rows = [line.split() for line in self.out.splitlines() if line.strip()]
        return [r for r in rows if first is None or r[0] == first]


class _Pool:
    """One connection per target, re-opened on demand; channel slots per target."""

    def __init__(self, opts: SSHOptions) -> None:
        self.opts = opts
        self._links: dict[SSHTarget, _Link] = {}
        self._locks: dict[SSHTarget, asyncio.Lock] = {}
        self._channels: dict[SSHTarget, asyncio.Semaphore] = {}
        self._long: dict[SSHTarget, asyncio.Semaphore] = {}
        self._dropped: list[asyncssh.SSHClientConnection] = []
        self.connects: dict[SSHTarget, int] = {}

    def channels(self, target: SSHTarget) -> asyncio.Semaphore:
        return self._channels.setdefault(target, asyncio.Semaphore(self.opts.max_channels))

    def long_slots(self, target: SSHTarget) -> asyncio.Semaphore:
        return self._long.setdefault(target, asyncio.Semaphore(self.opts.max_channels - 2))

    async def link(self, target: SSHTarget) -> _Link:
        lock = self._locks.setdefault(target, asyncio.Lock())
        async with lock:
            link = self._links.get(target)
            if link is not None and not link.conn.is_closed():
                return link
            if link is not None:
                self.drop(target, link)
            conn = await self._connect(target)
            link = _Link(conn)
            self._links[target] = link
            self.connects[target] = self.connects.get(target, 0) + 1
            return link

    async def _connect(self, target: SSHTarget) -> asyncssh.SSHClientConnection:
        opts = self.opts
        if opts.known_hosts is None:
            log.warning("ssh %s: host key NOT verified (ssh_insecure_no_host_key_check=1); "
                        "anyone on the network path can impersonate this host", target)
        elif not await asyncio.to_thread(os.path.exists, opts.known_hosts):
            port = f"-p {target.port} " if target.port else ""
            raise _NotConfigured(
                f"known_hosts file {opts.known_hosts} does not exist, so the host key of "
                f"{target.known_hosts_name} cannot be verified; create it with "
                f"`ssh-keyscan {port}{target.host} >> {opts.known_hosts}` after checking the "
                "fingerprint, or pass known_hosts=PATH"
            )
        conn: asyncssh.SSHClientConnection = await asyncssh.connect(
            target.host,
            port=target.port if target.port else (),
            username=target.user if target.user else (),
            known_hosts=opts.known_hosts,
            client_keys=list(opts.keys) if opts.keys else (),
            agent_path=None if opts.keys else (),
            config=list(opts.config) if opts.config else (),
            preferred_auth="publickey",
            connect_timeout=opts.connect_timeout,
            keepalive_interval=opts.keepalive,
            keepalive_count_max=3,
        )
        log.info("ssh %s: connected", target)
        return conn

    def drop(self, target: SSHTarget, link: _Link) -> None:
        """Forget a connection that failed; the next command opens a new one."""
        if self._links.get(target) is link:
            del self._links[target]
        link.conn.abort()
        self._dropped = [c for c in self._dropped if not c.is_closed()]
        self._dropped.append(link.conn)

    async def aclose(self) -> None:
        conns = [link.conn for link in self._links.values()] + self._dropped
        self._links.clear()
        self._dropped.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)


# ---------------------------------------------------------------- the handle


def _note(notes: list[str], text: str, keep: int = 20) -> None:
    """Remember what happened to a group (for its exit record), the latest ``keep`` only."""
    notes.append(text)
    del notes[:-keep]


def _cgroup_name(group_id: str) -> str:
    """A directory name for ``group_id``: itself if tame, else a readable part plus a hash."""
    if re.fullmatch(r"[A-Za-z0-9._-]{1,100}", group_id) and group_id not in (".", ".."):
        return group_id
    tame = re.sub(r"[^A-Za-z0-9._-]", "_", group_id)[:40]
    return f"{tame}-{hashlib.sha256(group_id.encode()).hexdigest()[:12]}"


class SSHGroup(GroupHandle):
    """A group on an SSH host: ``<SSHGroup g-1 ssh:u@h:22 pid=4123 cgroup>``."""

    def __init__(
        self,
        signaller: SSHSignaller,
        target: SSHTarget,
        group_id: str,
        marker: str,
        leader_pid: int,
        start_ticks: int,
        leader_start_time: float,
        cgroup: str,
        leader_status: LeaderStatus | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self._signaller = signaller
        self.target = target
        self.group_id = group_id
        self.marker = marker
        self.leader_pid = leader_pid
        self.pgid = leader_pid
        self._cgroup = cgroup
        self.containment = Containment.CGROUP if cgroup else Containment.PGID
        self.leader_start_time = leader_start_time
        self._start_ticks = start_ticks
        self._leader_status = leader_status
        # Once the leader's session is seen empty nobody can join it again: stop looking.
        self._session_gone = bool(cgroup)
        self.notes: list[str] = list(notes)

    def __repr__(self) -> str:
        leader = "exited" if self._leader_status is not None else "alive"
        return (f"<SSHGroup {self.group_id} ssh:{self.target} pid={self.leader_pid} "
                f"leader {leader} {self.containment.value}>")

    @property
    def cgroup(self) -> str:
        return self._cgroup

    async def send_signals(self, sigs: Sequence[signal.Signals]) -> int:
        n = 0
        for sig in sigs:
            n = max(n, await self.send_signal(sig))
        return n

    @property
    def detail(self) -> str:
        """What holds this group and what happened on the way: for the exit record."""
        how = (f"cgroup {self.cgroup} + {MARKER_ENV} marker scan" if self.cgroup
               else f"process group/session {self.pgid} + {MARKER_ENV} marker scan")
        return "; ".join([f"ssh {self.target}, containment {self.containment.value} ({how})",
                          *self.notes])

    def _argv(self, op: str, *extra: str) -> list[str]:
        pgid = "" if self._session_gone else str(self.pgid)
        return [op, self.marker, pgid, str(self._start_ticks), self.cgroup,
                str(self.leader_pid), *extra]

    def _parse_members(self, done: _Done) -> dict[int, set[str]]:
        found: dict[int, set[str]] = {}
        for row in done.lines():
            if len(row) == 2 and row[0].isdigit():
                found.setdefault(int(row[0]), set()).add(row[1])
        return found

    def _observe(self, found: Mapping[int, set[str]]) -> None:
        if not self._session_gone and not any(t & {"g", "s"} for t in found.values()):
            self._session_gone = True

    async def _ops(self, what: str, *argv: str, timeout: float | None = None,
                   long: bool = False, unverified: str = "",
                   partial: list[str] | None = None) -> _Done:
        return await self._signaller._run(
            self.target, _OPS, list(argv), what=f"{what} of group {self.group_id}",
            timeout=self._signaller.opts.command_timeout if timeout is None and not long
            else timeout,
            long=long, notes=self.notes, unverified=unverified, partial=partial,
        )

    async def members(self) -> list[int]:
        done = await self._ops("listing the members", *self._argv("members"))
        found = self._parse_members(done)
        self._observe(found)
        return sorted(found)

    async def send_signal(self, sig: signal.Signals) -> int:
        name = sig.name.removeprefix("SIG")
        partial: list[str] = []
        done = await self._ops(
            f"sending {sig.name}", *self._argv("signal", name),
            unverified=f"{sig.name} may or may not have been delivered", partial=partial,
        )
        found = self._parse_members(_Done(0, "".join(partial) + done.out, ""))
        self._observe(found)
        if not found:
            log.debug("ssh %s: group %s is already gone; %s not sent", self.target,
                      self.group_id, sig.name)
        return len(found)

    async def terminate(self) -> int:
        return await self.send_signal(signal.SIGTERM)

    async def kill(self) -> int:
        """SIGKILL (``cgroup.kill`` where held) every member, sweeping newcomers remotely."""
        opts = self._signaller.opts
        deadline_ms = str(int(opts.kill_deadline * 1000))
        partial: list[str] = []  # what attempts cut short by a dropped connection saw
        done = await self._ops(
            "killing the members", *self._argv("kill", deadline_ms),
            timeout=opts.kill_deadline + opts.command_timeout,
            unverified="SIGKILL was sent but the group was not verified empty", partial=partial,
        )
        killed = set(self._parse_members(_Done(0, "".join(partial), "")))
        found = self._parse_members(done)
        killed.update(found)
        if done.status != 0:
            survivors = sorted({int(row[1]) for row in done.lines("left")
                                if len(row) > 1 and row[1].isdigit()})
            log.warning("ssh %s: group %s still had members %s after %g s of SIGKILL sweeps "
                        "(another user's process, or stuck in the kernel?)",
                        self.target, self.group_id, survivors, opts.kill_deadline)
            _note(self.notes, f"SIGKILL sweeps for {opts.kill_deadline:g} s left members "
                              f"{survivors} alive")
        else:
            self._session_gone = True
        return len(killed)

    async def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None and timeout <= 0:
            return not await self.members()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                if not self._signaller._pool.long_slots(self.target).locked():
                    done = await self._ops("waiting for the end", *self._argv("wait"), long=True)
                    if done.status == 0:
                        self._session_gone = True
                    return done.status == 0
                # Every long channel is taken: poll with short commands, backing off.
                nap = 0.05
                while await self.members():
                    await asyncio.sleep(nap)
                    nap = min(1.0, nap * 2)
                return True
        except TimeoutError:
            return False

    async def wait_leader(self) -> LeaderStatus:
        if self._leader_status is not None:
            return self._leader_status
        if self._signaller._pool.long_slots(self.target).locked():
            nap = 0.05
            while (await self._ops("checking the leader", *self._argv("leader", "once"))).status:
                await asyncio.sleep(nap)
                nap = min(1.0, nap * 2)
        else:
            await self._ops("waiting for the leader", *self._argv("leader", "loop"), long=True)
        # Not our child remotely: that it ended is known, how is not.
        self._leader_status = LeaderStatus()
        return self._leader_status

    @property
    def leader_status(self) -> LeaderStatus | None:
        return self._leader_status

    async def close(self) -> None:
        if not self.cgroup:
            return
        try:
            done = await self._ops("removing the cgroup", *self._argv("rmcg"))
        except TargetUnreachable as exc:
            log.warning("ssh %s: cgroup %s of group %s left in place: %s", self.target,
                        self.cgroup, self.group_id, exc.why)
            return
        if done.status != 0:
            log.warning("ssh %s: cgroup %s of group %s still busy at close; left in place",
                        self.target, self.cgroup, self.group_id)


# ---------------------------------------------------------------- the signaller


_SPAWN_FAILURES: Final[Mapping[int, tuple[FailureClass, str]]] = {
    127: (FailureClass.COMMAND_NOT_FOUND,
          "command {cmd!r} not found on {target} (searched PATH={path}); check the spelling, "
          "give an absolute path, or set PATH in the group's environment"),
    126: (FailureClass.PERMISSION_DENIED,
          "command {cmd!r} on {target} is not executable by the ssh user; `chmod +x` it or run "
          "it through its interpreter"),
    125: (FailureClass.CWD_MISSING,
          "working directory {cwd!r} does not exist on {target}; create it or pass another cwd"),
    124: (FailureClass.PERMISSION_DENIED,
          "cannot enter working directory {cwd!r} on {target}: permission denied; fix its "
          "permissions or choose another cwd"),
    123: (FailureClass.PERMISSION_DENIED,
          "cannot write log file {log!r} on {target}: permission denied; choose another log"),
    122: (FailureClass.CWD_MISSING,
          "the directory of log file {log!r} does not exist on {target}; create it or choose "
          "another log"),
    121: (FailureClass.COMMAND_NOT_FOUND,
          "{target} lacks a tool tether needs ({detail}); install util-linux (setsid) and "
          "coreutils (env) there"),
    120: (FailureClass.PERMISSION_DENIED,
          "ssh_containment=cgroup, but {target} offers the ssh user no writable cgroup v2 "
          "directory ({notes}); delegate one and name it with ssh_cgroup_root, or use "
          "ssh_containment=auto"),
    119: (FailureClass.IMMEDIATE_CRASH, "the leader on {target} did not start: {detail}"),
}


class SSHSignaller(Signaller):
    """Signaller for ``ssh:[USER@]HOST[:PORT]`` targets. One per agent; owns the connections."""

    kind = "ssh"
    features = Features()

    def __init__(self, context: SignallerContext | None = None) -> None:
        self.context = context or SignallerContext()
        self.opts = SSHOptions.from_context(self.context)
        self._pool = _Pool(self.opts)

    @property
    def containment(self) -> Containment:
        """What it promises for any host without looking; each handle reports what it got."""
        return Containment.CGROUP if self.opts.containment == "cgroup" else Containment.PGID

    def connections_opened(self, where: str) -> int:
        """How many connections to ``where`` were opened so far (1 = never re-established)."""
        return self._pool.connects.get(SSHTarget.parse(where), 0)

    # -- running commands

    async def _run(self, target: SSHTarget, script: str, args: list[str], *, what: str,
                   timeout: float | None, long: bool = False, retry_after_send: bool = True,
                   notes: list[str] | None = None, unverified: str = "",
                   partial: list[str] | None = None) -> _Done:
        """Run ``sh -s -- ARGS`` (script on stdin) on ``target``, retrying on a new connection.

        ``timeout`` bounds one attempt (a hung connection is dropped and retried);
        ``None`` for waits, whose caller bounds the whole. Output of attempts whose
        connection dropped is appended to ``partial``. Raises ``TargetUnreachable``.
        """
        command = shlex.join(["sh", "-s", "--", *args])
        attempt = 0
        while True:
            attempt += 1
            link: _Link | None = None
            sent = False
            try:
                link = await self._pool.link(target)
                async with contextlib.AsyncExitStack() as stack:
                    if long:
                        await stack.enter_async_context(self._pool.long_slots(target))
                    await stack.enter_async_context(self._pool.channels(target))
                    proc = await link.conn.create_process(
                        command, encoding="utf-8", errors="replace",
                        stdout=asyncssh.DEVNULL if long else asyncssh.PIPE,
                    )
                    sent = True
                    try:
                        async with asyncio.timeout(timeout):
                            out, err = await proc.communicate(script)
                    finally:
                        proc.close()
                if proc.exit_status is None and proc.exit_signal is None:
                    if partial is not None and out:
                        partial.append(out)
                    raise _ChannelDropped(what)
                if proc.exit_signal is not None:
                    raise _HelperFailed(
                        f"the remote helper was killed by signal {proc.exit_signal[0]} while "
                        f"{what}; check whether something on {target.host} kills ssh sessions"
                    )
                if attempt > 1 and notes is not None:
                    _note(notes, f"{what}: succeeded on attempt {attempt} after reconnecting")
                return _Done(proc.exit_status if proc.exit_status is not None else -1,
                             out or "", err or "")
            except _FOREIGN as exc:
                transient, why = _explain(exc, target, self.opts)
                if link is not None and (link.conn.is_closed() or
                                         isinstance(exc, TimeoutError | _ChannelDropped)):
                    self._pool.drop(target, link)
                if not transient or attempt > self.opts.retries or (sent and not retry_after_send):
                    tried = f" (tried {attempt} times, with backoff)" if attempt > 1 else ""
                    verified = (f" {unverified[0].upper()}{unverified[1:]}." if sent and unverified
                                else "" if sent else " Nothing was run there.")
                    if notes is not None:
                        _note(notes, f"{what}: gave up: {why}.{verified}")
                    raise TargetUnreachable(str(target), f"while {what}{tried}: {why}.{verified}"
                                            ) from exc
                pause = min(2.0, 0.1 * 2 ** (attempt - 1))
                log.warning("ssh %s: %s, while %s; retrying in %.1f s on a new connection "
                            "(attempt %d of %d)", target, why, what, pause, attempt + 1,
                            self.opts.retries + 1)
                if notes is not None:
                    _note(notes, f"{what}: {why}; retried on a new connection")
                await asyncio.sleep(pause)

    @staticmethod
    def _target(where: str) -> SSHTarget:
        try:
            return SSHTarget.parse(where)
        except InvalidSpec as exc:
            raise StartFailed(FailureClass.INVALID_SPEC, str(exc)) from exc

    # -- Signaller

    async def spawn(self, spec: LaunchSpec) -> GroupHandle:
        target = self._target(spec.where)
        if "=" in spec.argv[0]:
            raise StartFailed(FailureClass.INVALID_SPEC,
                              f"command {spec.argv[0]!r} contains '=', which `env` on the remote "
                              "host would take for a variable; rename it or run it through sh")
        env = dict(spec.env)
        env.setdefault(MARKER_ENV, spec.group_id)
        marker = f"{MARKER_ENV}={env[MARKER_ENV]}"
        path = env.get("PATH")
        args = [
            self.opts.containment, self.opts.cgroup_root, spec.cwd, spec.log_path,
            "1" if path is not None else "0", path or "", _cgroup_name(spec.group_id), marker,
            str(len(env)), *(f"{k}={v}" for k, v in env.items()), *spec.argv,
        ]
        notes: list[str] = []
        what = f"starting group {spec.group_id}"
        try:
            done = await self._run(target, _SPAWN, args, what=what,
                                   timeout=self.opts.command_timeout, retry_after_send=False,
                                   notes=notes, unverified="the start was not confirmed")
        except TargetUnreachable as exc:
            if not isinstance(exc.__cause__, _ChannelDropped | TimeoutError):
                raise
            # The command went out and the answer did not come back: end whatever
            # started, then start once more.
            await self._sweep_marker(target, marker, spec.group_id, notes)
            done = await self._run(target, _SPAWN, args, what=what + " again",
                                   timeout=self.opts.command_timeout, retry_after_send=False,
                                   notes=notes, unverified="the start was not confirmed")
        return self._started(target, spec, done, marker, path, notes)

    async def _sweep_marker(self, target: SSHTarget, marker: str, group_id: str,
                            notes: list[str]) -> None:
        ms = str(int(self.opts.kill_deadline * 1000))
        done = await self._run(
            target, _OPS, ["kill", marker, "", "0", "", "0", ms],
            what=f"killing what an unconfirmed start of group {group_id} left",
            timeout=self.opts.kill_deadline + self.opts.command_timeout, notes=notes,
            unverified="the unconfirmed start may have left processes carrying " + marker,
        )
        n = len({row[0] for row in done.lines() if len(row) == 2})
        notes.append(f"start of {group_id} unconfirmed after a dropped connection; killed {n} "
                     f"process(es) carrying {marker} and started again")

    def _started(self, target: SSHTarget, spec: LaunchSpec, done: _Done, marker: str,
                 path: str | None, notes: list[str]) -> SSHGroup:
        rows = done.lines()
        if not rows or rows[0][:2] != ["tether-spawn", "1"]:
            raise TargetUnreachable(
                str(target),
                f"the start wrapper did not run there (exit {done.status}: "
                f"{done.err.strip()[:300] or 'no message'}); tether needs a POSIX sh on the "
                "host and a login shell that runs `sh -s`",
            )
        for row in rows:
            if row[0] == "note":
                text = " ".join(row[1:])
                log.info("ssh %s: group %s: %s", target, spec.group_id, text)
                notes.append(text)
        fails = [row for row in rows if row[0] == "fail"]
        if fails or done.status != 0:
            code = int(fails[0][1]) if fails and fails[0][1].isdigit() else done.status
            detail = " ".join(fails[0][2:]) if fails else done.err.strip()[:300]
            failure, template = _SPAWN_FAILURES.get(
                code, (FailureClass.IMMEDIATE_CRASH,
                       "the start wrapper on {target} failed with status {code}: {detail}"))
            raise StartFailed(failure, template.format(
                cmd=spec.argv[0], target=target, path=path if path is not None
                else "/bin:/usr/bin (none given)", cwd=spec.cwd, log=spec.log_path,
                code=code, detail=detail, notes="; ".join(notes) or "none found"))
        ok = next((row for row in rows if row[0] == "ok"), None)
        if ok is None or len(ok) != 5 or not all(x.isdigit() for x in ok[1:]):
            raise TargetUnreachable(str(target), f"the start wrapper gave no pid ({done.out!r})")
        pid, ticks, btime, clk = (int(x) for x in ok[1:])
        cgroup = next((line[len("cgroup "):] for line in done.out.splitlines()
                       if line.startswith("cgroup ")), "")
        status: LeaderStatus | None = None
        exited = next((row for row in rows if row[0] == "exited"), None)
        if exited is not None:
            code = int(exited[1])
            if code in (126, 127):
                failure = (FailureClass.COMMAND_NOT_FOUND if code == 127
                           else FailureClass.PERMISSION_DENIED)
                raise StartFailed(failure, (
                    f"command {spec.argv[0]!r} could not be executed on {target} (exit {code} "
                    "from the exec); if it is a script, check that its #! interpreter exists"))
            status = (LeaderStatus(signal=code - 128) if code > 128
                      else LeaderStatus(exit_code=code))
        group = SSHGroup(self, target, spec.group_id, marker, pid, ticks,
                         btime + ticks / max(clk, 1), cgroup, status, notes)
        log.info("ssh %s: started group %s: %r", target, spec.group_id, group)
        return group

    async def adopt(self, group_id: str, pid: int, start_time: float | None, where: str,
                    policy: OrphanPolicy = OrphanPolicy.KILL) -> GroupHandle:
        try:
            target = SSHTarget.parse(where)
        except InvalidSpec as exc:
            raise AdoptRefused(pid, str(exc)) from exc
        marker = f"{MARKER_ENV}={group_id}"
        try:
            done = await self._run(target, _OPS, ["adopt", marker, "", "0", "", "0", str(pid)],
                                   what=f"inspecting pid {pid} for adoption",
                                   timeout=self.opts.command_timeout)
        except TargetUnreachable as exc:
            raise AdoptRefused(pid, f"ssh:{target} is unreachable: {exc.why}") from exc
        info = {row[0]: row[1:] for row in done.lines()}
        if "proc" not in info:
            raise AdoptRefused(pid, f"no live process {pid} on {target} (it has exited or the "
                                    "pid is wrong)")
        pgid, _sid, ticks = (int(x) for x in info["proc"])
        if info.get("marker") != ["yes"]:
            why = ("its environment is not readable by the ssh user (another user?)"
                   if info.get("marker") == ["unreadable"]
                   else f"it does not carry {marker}: tether did not start it for this group")
            raise AdoptRefused(pid, why)
        clk = int(info.get("clk", ["100"])[0])
        started = int(info.get("btime", ["0"])[0]) + ticks / max(clk, 1)
        if start_time is not None and abs(started - start_time) > 1.0:
            raise AdoptRefused(pid, f"its start time is {started:.2f}, not {start_time:.2f}: "
                                    "the pid was reused")
        cgroup = ""
        rel = " ".join(info.get("cgroup", []))
        mount = info.get("mount", [])
        if rel.rsplit("/", 1)[-1] == f"tether-{_cgroup_name(group_id)}" and len(mount) == 2:
            root, point = mount
            if root != "/" and rel.startswith(root):
                rel = rel[len(root):]
            cgroup = point.rstrip("/") + rel
        group = SSHGroup(self, target, group_id, marker, pid, ticks, started, cgroup,
                         notes=[f"adopted pid {pid}"])
        if pgid != pid:
            # Not the leader of its own process group: only the marker (and cgroup) hold it.
            group.pgid = pgid
            group._session_gone = True
        return group

    # Kept for the signaller tests until the remote toolkit replaces them.
    async def reachable(self, where: str) -> Reachability:
        try:
            target = SSHTarget.parse(where)
        except InvalidSpec as exc:
            return Reachability(False, str(exc))
        try:
            done = await self._run(target, "exit 0\n", [], what="checking reachability",
                                   timeout=self.opts.command_timeout)
        except TargetUnreachable as exc:
            return Reachability(False, exc.why)
        if done.status != 0:
            return Reachability(False, f"`sh` on {target} exited with {done.status}: "
                                       f"{done.err.strip()[:200]}")
        return Reachability(True)

    async def aclose(self) -> None:
        await self._pool.aclose()
