"""The ssh signaller against a real OpenSSH server on 127.0.0.1 (tests/plugins/sshd.py).

The server is local, so every claim the signaller makes about remote processes
is checked independently here with psutil: uid, environment, process group,
cgroup, and that nothing carrying the group's marker is left alive.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.plugins.common import require
from tests.plugins.processes import Daemon, start_daemon, stop_daemon
from tests.plugins.sshd import SSHServer
from tether.client import Client
from tether.core.errors import (
    AdoptRefused,
    Conflict,
    InvalidSpec,
    StartFailed,
    TargetUnreachable,
)
from tether.core.model import AGENT_ENV, MARKER_ENV, Containment, FailureClass, OrphanPolicy
from tether.core.output import Note, Stream
from tether.signallers.base import GroupHandle, LaunchSpec, SignallerContext
from tether.signallers.ssh import SSHGroup, SSHSignaller, SSHTarget
from tether.signallers.sshspool import SpoolStdio

pytestmark = pytest.mark.ssh

PATH = "/usr/local/bin:/usr/bin:/bin"


# ---------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def ssh_signaller(options: dict[str, str]) -> AsyncIterator[SSHSignaller]:
    sig = SSHSignaller(SignallerContext(agent_name="test", options=options))
    try:
        yield sig
    finally:
        await sig.aclose()


def spec(server: SSHServer, *argv: str, gid: str = "", env: dict[str, str] | None = None,
         cwd: str = "", log_path: str = "") -> LaunchSpec:
    gid = gid or f"{server.group_prefix}{uuid.uuid4().hex[:8]}"
    full = {"PATH": PATH, MARKER_ENV: gid, AGENT_ENV: "test", **(env or {})}
    return LaunchSpec(group_id=gid, argv=argv, env=full, cwd=cwd, log_path=log_path,
                      where=server.where)


def live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def local_members(server: SSHServer, handle: GroupHandle) -> set[int]:
    """What really belongs to the group, seen from this machine as root (not through tether)."""
    found: set[int] = set()
    for pid in server.user_pids():
        try:
            p = psutil.Process(pid)
            env = p.environ()
            pgid, sid = os.getpgid(pid), os.getsid(pid)
        except (psutil.Error, ProcessLookupError):
            continue
        if env.get(MARKER_ENV) == handle.group_id or handle.pgid in (pgid, sid):
            found.add(pid)
        if isinstance(handle, SSHGroup) and handle.cgroup:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cgroup").read_text().rstrip().endswith(
                        "/" + Path(handle.cgroup).name):
                    found.add(pid)
    return {pid for pid in found if live(pid)}


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture(params=["pgid", "cgroup"])
def options(request: pytest.FixtureRequest, sshd: SSHServer) -> dict[str, str]:
    mode = str(request.param)
    if mode == "cgroup":
        require(sshd.cgroup_root is not None,
                "needs a cgroup v2 hierarchy to delegate to the ssh test user")
    return sshd.options(ssh_containment=mode)


@pytest.fixture
def user_dir(sshd: SSHServer) -> Path:
    """A directory the remote user can write, readable here."""
    path = Path(tempfile.mkdtemp(prefix="work-", dir=sshd.tmp))
    os.chown(path, sshd.uid, -1)
    return path


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().split("0::", 1)[1].strip()


async def end(handle: GroupHandle) -> None:
    """Cleanup for a test's group, whatever happened in the test."""
    with contextlib.suppress(TargetUnreachable):
        await handle.kill()
        await handle.close()


# ---------------------------------------------------------------- start


def test_registered_and_typed_against_the_protocol() -> None:
    from tether.signallers.base import Signaller
    from tether.signallers.registry import load_factory

    sig = load_factory("ssh")(SignallerContext(options={"ssh_containment": "cgroup"}))
    assert isinstance(sig, SSHSignaller)
    assert isinstance(sig, Signaller)
    assert sig.kind == "ssh"
    assert sig.containment is Containment.CGROUP  # promised only when required
    assert SSHSignaller(SignallerContext()).containment is Containment.PGID
    with pytest.raises(ValueError, match="ssh_containment"):
        SSHSignaller(SignallerContext(options={"ssh_containment": "subreaper"}))
    handle: GroupHandle = SSHGroup(sig, SSHTarget("h"), "g-1", 1, 0)
    assert isinstance(handle, GroupHandle)
    assert repr(handle) == "<SSHGroup g-1 ssh:h pid=1 leader alive pgid>"


