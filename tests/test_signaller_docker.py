"""The docker signaller against a real engine (tests/plugins/docker_engine.py).

What is alive is checked independently of tether's own scan: ``docker top`` (the
engine's host-side view of the container's processes) and files the children wrote.
The stop sequence is written out with the handle methods, as the agent's generic stop
routine uses them: TERM + CONT, wait(grace), kill(), members() == [].
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from tests.plugins.docker_engine import IMAGE_NOKILL, IMAGE_NOSH, DockerEngine
from tests.plugins.processes import Daemon, start_daemon, stop_daemon
from tether.core.errors import AdoptRefused, StartFailed, TargetUnreachable
from tether.core.model import AGENT_ENV, MARKER_ENV, Containment, FailureClass, OrphanPolicy
from tether.signallers import docker as docker_signaller_module
from tether.signallers.base import GroupHandle, LaunchSpec, Signaller, SignallerContext
from tether.signallers.docker import ContainerGone, DockerGroup, DockerSignaller, MissingTool
from tether.signallers.registry import load_factory

pytestmark = pytest.mark.docker

GRACE = 1.0


def spec(container: Any, *argv: str, env: dict[str, str] | None = None, cwd: str = "",
         log_path: str = "", group_id: str = "") -> LaunchSpec:
    gid = group_id or f"g-{uuid.uuid4().hex[:8]}"
    full_env = {"PATH": "/bin", **(env or {}), MARKER_ENV: gid, AGENT_ENV: "test"}
    return LaunchSpec(gid, tuple(argv), full_env, cwd=cwd, log_path=log_path,
                      where=container.name)


@contextlib.asynccontextmanager
async def docker_signaller(engine: DockerEngine) -> AsyncIterator[DockerSignaller]:
    s = DockerSignaller(SignallerContext("test", "", {"docker_host": engine.url}))
    try:
        yield s
    finally:
        await s.aclose()


def live_processes(container: Any) -> list[tuple[str, str]]:
    """(stat, args) of every live process in the container, from `docker top`."""
    top = container.top(ps_args="-o pid,stat,args")
    titles = top["Titles"]
    rows = [dict(zip(titles, row, strict=True)) for row in top["Processes"] or []]
    return [(r["STAT"], r["COMMAND"] if "COMMAND" in r else r["ARGS"]) for r in rows
            if not r["STAT"].startswith("Z")]


def running(container: Any, needle: str) -> list[str]:
    return [args for _, args in live_processes(container) if needle in args]


def exec_text(container: Any, *argv: str) -> str:
    result = container.exec_run(list(argv))
    assert result.exit_code == 0, result.output
    return str(result.output.decode())


async def stop(handle: GroupHandle, grace: float = GRACE) -> str:
    """The agent's stop sequence, spelled out: returns "requested" or "forced"."""
    await handle.send_signal(signal.SIGTERM)
    await handle.send_signal(signal.SIGCONT)
    if await handle.wait(grace):
        outcome = "requested"
    else:
        await handle.kill()
        outcome = "forced"
    assert await handle.members() == []
    await handle.close()
    return outcome


