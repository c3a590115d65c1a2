"""SSH as a transport for the remote toolkit: connections, host keys, retries, channels.

One asyncssh connection per (user, host, port), shared by every group there, opened on
first use and re-opened when it drops. Host keys are verified against ``known_hosts``
(option ``known_hosts``, default ``~/.ssh/known_hosts``); ``ssh_insecure_no_host_key_check=1``
turns that off with a warning. Key authentication only: ``ssh_key`` (comma-separated
paths), else asyncssh's defaults (``~/.ssh/id_*``, ssh-agent, ``~/.ssh/config``).

Every command is ``shlex.join(["sh", "-s", "--", *ARGS])`` with the script on stdin, so
user data reaches a shell only as quoted positional parameters (the login shell must
parse POSIX single quotes: sh, bash, dash, zsh, ksh do; fish and csh may not). A command
whose connection drops is retried on a new connection with exponential backoff
(``ssh_retries``, default 3); then it raises ``TargetUnreachable`` naming the host, what
was being done, why, and whether it may have taken effect. Long operations (a ``watch``)
hold a channel; at most ``ssh_max_channels - 2`` run at once per host (OpenSSH's
``MaxSessions`` is 10 by default), and their heartbeat lines must keep coming: a channel
silent for ``HEARTBEAT_STALL`` seconds is a dead path, dropped and retried.

Errors from asyncssh and the socket layer are understood in one place, ``_explain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import asyncssh

from tether.core.errors import InvalidSpec, TargetUnreachable
from tether.signallers.base import SignallerContext
from tether.signallers.remote.group import KILL_SWEEP_DEADLINE, note
from tether.signallers.remote.wire import RemoteShell, ShellResult

log = logging.getLogger("tether.signallers.ssh")

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
#: A long operation prints a heartbeat at least every 200 ms; this much silence is a dead path.
HEARTBEAT_STALL: Final = 10.0
#: One command line reaches the remote shell as one argument: Linux caps it at 128 KiB.
MAX_COMMAND: Final = 120 * 1024


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


class Pool:
    """One connection per target, re-opened on demand; channel slots per target."""

    def __init__(self, opts: SSHOptions) -> None:
        self.opts = opts
        self._links: dict[SSHTarget, asyncssh.SSHClientConnection] = {}
        self._locks: dict[SSHTarget, asyncio.Lock] = {}
        self._channels: dict[SSHTarget, asyncio.Semaphore] = {}
        self._long: dict[SSHTarget, asyncio.Semaphore] = {}
        self._dropped: list[asyncssh.SSHClientConnection] = []
        self.connects: dict[SSHTarget, int] = {}

    def channels(self, target: SSHTarget) -> asyncio.Semaphore:
        return self._channels.setdefault(target, asyncio.Semaphore(self.opts.max_channels))

    def long_slots(self, target: SSHTarget) -> asyncio.Semaphore:
        return self._long.setdefault(target, asyncio.Semaphore(self.opts.max_channels - 2))

    async def link(self, target: SSHTarget) -> asyncssh.SSHClientConnection:
        async with self._locks.setdefault(target, asyncio.Lock()):
            conn = self._links.get(target)
            if conn is not None and not conn.is_closed():
                return conn
            if conn is not None:
                self.drop(target, conn)
            conn = await self._connect(target)
            self._links[target] = conn
            self.connects[target] = self.connects.get(target, 0) + 1
            return conn

    async def _connect(self, target: SSHTarget) -> asyncssh.SSHClientConnection:
        opts = self.opts
        if opts.known_hosts is None:
            log.warning("ssh %s: host key NOT verified (ssh_insecure_no_host_key_check=1); "
                        "anyone on the network path can impersonate this host", target)
        elif not os.path.exists(opts.known_hosts):  # asyncssh reads it inline, too
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

    def drop(self, target: SSHTarget, conn: asyncssh.SSHClientConnection) -> None:
        """Forget a connection that failed; the next command opens a new one."""
        if self._links.get(target) is conn:
            del self._links[target]
        conn.abort()
        self._dropped = [c for c in self._dropped if not c.is_closed()]
        self._dropped.append(conn)

    async def run(self, target: SSHTarget, script: str, args: Sequence[str], *, what: str,
                  timeout: float | None, follow: bool = False, retry_after_send: bool = True,
                  notes: list[str] | None = None, unverified: str = "",
                  encoding: str = "utf-8") -> ShellResult:
        """Run ``sh -s -- ARGS`` (script on stdin) on ``target``, retrying on a new connection.
        ``encoding="latin-1"`` keeps every byte of the output (``out.encode("latin-1")``).

        ``timeout`` bounds one attempt (a hung connection is dropped and retried); a
        ``follow`` run (its caller holds a long slot) has none, its caller bounds the
        whole, but must hear a line at least every ``HEARTBEAT_STALL`` seconds. Raises
        ``TargetUnreachable``.
        """
        command = shlex.join(["sh", "-s", "--", *args])
        attempt = 0
        while True:
            attempt += 1
            conn: asyncssh.SSHClientConnection | None = None
            sent = False
            try:
                conn = await self.link(target)
                async with self.channels(target):
                    # A frozen server never answers a channel open: bound it like the rest.
                    async with asyncio.timeout(HEARTBEAT_STALL if follow else timeout):
                        proc = await conn.create_process(command, encoding=encoding,
                                                         errors="replace")
                    sent = True
                    try:
                        out, err = await (_follow(proc, script) if follow
                                          else _communicate(proc, script, timeout))
                    finally:
                        proc.close()
                if proc.exit_status is None and proc.exit_signal is None:
                    raise _ChannelDropped(what)
                if proc.exit_signal is not None:
                    raise _HelperFailed(
                        f"the remote helper was killed by signal {proc.exit_signal[0]} while "
                        f"{what}; check whether something on {target.host} kills ssh sessions")
                if attempt > 1 and notes is not None:
                    note(notes, f"{what}: succeeded on attempt {attempt} after reconnecting")
                return ShellResult(proc.exit_status, out, err)
            except _FOREIGN as exc:
                transient, why = _explain(exc, target, self.opts)
                if conn is not None and (conn.is_closed() or
                                         isinstance(exc, TimeoutError | _ChannelDropped)):
                    self.drop(target, conn)
                if not transient or attempt > self.opts.retries or (sent and not retry_after_send):
                    tried = f" (tried {attempt} times, with backoff)" if attempt > 1 else ""
                    verified = (f" {unverified[0].upper()}{unverified[1:]}." if sent and unverified
                                else "" if sent else " Nothing was run there.")
                    if notes is not None:
                        note(notes, f"{what}: gave up: {why}.{verified}")
                    raise TargetUnreachable(f"ssh:{target}",
                                            f"while {what}{tried}: {why}.{verified}") from exc
                pause = min(2.0, 0.1 * 2 ** (attempt - 1))
                log.warning("ssh %s: %s, while %s; retrying in %.1f s on a new connection "
                            "(attempt %d of %d)", target, why, what, pause, attempt + 1,
                            self.opts.retries + 1)
                if notes is not None:
                    note(notes, f"{what}: {why}; retried on a new connection")
                await asyncio.sleep(pause)

    async def aclose(self) -> None:
        conns = [*self._links.values(), *self._dropped]
        self._links.clear()
        self._dropped.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)


async def _communicate(proc: asyncssh.SSHClientProcess[str], script: str,
                       timeout: float | None) -> tuple[str, str]:
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate(script)
    return out or "", err or ""


async def _follow(proc: asyncssh.SSHClientProcess[str], script: str) -> tuple[str, str]:
    """Read a long operation's output, heartbeats dropped; silence is a dead path."""
    proc.stdin.write(script)
    proc.stdin.write_eof()
    lines: list[str] = []
    while True:
        async with asyncio.timeout(HEARTBEAT_STALL):
            line = await proc.stdout.readline()
        if not line:
            break
        if line != ".\n":
            lines.append(line)
    async with asyncio.timeout(HEARTBEAT_STALL):
        await proc.wait()
    return "".join(lines), ""


class SSHShell(RemoteShell):
    """One SSH host as a ``RemoteShell``; what happens on the way goes into ``notes``."""

    def __init__(self, pool: Pool, target: SSHTarget, notes: list[str] | None = None) -> None:
        self.pool = pool
        self.host = target
        self.target = f"ssh:{target}"
        self.notes = notes

    async def run(self, script: str, argv: Sequence[str], *, what: str,
                  timeout: float | None = None, unverified: str = "") -> ShellResult:
        return await self.pool.run(
            self.host, script, argv, what=what, notes=self.notes, unverified=unverified,
            timeout=self.pool.opts.command_timeout if timeout is None else timeout)

    async def follow(self, script: str, argv: Sequence[str], *, what: str) -> ShellResult | None:
        slots = self.pool.long_slots(self.host)
        if slots.locked():
            return None  # every long channel is taken: the caller polls with short commands
        await slots.acquire()  # free, so taken at once: no waiter can slip in between
        try:
            return await self.pool.run(self.host, script, argv, what=what, timeout=None,
                                       follow=True, notes=self.notes)
        finally:
            slots.release()
