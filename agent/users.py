"""Run as another user: ``--user USER[:GROUP]`` resolved on the agent's host.

The password and group databases may be remote (LDAP, sssd): lookups run on a thread,
never on the event loop. A root agent may start a group as any user; an agent that is
not root only as itself (anything else is refused before anything starts).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import grp
import os
import pwd
import socket

from tether.core.errors import InvalidSpec, ResourceExhausted
from tether.signallers.base import RunAs

#: Lookups in the password and group databases (which may be LDAP) run here.
LOOKUPS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tether-users")


#: How long a lookup may take before the spawn gives up (a stuck LDAP server).
LOOKUP_DEADLINE = 10.0


async def lookup(text: str) -> RunAs:
    """``resolve`` on a thread, bounded by ``LOOKUP_DEADLINE``."""
    fut = asyncio.get_running_loop().run_in_executor(LOOKUPS, resolve, text)
    try:
        async with asyncio.timeout(LOOKUP_DEADLINE):
            return await asyncio.shield(fut)
    except TimeoutError:
        raise ResourceExhausted(
            f"--user {text!r}: the agent host's password database did not answer within "
            f"{LOOKUP_DEADLINE:g} s (NSS: LDAP, sssd?); check it and retry; nothing was "
            "started") from None


def _refuse(text: str, why: str) -> InvalidSpec:
    return InvalidSpec(f"--user {text!r}: {why}", field="user")


def resolve(text: str) -> RunAs:
    """``USER``, ``USER:GROUP``, ``UID`` or ``UID:GID`` to the account it names here.
    Supplementary groups are the user's memberships plus the primary group, as
    ``initgroups`` sets them. Blocking: call it on a thread."""
    user, sep, group = text.partition(":")
    host = socket.gethostname()
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise _refuse(text, f"no user {user!r} in the password database of the agent's host "
                            f"{host}; create it (useradd) or name an existing user") from None
    gid = pw.pw_gid
    if sep:
        try:
            gr = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
        except (KeyError, OverflowError):
            raise _refuse(text, f"no group {group!r} in the group database of the agent's "
                                f"host {host}; create it (groupadd) or name an existing "
                                "group") from None
        gid, group_name = gr.gr_gid, gr.gr_name
    else:
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = ""
    euid = os.geteuid()
    if euid != 0 and (pw.pw_uid != euid or gid != os.getegid()):
        try:
            me = pwd.getpwuid(euid).pw_name
        except KeyError:
            me = str(euid)
        raise _refuse(text, f"this agent runs as {me} (uid {euid}), not root, so it starts "
                            "groups only as itself; run the agent as root to start groups as "
                            "other users, or drop --user")
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, gid))
    except OSError:
        groups = (gid,)
    return RunAs(pw.pw_name, pw.pw_uid, gid, groups, pw.pw_dir, group_name)