def test_target_parsing() -> None:
    assert SSHTarget.parse("build-1") == SSHTarget("build-1")
    assert SSHTarget.parse("deploy@build-1:2222") == SSHTarget("build-1", 2222, "deploy")
    assert SSHTarget.parse("u@[::1]:22") == SSHTarget("::1", 22, "u")
    assert SSHTarget.parse("fe80::1") == SSHTarget("fe80::1")
    assert str(SSHTarget("::1", 2222, "u")) == "u@[::1]:2222"
    for bad in ("", "host:99999", "host:x", "@host", "[::1", "a b"):
        with pytest.raises(InvalidSpec, match="ssh:\\[USER@\\]HOST"):
            SSHTarget.parse(bad)


def test_spawn_detached_with_exact_env(sshd: SSHServer, options: dict[str, str]) -> None:
    async def main() -> None:
        async with ssh_signaller(options) as sig:
            s = spec(sshd, "sleep", "300", env={"ODD": "it's a \"$(value)\"\nwith; newline"})
            handle = await sig.spawn(s)
            try:
                assert handle.containment is Containment(options["ssh_containment"])
                p = psutil.Process(handle.leader_pid)
                assert p.uids().real == sshd.uid
                assert p.cmdline() == ["sleep", "300"]
                # Exactly the spec's environment: nothing from the ssh session leaks in.
                assert p.environ() == dict(s.env)
                assert os.getpgid(p.pid) == p.pid == os.getsid(p.pid) == handle.pgid
                assert abs(p.create_time() - handle.leader_start_time) < 1.0
                if handle.containment is Containment.CGROUP:
                    assert isinstance(handle, SSHGroup)
                    assert handle.cgroup.endswith(cgroup_of(p.pid))
                assert await handle.members() == [handle.leader_pid]
                # The start channel is closed; the group outlives it and the connection.
                await sig.aclose()
                assert live(handle.leader_pid)
                assert await handle.members() == [handle.leader_pid]
                assert handle.leader_status is None
            finally:
                await end(handle)
            assert not live(handle.leader_pid)

    asyncio.run(main())


def test_argv_and_log_survive_quoting(sshd: SSHServer, user_dir: Path) -> None:
    args = ["plain", "two words", "it's", '"dq"', "$(touch /tmp/pwned)", "a;b|c&d", "*", "",
            "new\nline", "-e", "--"]
    log = user_dir / "out.log"

    async def main() -> None:
        async with ssh_signaller(sshd.options()) as sig:
            handle = await sig.spawn(spec(sshd, "sh", "-c", 'printf "[%s]\\n" "$@"', "sh", *args,
                                          log_path=str(log)))
            assert await handle.wait(10)
            await handle.close()

    asyncio.run(main())
    assert log.read_text() == "".join(f"[{a}]\n" for a in args)
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize(
    ("argv", "cwd", "failure", "words"),
    [
        (("no-such-command-tether",), "", FailureClass.COMMAND_NOT_FOUND,
         ["no-such-command-tether", "not found", "PATH"]),
        (("/nonexistent/bin/tool",), "", FailureClass.COMMAND_NOT_FOUND, ["/nonexistent/bin"]),
        (("/etc/passwd",), "", FailureClass.PERMISSION_DENIED, ["not executable"]),
        (("sleep", "1"), "/nonexistent-dir", FailureClass.CWD_MISSING, ["/nonexistent-dir"]),
        (("sleep", "1"), "/root", FailureClass.PERMISSION_DENIED, ["/root", "permission"]),
    ],
)
def test_start_failures_are_classified(sshd: SSHServer, argv: tuple[str, ...], cwd: str,
                                       failure: FailureClass, words: list[str]) -> None:
    async def main() -> None:
        async with ssh_signaller(sshd.options()) as sig:
            with pytest.raises(StartFailed) as caught:
                await sig.spawn(spec(sshd, *argv, cwd=cwd))
            assert caught.value.failure is failure
            for word in [*words, sshd.host]:
                assert word in caught.value.message

    asyncio.run(main())


