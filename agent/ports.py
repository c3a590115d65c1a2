"""Ports: the TCP ports the agent assigns to groups (``--port``), and who holds any port.

Assigning: ``--port NAME`` picks a free port on 127.0.0.1 (the kernel's choice for a
bind to port 0, skipping ports this agent has reserved for other groups);
``--port NAME=3000`` asks for that one and fails as ``port_in_use``, naming the
owner, if another group of this agent reserved it or anything listens on it (a
test bind on the wildcard addresses, IPv4 and IPv6, with ``SO_REUSEADDR`` as servers
bind). A port stays reserved for its group until the group ends. Between the pick and
the program's own bind another process could take it: nothing outside tether knows of
the reservation (the program should fail loudly then, and its readiness probe says so).

Owners: listening sockets from ``/proc/net/tcp`` and ``tcp6`` (this agent's network
namespace), their processes from ``/proc/PID/fd``, and for each process the group of
this agent it belongs to (its cgroup in the agent's tree, else its environment
marker), or else its pid, user and command. The scan reads /proc on a thread of its
own and never holds the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import pwd
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from tether.core.errors import StartFailed
from tether.core.model import (
    MARKER_ENV,
    AssignedPort,
    FailureClass,
    PortOwner,
    PortRequest,
)
from tether.signallers import cgroups, procfs

PICK_TRIES: Final = 64
LISTEN: Final = "0A"


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    inode: int


def _ip4(hex_ip: str) -> str:
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_ip)[::-1])


def _ip6(hex_ip: str) -> str:
    raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, 32, 8))
    return socket.inet_ntop(socket.AF_INET6, raw)


def listeners(port: int = 0) -> list[Listener]:
    """Listening TCP sockets of this network namespace (optionally on one port)."""
    found = []
    for path, decode in (("/proc/net/tcp", _ip4), ("/proc/net/tcp6", _ip6)):
        try:
            with open(path) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != LISTEN:
                continue
            ip_hex, _, port_hex = fields[1].partition(":")
            p = int(port_hex, 16)
            if port and p != port:
                continue
            try:
                found.append(Listener(decode(ip_hex), p, int(fields[9])))
            except (ValueError, OSError):
                continue
    return found


def socket_pids(inodes: set[int]) -> dict[int, list[int]]:
    """inode -> pids holding that socket (several when a listener was inherited)."""
    out: dict[int, list[int]] = {}
    if not inodes:
        return out
    for pid in procfs.pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes:
                    out.setdefault(inode, []).append(pid)
    return out


def group_of(pid: int, marker: str, tree_name: str) -> str:
    """The group of this agent instance ``pid`` belongs to (its cgroup in the agent's tree,
    else its marker), or ""; a probe's or hook's process counts as its group's."""
    if tree_name:
        parts = cgroups.own_cgroup(pid).split("/")
        if tree_name in parts:
            i = parts.index(tree_name)
            if len(parts) > i + 2:
                return parts[i + 2].split(".", 1)[0]
    block = procfs.environ(pid)
    if marker and procfs.carries(block, marker):
        return (procfs.env_value(block, MARKER_ENV) or "").split(".", 1)[0]
    return ""


def user_of(pid: int) -> str:
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def in_use(port: int) -> bool:
    """Would a server's bind to this port fail with EADDRINUSE (IPv4 or IPv6 wildcard)?"""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def pick_free() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: group id -> (session, label, {port: name}) of a group this agent knows, or None.
Lookup = Callable[[str], tuple[str, str, dict[int, str]] | None]