async def eventually(pred: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    delay = 0.02
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


def test_registered_under_its_kind() -> None:
    assert load_factory("docker") is DockerSignaller
    assert isinstance(DockerSignaller(SignallerContext()), Signaller)


def test_spawn_learns_leader_pid_and_pgid_inside_the_container(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            h = await s.spawn(spec(docker_container, "sleep", "1001"))
            assert isinstance(h, GroupHandle)
            assert isinstance(h, DockerGroup)
            assert h.containment is Containment.SUBREAPER
            assert h.leader_pid > 1
            # The container's own view of that pid: our sleep, leading its group and session.
            stat = exec_text(docker_container, "cat", f"/proc/{h.leader_pid}/stat")
            fields = stat.rpartition(")")[2].split()
            assert "(sleep)" in stat
            assert int(fields[2]) == h.pgid == h.leader_pid  # pgrp
            assert int(fields[3]) == h.leader_pid  # session
            assert abs(h.leader_start_time - time.time()) < 30
            assert await h.members() == [h.leader_pid]
            assert running(docker_container, "sleep 1001")
            assert h.leader_status is None
            assert repr(h).startswith(f"<DockerGroup {h.group_id} docker:")
            assert await stop(h) == "requested"
            status = await asyncio.wait_for(h.wait_leader(), 5)
            assert status.signal == signal.SIGTERM
            assert not running(docker_container, "sleep 1001")

    asyncio.run(body())


def test_environment_is_exactly_the_spec_and_cwd_and_log_apply(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    async def run_to_end(s: DockerSignaller, launch: LaunchSpec) -> str:
        h = await s.spawn(launch)
        status = await asyncio.wait_for(h.wait_leader(), 10)
        assert status.exit_code == 0
        assert await h.wait(5)
        return exec_text(docker_container, "cat", launch.log_path)

    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            # No PATH in the spec: `cat` is found in the container's PATH, and the child
            # gets no PATH (nor the HOME, HOSTNAME Docker adds, nor a shell's PWD/SHLVL).
            launch = spec(docker_container, "cat", "/proc/self/environ",
                          log_path="/var/log/env.log",
                          env={"GREETING": "hello world", "SHLVL": "7", "EMPTY": ""})
            launch = LaunchSpec(launch.group_id, launch.argv,
                                {k: v for k, v in launch.env.items() if k != "PATH"},
                                log_path=launch.log_path, where=launch.where)
            environ = await run_to_end(s, launch)
            env = dict(item.split("=", 1) for item in environ.split("\0") if item)
            assert env == {"GREETING": "hello world", "SHLVL": "7", "EMPTY": "",
                           MARKER_ENV: launch.group_id, AGENT_ENV: "test"}
            # cwd, argv with spaces and shell characters, log appended (not truncated).
            for _ in range(2):
                out = await run_to_end(s, spec(docker_container, "sh", "-c", 'pwd; echo "$1"',
                                               "tether-test", "two words; $(x) *",
                                               cwd="/tmp", log_path="/var/log/out.log"))
            assert out == "/tmp\ntwo words; $(x) *\n" * 2

    asyncio.run(body())


def test_tree_with_setsid_escapee_is_stopped_with_escalation(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    # The escapee leaves the session and ignores SIGTERM (so does its sleep, SIG_IGN is
    # inherited): TERM ends the rest, KILL must find the escapee by its marker.
    tree = ("sh", "-c",
            "setsid sh -c 'trap \"\" TERM; sleep 1011; true' & sleep 1012 & wait")

    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            h = await s.spawn(spec(docker_container, *tree))
            await eventually(lambda: running(docker_container, "sleep 1011")
                             and running(docker_container, "sleep 1012"), what="the tree")
            members = await h.members()
            assert len(members) >= 4, members  # sh, sleep 1012, setsid sh, sleep 1011
            sessions = {exec_text(docker_container, "cat", f"/proc/{p}/stat")
                        .rpartition(")")[2].split()[3] for p in members}
            assert len(sessions) == 2, "the escapee should be in a session of its own"
            assert await stop(h) == "forced"
            assert [args for _, args in live_processes(docker_container)] == ["sleep 1000000"]
            docker_container.reload()
            assert docker_container.status == "running", "the container must not be killed"

    asyncio.run(body())


def test_a_process_that_ignores_sigterm_needs_kill(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            h = await s.spawn(spec(docker_container, "sh", "-c", "trap '' TERM; sleep 1021; true"))
            await eventually(lambda: running(docker_container, "sleep 1021"), what="sleep")
            assert await h.send_signal(signal.SIGTERM) == 2
            assert not await h.wait(GRACE)
            assert running(docker_container, "sleep 1021")
            assert await h.kill() >= 2
            assert await h.members() == []
            assert not running(docker_container, "sleep 1021")
            status = await asyncio.wait_for(h.wait_leader(), 5)
            assert status.signal == signal.SIGKILL
            # Signalling an empty group is a no-op that says so.
            assert await h.send_signal(signal.SIGTERM) == 0
            assert await h.wait(0)

    asyncio.run(body())


def test_cooperative_group_ends_within_grace_event_driven(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            h = await s.spawn(spec(docker_container, "sh", "-c", "sleep 1031 & wait"))
            await eventually(lambda: running(docker_container, "sleep 1031"), what="sleep")
            assert await h.send_signal(signal.SIGTERM) == 2
            assert await h.wait(10)
            assert not running(docker_container, "sleep 1031")

    asyncio.run(body())


def test_leader_exit_leaves_detached_members_until_stopped(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            h = await s.spawn(spec(docker_container, "sh", "-c",
                                   "(setsid sleep 1041 &); exit 3"))
            status = await asyncio.wait_for(h.wait_leader(), 10)
            assert status.exit_code == 3
            await eventually(lambda: running(docker_container, "sleep 1041"), what="orphan")
            assert not await h.wait(0.3)
            assert len(await h.members()) == 1
            assert await stop(h) == "requested"
            assert not running(docker_container, "sleep 1041")

    asyncio.run(body())


def test_container_stopped_or_removed_mid_operation_is_a_clear_error(
        docker_engine: DockerEngine, make_container: Callable[..., Any]) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            c = make_container()
            h = await s.spawn(spec(c, "sleep", "1051"))
            waiter = asyncio.ensure_future(h.wait())
            await asyncio.to_thread(c.kill)
            # Every process ended with the container: the watcher's wait ends...
            assert await asyncio.wait_for(waiter, 10)
            # ...but nothing can be signalled or verified there any more, and the error says why.
            with pytest.raises(ContainerGone, match=f"{c.name}.*stopped") as info:
                await h.send_signal(signal.SIGTERM)
            assert isinstance(info.value, TargetUnreachable)
            assert info.value.target == f"docker:{c.name}"
            with pytest.raises(TargetUnreachable, match="stopped"):
                await h.members()
            with pytest.raises(TargetUnreachable, match=rf"{c.name}.*not running.*docker start"):
                await s.spawn(spec(c, "sleep", "1"))
            await asyncio.to_thread(c.remove)
            with pytest.raises(ContainerGone, match="removed"):
                await h.kill()
            with pytest.raises(TargetUnreachable, match=r"not found; start it or fix the name"):
                await s.spawn(spec(c, "sleep", "1"))
            assert await h.wait(1)
            await h.close()

    asyncio.run(body())


def test_image_without_kill_is_refused_with_a_clear_error(
        docker_engine: DockerEngine, make_container: Callable[..., Any]) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            c = make_container(IMAGE_NOKILL)
            with pytest.raises(MissingTool, match=rf"{c.name}.*`kill`.*procps") as info:
                await s.spawn(spec(c, "sleep", "1061"))
            assert info.value.tool == "kill"
            assert isinstance(info.value, TargetUnreachable)
            # Refused before anything ran.
            assert [args for _, args in live_processes(c)] == ["sleep 1000000"]

    asyncio.run(body())


def test_image_without_sh_is_refused_with_a_clear_error(
        docker_engine: DockerEngine, make_container: Callable[..., Any]) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            c = make_container(IMAGE_NOSH)
            with pytest.raises(MissingTool, match=rf"{c.name}") as info:
                await s.spawn(spec(c, "sleep", "1071"))
            assert info.value.tool == "sh"
            assert "POSIX shell" in str(info.value)

    asyncio.run(body())


@pytest.mark.parametrize("owns", [False, True])
def test_container_is_killed_only_when_the_group_owns_it(
        docker_engine: DockerEngine, make_container: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch, owns: bool) -> None:
    """Members that survive the SIGKILL sweep (simulated: the sweep's signals are dropped)."""
    monkeypatch.setattr(docker_signaller_module, "KILL_SWEEP_DEADLINE", 0.5)

    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            c = make_container()
            launch = replace(spec(c, "sleep", "1091"), owns_target=owns)
            h = await s.spawn(launch)
            assert isinstance(h, DockerGroup)

            async def signals_lost(sig: signal.Signals) -> int:
                return len(await h.members())

            monkeypatch.setattr(h, "send_signal", signals_lost)
            await h.kill()
            c.reload()
            if owns:
                assert c.status == "exited"
                assert await h.wait(1)
            else:
                assert c.status == "running", "a container the group does not own is never killed"
                assert await h.members() == [h.leader_pid]
                monkeypatch.undo()
                assert await stop(h) == "requested"

    asyncio.run(body())


@pytest.mark.parametrize(("argv", "kwargs", "failure", "words"), [
    (("no-such-command", "x"), {}, FailureClass.COMMAND_NOT_FOUND, ["no-such-command"]),
    (("/opt/nothing/here",), {}, FailureClass.COMMAND_NOT_FOUND, ["/opt/nothing/here"]),
    (("/etc",), {}, FailureClass.PERMISSION_DENIED, ["/etc", "executable"]),
    (("sleep", "1"), {"cwd": "/no/such/dir"}, FailureClass.CWD_MISSING, ["/no/such/dir"]),
    (("sleep", "1"), {"log_path": "/no/dir/x.log"}, FailureClass.CWD_MISSING, ["/no/dir/x.log"]),
])
def test_start_failures_are_classified_by_the_wrapper(
        docker_engine: DockerEngine, docker_container: Any, argv: tuple[str, ...],
        kwargs: dict[str, str], failure: FailureClass, words: list[str]) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            with pytest.raises(StartFailed) as info:
                await s.spawn(spec(docker_container, *argv, **kwargs))
            assert info.value.failure is failure
            for word in [*words, docker_container.name]:
                assert word in info.value.message

    asyncio.run(body())


def test_exec_failure_after_the_checks_is_classified(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    """A script whose #! interpreter is missing passes the checks; the exec itself fails."""
    exec_text(docker_container, "sh", "-c",
              "printf '#!/nonexistent/interpreter\\necho never\\n' >/tmp/broken; "
              "chmod +x /tmp/broken")

    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            with pytest.raises(StartFailed) as info:
                await s.spawn(spec(docker_container, "/tmp/broken"))
            assert info.value.failure is FailureClass.COMMAND_NOT_FOUND
            for word in ("/tmp/broken", "interpreter", docker_container.name):
                assert word in info.value.message
            # A command that ends at once, successfully, is not a failure.
            h = await s.spawn(spec(docker_container, "true"))
            assert (await asyncio.wait_for(h.wait_leader(), 5)).exit_code == 0

    asyncio.run(body())


def test_adopt_a_running_tree(docker_engine: DockerEngine, docker_container: Any) -> None:
    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            started = await s.spawn(spec(docker_container, "sleep", "1081"))
            with pytest.raises(AdoptRefused, match="reused"):
                await s.adopt("g-adopt", started.leader_pid, started.leader_start_time - 100,
                              docker_container.name)
            with pytest.raises(AdoptRefused, match="no such process"):
                await s.adopt("g-adopt", 99999, None, docker_container.name)
            with pytest.raises(AdoptRefused, match="init"):
                await s.adopt("g-adopt", 1, None, docker_container.name)
            h = await s.adopt("g-adopt", started.leader_pid, started.leader_start_time,
                              docker_container.name)
            assert h.pgid == started.leader_pid
            assert h.containment is Containment.PGID  # its marker names another group
            assert await h.members() == [started.leader_pid]
            assert await stop(h) == "requested"
            assert (await asyncio.wait_for(h.wait_leader(), 5)).signal is None  # not our exec

    asyncio.run(body())


def test_unreachable_daemon_is_a_target_error() -> None:
    async def body() -> None:
        s = DockerSignaller(SignallerContext(
            "test", "", {"docker_host": "unix:///nonexistent/tether/docker.sock"}))
        try:
            with pytest.raises(TargetUnreachable, match=r"docker:web.*engine.*unreachable"):
                await s.spawn(LaunchSpec("g-1", ("sleep", "1"),
                                         {MARKER_ENV: "g-1", AGENT_ENV: "test"}, where="web"))
        finally:
            await s.aclose()

    asyncio.run(body())


def test_docker_calls_never_wait_on_asyncios_default_pool(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    """Issue 12 item 8: a job hung in the default executor (a probe, a file read) must not
    delay Docker calls: they run on the signaller's own pool."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        release = threading.Event()
        hung = loop.run_in_executor(None, release.wait)
        try:
            async with docker_signaller(docker_engine) as s:
                h = await s.spawn(spec(docker_container, "sh", "-c", "sleep 1111 & wait"))
                assert len(await h.members()) == 2
                assert await stop(h) == "requested"
                assert (await h.wait_leader()).signal == signal.SIGTERM
            assert not hung.done()
        finally:
            release.set()
            await hung

    asyncio.run(body())


# ------------------------------------------------------------------ captured output


@pytest.fixture
def serve_docker(tmp_path: Any, docker_engine: DockerEngine) -> Any:
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"dout-{tmp_path.name[-8:]}",
                               "--signaller-option", f"docker_host={docker_engine.url}"],
                     tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


def logs_json(d: Daemon, *args: str) -> list[dict[str, Any]]:
    res = d.cli("logs", *args, "-o", "json", check=True)
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_a_docker_groups_stdout_and_stderr_reach_tether_logs(
        serve_docker: Daemon, docker_container: Any) -> None:
    """The exec's attached stream feeds the group's ring: both streams, tagged, byte for
    byte (no text in a line ending is lost to the demultiplexer), followed to the end,
    and a `--log` group says where its output went instead."""
    d = serve_docker
    target = f"docker:{docker_container.name}"
    script = ("echo out-1; echo err-1 >&2; printf 'no newline'; printf '\\000\\377' >&2; "
              "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; echo last")
    gid = d.cli("spawn", "--session", "dk", "--target", target, "--", "sh", "-c", script,
                check=True).stdout.strip()
    chunks = logs_json(d, "dk", "--group", gid, "--follow")  # ends with the group's output
    assert chunks[-1]["event"] == "output_ended", chunks[-1]
    out = "".join(c["data"] for c in chunks if c["stream"] == "stdout")
    assert out == "out-1\nno newline" + "".join(f"line-{i}\n" for i in range(2000)) + "last\n"
    err = b"".join(base64.b64decode(c["data_base64"]) if c["data"] is None
                   else c["data"].encode() for c in chunks if c["stream"] == "stderr")
    assert err == b"err-1\n\x00\xff"
    assert not [c for c in chunks if c.get("event") in ("not_captured", "capture_lost")]
    # The tail is of the group's lines in capture order, and dockerd reads stdout and
    # stderr from two pipes: the stderr bytes may be captured before or after the end of
    # stdout. Two lines hold "last" either way, and never the whole output.
    tail = [c for c in logs_json(d, "dk", "--group", gid, "--tail", "2") if c["stream"]]
    shown = "".join(c["data"] or "" for c in tail if c["stream"] == "stdout")
    assert shown.endswith("last\n") and shown in ("last\n", "line-1999\nlast\n"), tail

    logged = d.cli("spawn", "--session", "dk", "--target", target, "--log", "/tmp/dk.log",
                   "--", "sh", "-c", "echo to-the-file", check=True).stdout.strip()
    d.cli("wait", "dk", check=True)
    assert exec_text(docker_container, "cat", "/tmp/dk.log") == "to-the-file\n"
    alone = d.cli("logs", "dk", "--group", logged)
    assert alone.returncode != 0 and "--log /tmp/dk.log" in alone.stderr, alone.stderr
    whole = logs_json(d, "dk")
    (note,) = [c for c in whole if c["group_id"] == logged]
    assert note["event"] == "not_captured" and "--log /tmp/dk.log" in note["data"]
    assert [c["data"] for c in whole if c["group_id"] == gid and c["stream"] == "stdout"
            ][-1].endswith("last\n"), "the captured group is read as before"


def test_a_keep_group_is_not_captured_so_it_outlives_the_agent_and_writes_on(
        docker_engine: DockerEngine, docker_container: Any) -> None:
    """The Engine ends an exec at its next write once the client attached to its output
    went away (status 126): a captured group could not outlive its agent. So a `kill`
    group is captured (it ends with its agent anyway) and a `keep` group is not: with
    no reader at all it writes far more than any pipe holds and ends on its own."""

    async def body() -> None:
        async with docker_signaller(docker_engine) as s:
            exec_text(docker_container, "mkfifo", "/tmp/gate")
            script = ("read _ < /tmp/gate; i=0; while [ $i -lt 20000 ]; do "
                      "echo 0123456789012345678901234567890123456789012345678; "
                      "i=$((i+1)); done; exit 0")
            killed = await s.spawn(replace(spec(docker_container, "sh", "-c", "exec sleep 300"),
                                           capture=True))
            assert killed.stdio is not None, "a kill group's output is captured"
            kept = await s.spawn(replace(spec(docker_container, "sh", "-c", script),
                                         capture=True, orphan_policy=OrphanPolicy.KEEP))
            assert kept.stdio is None, "a keep group's output is not held by the agent"
            exec_text(docker_container, "sh", "-c", "echo go > /tmp/gate")
            status = await asyncio.wait_for(kept.wait_leader(), 60)
            assert status.exit_code == 0, status
            assert await stop(killed) == "requested"
            for h in (killed, kept):
                assert await h.wait(10)
                await h.close()

    asyncio.run(body())