def test_exec_failure_after_the_checks_is_classified(sshd: SSHServer, user_dir: Path) -> None:
    """A script whose #! interpreter is missing passes the checks; the exec itself fails."""
    script = user_dir / "broken"
    script.write_text("#!/nonexistent/interpreter\necho never\n")
    script.chmod(0o755)

    async def main() -> None:
        async with ssh_signaller(sshd.options()) as sig:
            with pytest.raises(StartFailed) as caught:
                await sig.spawn(spec(sshd, str(script)))
            assert caught.value.failure is FailureClass.COMMAND_NOT_FOUND
            assert str(script) in caught.value.message
            assert "interpreter" in caught.value.message

    asyncio.run(main())


def test_unwritable_log_is_classified(sshd: SSHServer) -> None:
    async def main() -> None:
        async with ssh_signaller(sshd.options()) as sig:
            with pytest.raises(StartFailed) as caught:
                await sig.spawn(spec(sshd, "true", log_path="/root/tether.log"))
            assert caught.value.failure is FailureClass.PERMISSION_DENIED
            with pytest.raises(StartFailed) as caught:
                await sig.spawn(spec(sshd, "true", log_path="/nonexistent/dir/x.log"))
            assert caught.value.failure is FailureClass.CWD_MISSING

    asyncio.run(main())


# ---------------------------------------------------------------- signals and stop


def test_signal_reaches_a_trap(sshd: SSHServer, options: dict[str, str], user_dir: Path) -> None:
    seen = user_dir / "usr1"

    async def main() -> None:
        async with ssh_signaller(options) as sig:
            handle = await sig.spawn(spec(
                sshd, "sh", "-c", 'trap "echo usr1 >> $0" USR1; while :; do sleep 0.1; done',
                str(seen)))
            try:
                assert wait_until(lambda: bool(local_members(sshd, handle)))
                assert await handle.send_signal(signal.SIGUSR1) >= 1
                assert await asyncio.to_thread(
                    wait_until, lambda: seen.exists() and seen.read_text() == "usr1\n")
                assert live(handle.leader_pid)
            finally:
                await end(handle)

    asyncio.run(main())


def test_stop_term_cont_wait_kill(sshd: SSHServer, options: dict[str, str]) -> None:
    """The stop routine's steps on a tree with a stopped member and one that ignores TERM."""
    script = 'sleep 300 & (trap "" TERM; exec sleep 301) & wait'

    def settled(handle: GroupHandle) -> bool:
        found = local_members(sshd, handle)
        return len(found) == 3 and sorted(cmdline(p) for p in found) == [
            "sh -c " + script, "sleep 300", "sleep 301"]

    async def main() -> None:
        async with ssh_signaller(options) as sig:
            handle = await sig.spawn(spec(sshd, "sh", "-c", script))
            try:
                assert await asyncio.to_thread(wait_until, lambda: settled(handle))
                by_cmd = {cmdline(p): p for p in local_members(sshd, handle)}
                os.kill(by_cmd["sleep 300"], signal.SIGSTOP)  # TERM alone would stay pending
                members = await handle.members()
                assert set(members) == set(by_cmd.values())

                assert await handle.send_signal(signal.SIGTERM) == 3
                assert await handle.send_signal(signal.SIGCONT) >= 2  # the leader may be gone
                assert not await handle.wait(1.0)  # one member ignores TERM
                assert not live(by_cmd["sleep 300"])
                assert not live(handle.leader_pid)
                assert await handle.members() == [by_cmd["sleep 301"]]
                assert local_members(sshd, handle) == {by_cmd["sleep 301"]}

                assert await handle.kill() == 1
                assert await handle.wait(5)
                assert await handle.members() == []
                assert local_members(sshd, handle) == set()
                assert await handle.send_signal(signal.SIGTERM) == 0  # gone: a no-op
                assert await handle.kill() == 0
                assert await handle.wait_leader() is not None
            finally:
                await end(handle)

    asyncio.run(main())


