"""The remote toolkit (ops.sh, its parser, RemoteGroup) under dash, bash and busybox ash.

``LocalShell`` runs the real script on this host, so every claim is checked here with
psutil against real processes, without a Docker engine or an SSH server in between.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.plugins.processes import pid_alive
from tether.core.errors import InvalidSpec, StartFailed, TargetUnreachable
from tether.core.model import AGENT_ENV, MARKER_ENV, Containment, FailureClass
from tether.signallers.base import LaunchSpec
from tether.signallers.remote.group import RemoteGroup
from tether.signallers.remote.localshell import LocalShell
from tether.signallers.remote.wire import (
    OPS,
    TABLE_END,
    ShellResult,
    TargetGone,
    check_spec,
    exec_failure,
    parse_scan,
    parse_spawn,
    spawn_argv,
    start_failure,
    stat_rows,
)
from tether.signallers.sshspool import parse_spool

AGENT = f"toolkit-{os.getpid()}"
PATH = "/usr/bin:/bin"
SHELLS = [("dash",), ("bash",), ("busybox", "sh")]


@pytest.fixture(params=SHELLS, ids=lambda s: s[0])
def shell(request: pytest.FixtureRequest) -> LocalShell:
    argv: tuple[str, ...] = request.param
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    return LocalShell(argv)


def launch(*argv: str, env: dict[str, str] | None = None, cwd: str = "", log: str = "",
           agent: str = AGENT) -> LaunchSpec:
    gid = f"g-{uuid.uuid4().hex[:12]}"
    return LaunchSpec(gid, argv, {"PATH": PATH, **(env or {}), MARKER_ENV: gid, AGENT_ENV: agent},
                      cwd=cwd, log_path=log)


async def start(shell: LocalShell, spec: LaunchSpec) -> RemoteGroup:
    result = await shell.run(OPS, spawn_argv(spec, mode="detach", default_search="/bin:/usr/bin"),
                             what="starting")
    reply = parse_spawn(result)
    if reply.failed is not None:
        raise start_failure(*reply.failed, spec, "here", PATH)
    assert reply.ok is not None, result
    if reply.exited is not None and (failed := exec_failure(reply.exited, spec, "here")):
        raise failed
    pid, ticks, btime, clk = reply.ok
    return RemoteGroup(shell, spec.group_id, spec.env[AGENT_ENV], pid, ticks, btime, clk,
                       containment=Containment.PGID)


@pytest.fixture
async def groups() -> AsyncIterator[list[RemoteGroup]]:
    made: list[RemoteGroup] = []
    yield made
    for g in made:
        await g.kill()


def marked(gid: str) -> set[int]:
    found = set()
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARKER_ENV) == gid:
                found.add(p.pid)
        except psutil.Error:
            continue
    return found


async def outsider(*argv: str, env: dict[str, str] | None = None
                   ) -> asyncio.subprocess.Process:
    """A process in a session of its own, started by the test, not by the toolkit."""
    return await asyncio.create_subprocess_exec(*argv, start_new_session=True, env=env,
                                                stdin=subprocess.DEVNULL)


async def end(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


def start_tick(pid: int) -> int:
    return stat_rows([Path(f"/proc/{pid}/stat").read_text().strip()])[0].start


async def settled(pred: object, what: str) -> None:
    """Wait for a condition of the outside world (processes starting), bounded."""
    assert callable(pred)
    for _ in range(500):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_child_gets_exactly_the_spec(shell: LocalShell, tmp_path: Path,
                                               groups: list[RemoteGroup]) -> None:
    args = ["two words", "it's", '"dq"', "$(touch /tmp/pwned)", "*", "", "new\nline", "-e", "--"]
    log = tmp_path / "out.log"
    odd = {"ODD": "it's a \"$(value)\"\nwith; newline", "EMPTY": ""}
    # No shell in between: a child shell may export PWD or SHLVL of its own.
    spec = launch("printf", "[%s]\\n", *args, env=odd, cwd=str(tmp_path), log=str(log))
    environ = launch("cat", "/proc/self/environ", env=odd, cwd=str(tmp_path), log=str(log))
    for each in (spec, environ):
        g = await start(shell, each)
        groups.append(g)
        assert await g.wait(10)
    printed, _, text = log.read_text().partition("[--]\n")
    assert printed + "[--]\n" == "".join(f"[{a}]\n" for a in args)
    assert dict(item.split("=", 1) for item in text.split("\0") if item) == dict(environ.env)
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize(("argv", "kw", "failure"), [
    (("no-such-command-tether",), {}, FailureClass.COMMAND_NOT_FOUND),
    (("/etc/passwd",), {}, FailureClass.PERMISSION_DENIED),
    (("/etc",), {}, FailureClass.PERMISSION_DENIED),
    (("true",), {"cwd": "/no/such/dir"}, FailureClass.CWD_MISSING),
    (("true",), {"log": "/no/such/dir/x.log"}, FailureClass.CWD_MISSING),
])
async def test_start_failures_are_classified(shell: LocalShell, argv: tuple[str, ...],
                                             kw: dict[str, str], failure: FailureClass) -> None:
    with pytest.raises(StartFailed) as caught:
        await start(shell, launch(*argv, cwd=kw.get("cwd", ""), log=kw.get("log", "")))
    assert caught.value.failure is failure


async def test_an_exec_failure_after_the_checks_is_classified(shell: LocalShell,
                                                              tmp_path: Path) -> None:
    script = tmp_path / "broken"
    script.write_text("#!/nonexistent/interpreter\necho never\n")
    script.chmod(0o755)
    with pytest.raises(StartFailed) as caught:
        await start(shell, launch(str(script)))
    assert caught.value.failure is FailureClass.COMMAND_NOT_FOUND
    assert "interpreter" in caught.value.message


async def test_a_member_named_to_fool_the_parser_is_found_and_killed(
        shell: LocalShell, tmp_path: Path, groups: list[RemoteGroup]) -> None:
    """A command name may hold newlines and ") " (a symlink's name becomes the comm): the
    scan must neither lose such a member nor misread its fields."""
    names = ["a)\nb) Z 1 2", "x\nE\nZ\nS\nE"]  # fake fields; fake framing lines
    for name in names:
        (tmp_path / name).symlink_to(shutil.which("sleep") or "/bin/sleep")
    g = await start(shell, launch("sh", "-c", 'setsid "$0" 300 & "$1" 300 & wait',
                                  *(str(tmp_path / n) for n in names)))
    groups.append(g)
    await settled(lambda: len(marked(g.group_id)) == 3, "the tree")
    truth = marked(g.group_id)
    assert {psutil.Process(p).name() for p in truth} >= set(names)
    assert set(await g.members()) == truth
    assert await g.kill() == 3
    assert not any(pid_alive(p) for p in truth)


async def test_both_marks_are_required(shell: LocalShell, groups: list[RemoteGroup]) -> None:
    """A process with the group's id but another agent instance's marker is not a member."""
    g = await start(shell, launch("sleep", "300"))
    groups.append(g)
    other = await outsider("sleep", "301",
                           env={MARKER_ENV: g.group_id, AGENT_ENV: "another-agent/1"})
    try:
        await settled(lambda: len(marked(g.group_id)) == 2, "both processes")
        assert await g.members() == [g.leader_pid]
        assert await g.kill() == 1
        assert pid_alive(other.pid)
        assert await g.members() == []
    finally:
        await end(other)


async def test_signals_recheck_the_start_time(shell: LocalShell) -> None:
    """``signal`` sends nothing to a pid whose start tick is not the one it was told."""
    child = await outsider("sleep", "300")
    try:
        tick = start_tick(child.pid)
        wrong = await shell.run(OPS, ["signal", "KILL", "", f"{child.pid}:{tick + 1}",
                                      f"-{child.pid}:{tick - 1}"], what="signalling")
        assert wrong.status == 0
        assert pid_alive(child.pid)
        right = await shell.run(OPS, ["signal", "TERM,CONT", "", f"{child.pid}:{tick}"],
                                what="signalling")
        assert right.status == 0
        assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGTERM
    finally:
        await end(child)


async def test_watch_beats_until_its_targets_are_gone(shell: LocalShell) -> None:
    child = await outsider("sleep", "300")
    try:
        target = f"{child.pid}:{start_tick(child.pid)}"
        alive = await shell.run(OPS, ["watch", "3", target], what="watching")
        assert (alive.status, alive.out) == (1, ".\n.\nalive\n")
        await end(child)
        gone = await shell.run(OPS, ["watch", "0", target], what="watching")
        assert (gone.status, gone.out) == (0, "gone\n")
    finally:
        await end(child)


async def test_without_grep_the_marks_are_not_searched(tmp_path: Path,
                                                       groups: list[RemoteGroup]) -> None:
    """A host without grep: the scan says so, and the group is held by its process group."""
    busybox, dash = shutil.which("busybox"), shutil.which("dash")
    if busybox is None or dash is None:
        pytest.skip("needs busybox and dash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "cat", "env", "setsid", "sleep", "id"):
        (bin_dir / tool).symlink_to(busybox)
    # dash looks tools up in PATH only (busybox's own sh would find its grep applet anyway).
    shell = LocalShell((dash,), env={"PATH": str(bin_dir)})
    g = await start(shell, launch("sh", "-c", "sleep 300 & wait", env={"PATH": str(bin_dir)}))
    groups.append(g)
    await settled(lambda: len(marked(g.group_id)) == 2, "the tree")
    result = await shell.run(OPS, ["scan", f"{MARKER_ENV}={g.group_id}", f"{AGENT_ENV}={AGENT}",
                                   ""], what="scanning")
    snap = parse_scan(result, g.clk, shell.target)
    assert not snap.markers
    assert not any(p.marked for p in snap.procs.values())
    assert set(await g.members()) == marked(g.group_id)


def test_an_incomplete_scan_is_never_an_empty_group() -> None:
    """Whatever cut the answer short, it raises: it never reads as "no members"."""
    me = Path("/proc/self/stat").read_text().strip()
    scanner = int(me.split()[0])
    whole = f"P {scanner}\nN 100.00\nS\n{me}\n{TABLE_END}\nZ\n"
    assert parse_scan(ShellResult(0, whole), 100, "t").procs == {}
    for cut in (whole.replace("Z\n", ""), whole.replace(f"{me}\n", ""),
                whole.replace(f"P {scanner}\n", ""), whole.replace(f"{TABLE_END}\n", ""),
                whole.replace(f"{TABLE_END}\n", "E\n")):
        with pytest.raises(TargetUnreachable, match="incomplete answer"):
            parse_scan(ShellResult(0, cut), 100, "t")
    with pytest.raises(TargetUnreachable):
        parse_scan(ShellResult(1, whole), 100, "t")


async def test_a_group_from_another_boot_is_never_signalled(shell: LocalShell) -> None:
    """After a reboot every pid and start tick is new, and boots are much alike: a process
    with the leader's pid and start tick is somebody else. The boot id tells."""
    child = await outsider("sleep", "300")
    try:
        tick = start_tick(child.pid)
        g = RemoteGroup(shell, f"g-{uuid.uuid4().hex[:12]}", AGENT, child.pid, tick, 0, 100,
                        containment=Containment.PGID, boot="00000000-0000-0000-0000-000000000000")
        with pytest.raises(TargetGone, match="rebooted"):
            await g.members()
        with pytest.raises(TargetGone):
            await g.send_signal(signal.SIGKILL)
        assert await g.wait(5)  # everything of that boot ended with it
        assert pid_alive(child.pid)
        assert "rebooted" in g.detail
    finally:
        await end(child)


@pytest.mark.parametrize(("argv", "cwd", "marked", "agent", "words"), [
    (("sleep", "1\0"), "", True, AGENT, "NUL"),
    (("sleep", "1"), "relative/dir", True, AGENT, "absolute"),
    (("A=B", "x"), "", True, AGENT, "'='"),
    (("sleep", "1"), "", False, AGENT, "TETHER_GROUP"),
    (("sleep", "1"), "", True, "another-agent/1", "TETHER_AGENT"),
])
def test_specs_a_remote_target_cannot_run_are_refused(argv: tuple[str, ...], cwd: str,
                                                      marked: bool, agent: str,
                                                      words: str) -> None:
    """Refused before anything starts: a NUL cannot travel, a relative cwd means nothing
    there, `env` would eat a command holding '=', and without both marks the group's
    processes could not be found."""
    base = launch("sleep", "1")
    env = dict(base.env) if marked else {"PATH": PATH}
    with pytest.raises(InvalidSpec, match=words):
        check_spec(LaunchSpec(base.group_id, argv, env, cwd=cwd), agent, "ssh:host")


def spool_op(shell: LocalShell, *args: str) -> tuple[list[tuple[str, int, bytes]], set[str]]:
    """``ops.sh spool ARGS`` with its output as bytes (LocalShell decodes as text)."""
    done = subprocess.run([*shell.shell, "-c", OPS, "tether", "spool", *args],
                          capture_output=True, check=True, timeout=30)
    return parse_spool(done.stdout)


async def test_a_spool_start_writes_both_streams_to_a_private_directory(
        shell: LocalShell) -> None:
    """`spawn spool`: stdout and stderr go to two files of a mode-0700 directory, read back
    byte for byte from any offset (in pieces of at most MAX, the older bytes skipped past
    CAP), and removed by a final read once nothing is left."""
    spec = launch("sh", "-c", "printf 'a\\000\\377b'; printf 'err' >&2; i=0; "
                  "while [ $i -lt 100 ]; do echo 0123456789; i=$((i+1)); done")
    result = await shell.run(OPS, spawn_argv(spec, mode="spool", default_search=PATH),
                             what="starting")
    reply = parse_spawn(result)
    assert reply.ok is not None and reply.spool, result
    spool = Path(reply.spool)
    assert spool.name.startswith("tether-out.") and spool.stat().st_mode & 0o777 == 0o700
    group = RemoteGroup(shell, spec.group_id, AGENT, reply.ok[0], reply.ok[1], reply.ok[2],
                        reply.ok[3], containment=Containment.PGID)
    assert await group.wait(30)
    whole = b"a\x00\xffb" + b"0123456789\n" * 100
    items, flags = spool_op(shell, str(spool), "0", "0", "1000000", "1000000", "0", "1")
    assert items == [("o", 0, whole), ("e", 0, b"err")] and flags == {"Z"}
    items, _ = spool_op(shell, str(spool), "2", "3", "5", "1000000", "0", "0")
    assert items == [("o", 2, whole[2:7])], "from the offsets, at most MAX; stderr is read"
    items, _ = spool_op(shell, str(spool), "0", "0", "1000000", "11", "0", "0")
    assert items == [("ko", len(whole) - 11, b""), ("o", len(whole) - 11, whole[-11:]),
                     ("e", 0, b"err")]
    items, flags = spool_op(shell, str(spool), "0", "3", "1000", "1000000", "1", "0")
    assert items == [("o", 0, whole[:1000])] and "R" not in flags and spool.exists()
    items, flags = spool_op(shell, str(spool), "1000", "3", "1000", "1000000", "1", "0")
    assert items == [("o", 1000, whole[1000:])] and "R" in flags and not spool.exists()
    assert spool_op(shell, str(spool), "0", "0", "10", "10", "0", "0") == ([], {"G", "Z"})
    with pytest.raises(subprocess.CalledProcessError):
        spool_op(shell, "/etc", "0", "0", "10", "10", "2", "0")