class PortBook:
    """The ports this agent reserved for its groups, and the owners of any port."""

    def __init__(self, marker: str = "", tree_name: str = "", agent: str = "") -> None:
        self.marker = marker
        self.tree_name = tree_name
        self.agent = agent
        self.lookup: Lookup = lambda group_id: None
        self._held: dict[int, tuple[str, str]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tether-ports")

    def held(self) -> dict[int, tuple[str, str]]:
        return dict(self._held)

    async def assign(self, group_id: str, requests: Sequence[PortRequest]
                     ) -> tuple[AssignedPort, ...]:
        """Reserve a port per request (all or none); ``StartFailed(port_in_use)`` names the
        owner of a fixed port that is taken."""
        out: list[AssignedPort] = []
        try:
            for r in requests:
                if r.port:
                    holder = self._held.get(r.port)
                    if holder is not None and holder[0] != group_id:
                        raise _taken(r, self._reservation(r.port, *holder).describe())
                    # Reserved before the bind test awaits: a concurrent spawn asking for
                    # the same port finds it taken.
                    self._held[r.port] = (group_id, r.name)
                    await self._check_fixed(r)
                    port = r.port
                else:
                    port = self._pick()
                    self._held[port] = (group_id, r.name)
                out.append(AssignedPort(r.name, port, bool(r.port)))
        except BaseException:
            self.release(group_id)
            raise
        return tuple(out)

    def restore(self, group_id: str, ports: Iterable[AssignedPort]) -> None:
        """Reserve again the ports of a group re-adopted after an agent restart."""
        for p in ports:
            self._held.setdefault(p.port, (group_id, p.name))

    def release(self, group_id: str) -> None:
        for port in [p for p, (g, _) in self._held.items() if g == group_id]:
            del self._held[port]

    def _pick(self) -> int:
        for _ in range(PICK_TRIES):
            port = pick_free()
            if port not in self._held:
                return port
        raise StartFailed(FailureClass.RESOURCE_EXHAUSTED,
                          f"no free TCP port found on 127.0.0.1 in {PICK_TRIES} tries; stop "
                          "some groups or widen net.ipv4.ip_local_port_range")

    async def _check_fixed(self, r: PortRequest) -> None:
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self._pool, in_use, r.port):
            owners = await self.owners(r.port)
            who = "; ".join(o.describe() for o in owners if o.listening) or \
                "a socket this agent cannot see (another network namespace?)"
            raise _taken(r, who)

    def _reservation(self, port: int, group_id: str, name: str) -> PortOwner:
        found = self.lookup(group_id)
        session, label = (found[0], found[1]) if found else ("", "")
        return PortOwner(port, group_id=group_id, session_id=session, label=label, name=name,
                         listening=False, agent=self.agent)

    async def owners(self, port: int = 0) -> list[PortOwner]:
        """Listening TCP ports (or one) and their owners, plus reservations nobody listens
        on yet; sorted by port."""
        loop = asyncio.get_running_loop()
        scanned = await loop.run_in_executor(self._pool, self._scan, port)
        out = []
        seen: set[int] = set()
        for lst, pids, groups, users, commands in scanned:
            gid = next((g for g in groups if g), "")
            pid = next((p for p, g in zip(pids, groups, strict=True) if g == gid), 0) \
                if gid else (min(pids) if pids else 0)
            owner = PortOwner(lst.port, lst.address, pid, users.get(pid, ""),
                              commands.get(pid, ""), agent=self.agent)
            found = self.lookup(gid) if gid else None
            if found is not None:
                session, label, names = found
                owner = PortOwner(lst.port, lst.address, pid, users.get(pid, ""),
                                  commands.get(pid, ""), gid, session, label,
                                  names.get(lst.port, ""), True, self.agent)
            out.append(owner)
            seen.add(lst.port)
        for p, (gid, name) in self._held.items():
            if p not in seen and (not port or p == port):
                out.append(self._reservation(p, gid, name))
        return sorted(out, key=lambda o: (o.port, o.address))

    def _scan(self, port: int) -> list[tuple[Listener, list[int], list[str], dict[int, str],
                                             dict[int, str]]]:
        found = listeners(port)
        holders = socket_pids({lst.inode for lst in found})
        rows = []
        for lst in found:
            pids = sorted(holders.get(lst.inode, []))
            groups = [group_of(p, self.marker, self.tree_name) for p in pids]
            users = {p: user_of(p) for p in pids}
            commands = {p: procfs.cmdline(p) for p in pids}
            rows.append((lst, pids, groups, users, commands))
        return rows

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _taken(r: PortRequest, who: str) -> StartFailed:
    return StartFailed(FailureClass.PORT_IN_USE,
                       f"port {r.port} (--port {r}) is already in use by {who}; stop it "
                       f"(`tether ports {r.port}` shows the owner) or ask for another port, "
                       f"or for none: --port {r.name} picks a free one")