def test_setsid_escapees_are_ended(sshd: SSHServer, options: dict[str, str]) -> None:
    # One escapee leaves session and process group (setsid); another double-forks and
    # starts its own process group inside a new session.
    script = ("setsid sleep 301 & (setsid sh -c 'sleep 302 & exec sleep 303' &) ; "
              "exec sleep 300")

    async def main() -> None:
        async with ssh_signaller(options) as sig:
            handle = await sig.spawn(spec(sshd, "sh", "-c", script))
            try:
                def escapees() -> set[int]:
                    return {p for p in local_members(sshd, handle)
                            if cmdline(p).startswith("sleep 30") and os.getsid(p) != handle.pgid}

                assert await asyncio.to_thread(wait_until, lambda: len(escapees()) == 3)
                truth = local_members(sshd, handle)
                assert len(truth) == 4
                assert set(await handle.members()) == truth
                assert await handle.send_signal(signal.SIGTERM) == 4
                assert await handle.wait(5)
                assert local_members(sshd, handle) == set()
            finally:
                await end(handle)

    asyncio.run(main())


def test_cgroup_holds_a_scrubbed_escapee(sshd: SSHServer) -> None:
    """With a cgroup, even a process that leaves the session and drops the marker is held."""
    require(sshd.cgroup_root is not None, "needs cgroup v2 delegated to the ssh test user")

    async def main() -> None:
        async with ssh_signaller(sshd.options(ssh_containment="cgroup")) as sig:
            handle = await sig.spawn(spec(sshd, "sh", "-c", "setsid env -i sleep 304 & sleep 300"))
            try:
                assert isinstance(handle, SSHGroup)
                assert handle.containment is Containment.CGROUP
                procs = Path(handle.cgroup) / "cgroup.procs"
                assert await asyncio.to_thread(wait_until, lambda: sorted(
                    cmdline(int(p)) for p in procs.read_text().split()) == [
                    "sh -c setsid env -i sleep 304 & sleep 300", "sleep 300", "sleep 304"])
                scrubbed = [int(p) for p in procs.read_text().split()
                            if MARKER_ENV not in psutil.Process(int(p)).environ()]
                assert len(scrubbed) == 1
                assert scrubbed[0] in await handle.members()
                assert await handle.kill() == 3
                assert await handle.members() == []
                assert not live(scrubbed[0])
                await handle.close()
                assert not await asyncio.to_thread(os.path.lexists, handle.cgroup)
            finally:
                await end(handle)

    asyncio.run(main())


def test_connection_killed_mid_stop(sshd: SSHServer, options: dict[str, str]) -> None:
    """sshd's session processes die during the stop: the stop goes on over a new connection."""

    async def main() -> None:
        async with ssh_signaller(options) as sig:
            handle = await sig.spawn(spec(sshd, "sh", "-c",
                                          'trap "" TERM; while :; do sleep 0.2; done'))
            try:
                assert await handle.send_signal(signal.SIGTERM) >= 1
                waiting = asyncio.create_task(handle.wait(3.0))
                await asyncio.sleep(0.5)
                assert sshd.kill_sessions()
                assert not await waiting  # TERM is ignored: the grace runs out, no error
                assert live(handle.leader_pid)  # the group does not hang on the connection
                assert sig.connections_opened(sshd.where) >= 2

                # Dropped again between two steps: the next command notices and reconnects.
                assert sshd.kill_sessions()
                assert await handle.kill() >= 1
                assert await handle.members() == []
                assert local_members(sshd, handle) == set()
                assert sig.connections_opened(sshd.where) >= 3
                assert isinstance(handle, SSHGroup)
                assert "retried on a new connection" in handle.detail
            finally:
                await end(handle)

    asyncio.run(main())


