"""PID reuse on remote targets (issue 12 item 2): a detached group's leader exits, an
unrelated session leader takes its pid number, and the stranger's processes (whose
process group and session carry that number) are never signalled, while the group's
own members still are.

The stranger is steered onto the number for real, through ``/proc/sys/kernel/ns_last_pid``:
inside a privileged container's PID namespace for docker, on this host for ssh (its sshd
is local). Strangers are plain ``sleep``s: SIGUSR1 and SIGTERM would end them, so a live
stranger proves no signal reached it. The group's member ignores both, so only
``kill()`` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.plugins.docker_engine import IMAGE, DockerEngine
from tests.plugins.sshd import SSHServer
from tether.core.model import AGENT_ENV, MARKER_ENV
from tether.signallers.base import GroupHandle, LaunchSpec, SignallerContext
from tether.signallers.docker import DockerSignaller
from tether.signallers.membership import Proc
from tether.signallers.remote.wire import stat_rows
from tether.signallers.ssh import SSHSignaller

# The leader waits for GO; its member leaves the session and ignores USR1 and TERM.
GROUP = ('setsid sh -c \'trap "" USR1 TERM; sleep 1201; true\' & '
         'while [ ! -e "$0" ]; do sleep 0.05; done')
# The stranger leads a new session, starts two sleeps in it, and exits at once: its
# number is free again, but its process group and session (both L) live on.
STRANGER = "sleep 1301 >/dev/null 2>&1 & echo $!; sleep 1302 >/dev/null 2>&1 & echo $!; exit 0"
ATTEMPTS = 40


def spec(gid: str, where: str, go: str, path: str) -> LaunchSpec:
    return LaunchSpec(gid, ("sh", "-c", GROUP, go),
                      {"PATH": path, MARKER_ENV: gid, AGENT_ENV: "test"}, where=where)


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """The outside world settles (a reap, a fork): bounded re-checks, test side only. The
    bound is generous: init reaps orphans late, later still on a loaded machine."""
    for _ in range(2400):
        if await check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


async def prove_strangers_untouched(h: GroupHandle, table: Callable[[], Awaitable[dict[int, Proc]]],
                                    leader: int) -> None:
    """The stranger holds pgid/sid ``leader``; only the group's own members are signalled."""
    procs = await table()
    strangers = {p.pid for p in procs.values() if p.sid == leader and p.alive}
    assert len(strangers) == 2, procs
    mine = set(await h.members())
    assert mine and not mine & strangers
    assert all(procs[p].sid != leader for p in mine)

    async def alive(pids: set[int]) -> set[int]:
        now = await table()
        return {p for p in pids if p in now and now[p].alive}

    assert await h.send_signal(signal.SIGUSR1) == len(mine)
    assert await h.send_signals([signal.SIGTERM, signal.SIGCONT]) == len(mine)
    assert not await h.wait(0.5)  # the member ignores TERM
    assert await alive(mine) == mine
    assert await alive(strangers) == strangers
    assert await h.kill() == len(mine)
    assert await h.members() == []
    assert await alive(mine) == set()
    assert await alive(strangers) == strangers


# ---------------------------------------------------------------- docker