def test_connection_killed_mid_start(sshd: SSHServer, user_dir: Path) -> None:
    """The start's answer is lost: whatever started is swept, the start runs once more,
    and the wrapper orphaned by the dead connection does not start a second leader."""
    fifo = user_dir / "log.fifo"  # opening it for writing blocks until we read: the wrapper waits
    os.mkfifo(fifo)
    os.chown(fifo, sshd.uid, -1)
    s = spec(sshd, "sleep", "300", log_path=str(fifo))

    def leaders() -> set[int]:
        return {p for p in sshd.user_pids() if cmdline(p) == "sleep 300"
                and psutil.Process(p).environ().get(MARKER_ENV) == s.group_id}

    async def main() -> None:
        async with ssh_signaller(sshd.options()) as sig:
            starting = asyncio.create_task(sig.spawn(s))
            await asyncio.sleep(0.5)
            assert sshd.kill_sessions()
            await asyncio.sleep(1.0)  # the retry is blocked on the fifo too by now
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                handle = await asyncio.wait_for(starting, 20)
                try:
                    assert isinstance(handle, SSHGroup)
                    assert "unconfirmed" in handle.detail
                    assert sig.connections_opened(sshd.where) >= 2
                    await asyncio.sleep(0.5)
                    assert await asyncio.to_thread(leaders) == {handle.leader_pid}
                finally:
                    await end(handle)
            finally:
                os.close(reader)
        assert await asyncio.to_thread(leaders) == set()

    asyncio.run(main())


def test_kill_reports_what_it_could_not_kill(sshd: SSHServer) -> None:
    """A member of another user (here root, in the group's process group) survives SIGKILL:
    kill() gives up at its deadline and says which pid is left, instead of hanging."""
    import subprocess

    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)

    async def main() -> None:
        async with ssh_signaller(sshd.options(ssh_kill_deadline="0.5")) as sig:
            target = SSHTarget.parse(sshd.where)
            # Its start time is part of the proof that pid and process group are the group's.
            start = int(Path(f"/proc/{stranger.pid}/stat").read_text().rpartition(")")[2]
                        .split()[19])
            handle = SSHGroup(sig, target, "g-stranger", stranger.pid, start)
            assert await handle.members() == [stranger.pid]
            assert await handle.kill() == 1
            assert f"left members [{stranger.pid}] alive" in handle.detail
            assert live(stranger.pid)

    try:
        asyncio.run(main())
    finally:
        stranger.kill()
        stranger.wait()


def test_wait_leader_and_natural_end(sshd: SSHServer) -> None:
    async def main() -> None:
        async with ssh_signaller(sshd.options()) as sig:
            handle = await sig.spawn(spec(sshd, "sh", "-c", "sleep 0.5 & sleep 0.2"))
            try:
                status = await asyncio.wait_for(handle.wait_leader(), 10)
                assert handle.leader_status is status
                assert await handle.wait(10)
                assert await handle.members() == []
            finally:
                await end(handle)

    asyncio.run(main())


def test_many_waits_share_one_connection(sshd: SSHServer) -> None:
    """More waits than channels allowed: the extra ones poll instead of failing."""

    async def main() -> None:
        async with ssh_signaller(sshd.options(ssh_max_channels="4")) as sig:
            handles = [await sig.spawn(spec(sshd, "sleep", "1")) for _ in range(6)]
            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(h.wait(20) for h in handles)), 30)
                assert results == [True] * 6
                assert sig.connections_opened(sshd.where) == 1
            finally:
                for h in handles:
                    await end(h)

    asyncio.run(main())


# ---------------------------------------------------------------- adopt


def test_adopt_own_group_only(sshd: SSHServer, options: dict[str, str]) -> None:
    async def main() -> None:
        async with ssh_signaller(options) as first:
            handle = await first.spawn(spec(sshd, "sh", "-c", "sleep 300 & sleep 300"))
        try:
            async with ssh_signaller(options) as second:
                with pytest.raises(AdoptRefused, match="does not carry"):
                    await second.adopt("g-other", handle.leader_pid, None, sshd.where)
                with pytest.raises(AdoptRefused, match="reused"):
                    await second.adopt(handle.group_id, handle.leader_pid,
                                       handle.leader_start_time - 100, sshd.where)
                adopted = await second.adopt(handle.group_id, handle.leader_pid,
                                             handle.leader_start_time, sshd.where)
                assert adopted.containment is handle.containment
                assert adopted.pgid == handle.pgid
                assert await asyncio.to_thread(
                    wait_until, lambda: len(local_members(sshd, handle)) == 3)
                assert len(await adopted.members()) == 3
                assert await adopted.kill() == 3
                assert local_members(sshd, handle) == set()
                await adopted.close()
                with pytest.raises(AdoptRefused, match="no live process"):
                    await second.adopt(handle.group_id, handle.leader_pid, None, sshd.where)
        finally:
            async with ssh_signaller(options) as third:
                with contextlib.suppress(AdoptRefused):
                    await end(await third.adopt(handle.group_id, handle.leader_pid, None,
                                                sshd.where))

    asyncio.run(main())


# ---------------------------------------------------------------- refusals


def test_unknown_host_key_is_refused(sshd: SSHServer) -> None:
    other = sshd.tmp / "other_known_hosts"
    pub = (sshd.other_key.parent / (sshd.other_key.name + ".pub")).read_text().split()
    other.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")  # a different key

    async def main() -> None:
        for path in (other, sshd.tmp / "empty_known_hosts"):
            path.touch()
            async with ssh_signaller(sshd.options(known_hosts=str(path))) as sig:
                with pytest.raises(TargetUnreachable) as caught:
                    await sig.spawn(spec(sshd, "true"))
                why = caught.value.why
                assert "tried" not in why  # refused at once, not retried
                assert f"[127.0.0.1]:{sshd.port}" in why
                assert "not trusted" in why
                assert str(path) in why
                assert "ssh-keyscan" in why
        async with ssh_signaller(sshd.options(known_hosts=str(sshd.tmp / "missing"))) as sig:
            with pytest.raises(TargetUnreachable, match="does not exist"):
                await sig.spawn(spec(sshd, "true"))

    asyncio.run(main())