@pytest.mark.docker
def test_docker_stranger_on_the_leaders_pid_is_never_signalled(
        docker_engine: DockerEngine) -> None:
    # ns_last_pid of the container's PID namespace is writable only with CAP_SYS_ADMIN
    # over it and a read-write /proc/sys: `--cap-add SYS_ADMIN --security-opt
    # systempaths=unconfined` (not all of --privileged, which this host cannot grant).
    api = docker_engine.client.api
    host_config = api.create_host_config(cap_add=["SYS_ADMIN"], network_mode="none")
    host_config.update(ReadonlyPaths=[], MaskedPaths=[])
    created = api.create_container(IMAGE, ["sleep", "1000000"], host_config=host_config,
                                   name=f"tether-test-{uuid.uuid4().hex[:10]}")
    docker_engine.containers.append(created["Id"])
    api.start(created["Id"])
    container = docker_engine.client.containers.get(created["Id"])

    def run(*argv: str) -> str:
        result = container.exec_run(list(argv))
        assert result.exit_code == 0, result.output
        return str(result.output.decode(errors="replace"))

    async def table() -> dict[int, Proc]:
        text = await asyncio.to_thread(run, "sh", "-c", "cat /proc/[0-9]*/stat")
        return {p.pid: p for p in stat_rows(text.splitlines())}

    async def body() -> None:
        s = DockerSignaller(SignallerContext("test", "", {"docker_host": docker_engine.url}))
        try:
            h = await s.spawn(spec(f"g-{uuid.uuid4().hex[:12]}", container.name, "/tmp/go",
                                   "/bin"))
            leader = h.leader_pid

            async def settled() -> bool:
                return len(await h.members()) >= 3  # leader (and its sleep 0.05), sh, sleep 1201

            await until(settled, "the group's tree")  # a scan while the leader holds its number
            await asyncio.to_thread(run, "touch", "/tmp/go")
            await asyncio.wait_for(h.wait_leader(), 20)

            async def freed() -> bool:
                return leader not in await table()

            await until(freed, f"pid {leader} to be reaped")
            for _ in range(ATTEMPTS):
                out = await asyncio.to_thread(run, "sh", "-c", f"echo {leader - 1} > "
                                              f"/proc/sys/kernel/ns_last_pid; setsid sh -c "
                                              f"'{STRANGER}'; true")
                pids = [int(x) for x in out.split()]
                procs = await table()
                if procs[pids[0]].sid == leader:
                    break
                await asyncio.to_thread(run, "kill", "-KILL", *map(str, pids))
            else:
                pytest.fail(f"could not steer a stranger onto pid {leader}")
            await prove_strangers_untouched(h, table, leader)
        finally:
            await s.aclose()

    try:
        asyncio.run(body())
    finally:
        docker_engine.remove(container.id)


# ---------------------------------------------------------------- ssh


@pytest.mark.ssh
def test_ssh_stranger_on_the_leaders_pid_is_never_signalled(sshd: SSHServer) -> None:
    go = sshd.tmp / f"go-{uuid.uuid4().hex[:8]}"
    strangers: list[int] = []

    async def table() -> dict[int, Proc]:
        def read() -> dict[int, Proc]:
            rows = []
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    with contextlib.suppress(OSError):
                        rows.append((d / "stat").read_text().strip())
            return {p.pid: p for p in stat_rows(rows)}

        return await asyncio.to_thread(read)

    def steer(leader: int) -> bool:
        """Start the stranger as the ssh user, forked right after ns_last_pid is set. Other
        work on this machine may take the number first: then try again."""
        gid = pwd.getpwuid(sshd.uid).pw_gid
        script = (f"echo {leader - 1} > /proc/sys/kernel/ns_last_pid; "
                  f"setpriv --reuid {sshd.uid} --regid {gid} --clear-groups "
                  f"setsid sh -c '{STRANGER}'; true")
        out = subprocess.run(["sh", "-c", script], check=True, env={"PATH": "/usr/bin:/bin"},
                             stdin=subprocess.DEVNULL, capture_output=True, text=True).stdout
        pids = [int(x) for x in out.split()]
        strangers.extend(pids)
        return os.getsid(pids[0]) == leader

    async def body() -> None:
        async with contextlib.AsyncExitStack() as stack:
            s = SSHSignaller(SignallerContext("test", options=sshd.options(ssh_containment="pgid")))
            stack.push_async_callback(s.aclose)
            h = await s.spawn(spec(f"{sshd.group_prefix}{uuid.uuid4().hex[:8]}", sshd.where,
                                   str(go), "/usr/bin:/bin"))
            leader = h.leader_pid

            async def settled() -> bool:
                return len(await h.members()) >= 3  # leader (and its sleep 0.05), sh, sleep 1201

            await until(settled, "the group's tree")  # a scan while the leader holds its number
            go.touch()
            await asyncio.wait_for(h.wait_leader(), 20)

            async def freed() -> bool:
                # This host's init reaps late; and an in-process agent of an earlier test
                # made this test process a child subreaper: then the orphaned leader is ours
                # to reap, or its pid is never freed.
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(leader, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
                return leader not in await table()

            await until(freed, f"pid {leader} to be reaped")
            for _ in range(ATTEMPTS):
                if await asyncio.to_thread(steer, leader):
                    break
            else:
                pytest.fail(f"could not steer a stranger onto pid {leader}")
            await prove_strangers_untouched(h, table, leader)

    try:
        asyncio.run(body())
    finally:
        for pid in strangers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