def test_insecure_option_skips_host_key_check_with_warning(
        sshd: SSHServer, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        empty = sshd.tmp / "empty_known_hosts"
        empty.touch()
        opts = sshd.options(known_hosts=str(empty), ssh_insecure_no_host_key_check="1")
        async with ssh_signaller(opts) as sig:
            handle = await sig.spawn(spec(sshd, "true"))
            assert await handle.wait(10)

    with caplog.at_level(logging.WARNING, logger="tether.signallers.ssh"):
        asyncio.run(main())
    assert "host key NOT verified" in caplog.text


def test_wrong_client_key_is_refused(sshd: SSHServer) -> None:
    async def main() -> None:
        async with ssh_signaller(sshd.options(ssh_key=str(sshd.other_key))) as sig:
            with pytest.raises(TargetUnreachable) as caught:
                await sig.spawn(spec(sshd, "true"))
            why = caught.value.why
            assert f"authentication as {sshd.user} failed" in why
            assert str(sshd.other_key) in why
            assert "authorized_keys" in why

    asyncio.run(main())


def test_refused_port_names_host_and_next_step(sshd: SSHServer) -> None:
    with socket_port() as port:
        where = f"{sshd.user}@127.0.0.1:{port}"

        async def main() -> None:
            async with ssh_signaller(sshd.options(ssh_retries="1")) as sig:
                with pytest.raises(TargetUnreachable) as caught:
                    await sig.spawn(LaunchSpec("g-x", ("true",),
                                               {MARKER_ENV: "g-x", AGENT_ENV: "test"},
                                               where=where))
                assert f"127.0.0.1:{port}" in caught.value.why
                assert "refused" in caught.value.why
                assert "sshd runs there" in caught.value.why
                assert "tried 2 times" in caught.value.why

        asyncio.run(main())


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A port nobody listens on (bound, not listening, for the test's duration)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


# ------------------------------------------------------------------ output capture


@pytest.fixture
def serve_ssh(tmp_path: Path, sshd: SSHServer) -> Iterator[Daemon]:
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"sout-{tmp_path.name[-8:]}",
                               "--signaller-option", f"known_hosts={sshd.known_hosts}",
                               "--signaller-option", f"ssh_key={sshd.client_key}"], tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


def logs_json(d: Daemon, *args: str) -> list[dict[str, Any]]:
    res = d.cli("logs", *args, "-o", "json", check=True)
    return [json.loads(line) for line in res.stdout.splitlines()]


def stream_bytes(chunks: list[dict[str, Any]], stream: str) -> bytes:
    return b"".join(base64.b64decode(c["data_base64"]) if c["data"] is None
                    else c["data"].encode() for c in chunks if c["stream"] == stream)


def test_an_ssh_groups_stdout_and_stderr_reach_tether_logs(
        serve_ssh: Daemon, sshd: SSHServer, user_dir: Path) -> None:
    """A kill group without --log is captured through its spool on the host: both
    streams, tagged, byte for byte (invalid UTF-8, a line without its newline), followed
    to the end; `--tail`; a `--log` group and a `keep` group say where their output went
    instead (a read of one alone and an Attach are refused saying so)."""
    d = serve_ssh
    target = f"ssh:{sshd.where}"
    script = ("echo out-1; echo err-1 >&2; printf 'no newline'; printf '\\000\\377' >&2; "
              "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; echo last")
    gid = d.cli("spawn", "--session", "so", "--target", target, "--env", "PATH=/usr/bin:/bin",
                "--", "sh", "-c", script, check=True).stdout.strip()
    chunks = logs_json(d, "so", "--group", gid, "--follow")  # ends with the group's output
    assert chunks[-1]["event"] == "output_ended", chunks[-1]
    assert stream_bytes(chunks, "stdout") == (
        b"out-1\nno newline" + b"".join(b"line-%d\n" % i for i in range(2000)) + b"last\n")
    assert stream_bytes(chunks, "stderr") == b"err-1\n\x00\xff"
    assert not [c for c in chunks if c.get("event") in ("not_captured", "capture_lost")]
    # The tail is of the group's lines in capture order; stdout and stderr are two spool
    # files, read one after the other: the last lines may be either stream's.
    def joined(cs: list[dict[str, Any]]) -> bytes:
        return b"".join(base64.b64decode(c["data_base64"]) if c["data"] is None
                        else c["data"].encode() for c in cs if c["stream"] in ("stdout",
                                                                               "stderr"))

    shown = joined(logs_json(d, "so", "--group", gid, "--tail", "2"))
    assert shown and joined(chunks).endswith(shown) and shown.count(b"\n") <= 2, shown
    assert b"last\n" in shown or b"\x00\xff" in shown, shown

    logged = d.cli("spawn", "--session", "so", "--label", "logged", "--target", target,
                   "--env", "PATH=/usr/bin:/bin", "--log", f"{user_dir}/so.log", "--",
                   "sh", "-c", "echo to-the-file; exec sleep 300", check=True).stdout.strip()
    kept = d.cli("spawn", "--session", "so", "--target", target, "--orphan-policy", "keep",
                 "--env", "PATH=/usr/bin:/bin", "--", "sh", "-c", "exec sleep 300",
                 check=True).stdout.strip()
    alone = d.cli("logs", "so", "--group", logged)
    assert alone.returncode != 0 and f"--log {user_dir}/so.log" in alone.stderr, alone.stderr
    whole = logs_json(d, "so")
    (note,) = [c for c in whole if c["group_id"] == logged]
    assert note["event"] == "not_captured" and "--log" in note["data"]
    assert note["label"] == "logged"
    (note,) = [c for c in whole if c["group_id"] == kept]
    assert note["event"] == "not_captured" and "keep group" in note["data"], note
    assert stream_bytes(whole, "stdout").endswith(b"last\n"), "the captured group as before"
    with Client(d.address) as c, pytest.raises(Conflict) as refused:
        c.attach("so", logged)
    assert "--log" in str(refused.value)
    d.cli("stop", "so", check=True)


class Collected:
    """An ``OutputSink`` that keeps what it is given; ``until`` waits for a condition."""

    def __init__(self) -> None:
        self.data: dict[Stream, bytearray] = {Stream.STDOUT: bytearray(),
                                               Stream.STDERR: bytearray()}
        self.notes: list[tuple[Note, str]] = []
        self.done = False
        self.changed = asyncio.Event()

    def output(self, stream: Stream, data: bytes) -> None:
        self.data[stream] += data
        self.changed.set()

    def note(self, event: Note, text: str) -> None:
        self.notes.append((event, text))
        self.changed.set()

    def ended(self) -> None:
        self.done = True
        self.changed.set()

    async def until(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()


def test_the_spool_is_private_and_removed_when_the_group_ends(
        sshd: SSHServer, user_dir: Path) -> None:
    """The spool is a directory only the ssh user can enter; it goes with the group. A
    `keep` group and a `--log` group get none (nothing captures them)."""

    async def main() -> None:
        async with ssh_signaller(sshd.options()) as sig:
            gate = user_dir / "gate"
            os.mkfifo(gate)
            os.chown(gate, sshd.uid, -1)
            handle = await sig.spawn(replace(spec(
                sshd, "sh", "-c", f"echo one; read _ < {gate}; echo two >&2"), capture=True))
            try:
                stdio = handle.stdio
                assert isinstance(stdio, SpoolStdio)
                spool = Path(stdio.spool)
                st = spool.stat()
                assert st.st_uid == sshd.uid and st.st_mode & 0o777 == 0o700
                sink = Collected()
                stdio.start(sink)
                await sink.until(lambda: bytes(sink.data[Stream.STDOUT]) == b"one\n")
                await asyncio.to_thread(gate.write_text, "go\n")
                assert await handle.wait(30)
                stdio.finish()
                assert bytes(sink.data[Stream.STDERR]) == b"two\n"
                assert sink.done and sink.notes == []
                assert not spool.exists()
            finally:
                await end(handle)
            for other in (replace(spec(sshd, "true"), capture=True,
                                  orphan_policy=OrphanPolicy.KEEP),
                          replace(spec(sshd, "true", log_path=str(user_dir / "x.log")),
                                  capture=True)):
                h = await sig.spawn(other)
                try:
                    assert h.stdio is None
                finally:
                    await end(h)

    asyncio.run(main())


def test_a_dropped_connection_in_the_middle_loses_no_output(
        sshd: SSHServer, user_dir: Path) -> None:
    """The program writes into its spool whatever the connection does: after sshd's
    sessions are killed mid-run, reading goes on over a new connection from the offsets
    it had reached, and every byte arrives once, in order."""

    async def main() -> None:
        async with ssh_signaller(sshd.options()) as sig:
            gate = user_dir / "gate"
            os.mkfifo(gate)
            os.chown(gate, sshd.uid, -1)
            script = (f"echo before; echo e-before >&2; read _ < {gate}; i=0; "
                      "while [ $i -lt 3000 ]; do echo after-$i; i=$((i+1)); done; "
                      "echo e-after >&2; printf end")
            handle = await sig.spawn(replace(spec(sshd, "sh", "-c", script), capture=True))
            try:
                stdio = handle.stdio
                assert isinstance(stdio, SpoolStdio)
                sink = Collected()
                stdio.start(sink)
                await sink.until(lambda: bytes(sink.data[Stream.STDERR]) == b"e-before\n")
                assert sshd.kill_sessions()
                await asyncio.to_thread(gate.write_text, "go\n")
                assert await handle.wait(60)
                stdio.finish()
                assert bytes(sink.data[Stream.STDOUT]) == b"before\n" + b"".join(
                    b"after-%d\n" % i for i in range(3000)) + b"end"
                assert bytes(sink.data[Stream.STDERR]) == b"e-before\ne-after\n"
                assert not [n for n in sink.notes if n[0] is Note.CAPTURE_LOST], sink.notes
                assert sig.connections_opened(sshd.where) >= 2
                assert not Path(stdio.spool).exists()
            finally:
                await end(handle)

    asyncio.run(main())
