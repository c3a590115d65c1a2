"""The remote toolkit's wire: ``ops.sh``, the transport it runs over, and its one parser.

The docker and ssh signallers run the same POSIX shell script (``ops.sh``, package data)
on their targets through a :class:`RemoteShell`, the way httpcore writes HTTP once over
pluggable network backends: only the transport differs (``docker exec`` through the
Engine API, an SSH channel through asyncssh, or a local ``sh`` for tests). Everything the
script prints is read here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Final, Protocol

from tether.core.errors import InvalidSpec, StartFailed, TargetUnreachable
from tether.core.model import AGENT_ENV, MARKER_ENV, FailureClass, LeaderStatus
from tether.signallers.base import LaunchSpec
from tether.signallers.membership import Proc, parse_stat

#: The script, read once. Every operation and output line is documented at its top.
OPS: Final = resources.files(__package__).joinpath("ops.sh").read_text(encoding="utf-8")

_SIGNAL_NAME: Final = re.compile(r"[A-Z0-9]+\Z")
#: Ends the process table in ``scan`` and ``proc`` output (see ops.sh).
TABLE_END: Final = "E end-of-process-table"


class TargetGone(TargetUnreachable):
    """The target itself ended (a container stopped or was removed): every process that
    lived there ended with it, so a wait for emptiness is over, though nothing can be
    signalled or verified there any more."""


@dataclass(frozen=True)
class ShellResult:
    """What one run of the script gave: its exit status and output."""

    status: int | None
    out: str
    err: str = ""

    def rows(self) -> list[list[str]]:
        return [line.split() for line in self.out.splitlines() if line.strip()]

    def first_line(self) -> str:
        for text in (self.out, self.err):
            if text.strip():
                return text.strip().splitlines()[0]
        return ""


class RemoteShell(Protocol):
    """A transport that runs a POSIX shell script on one target.

    ``argv`` reaches the script as its positional parameters, never inside a shell
    string. Transport failures raise ``TargetUnreachable`` naming the target and the next
    step; a target that ended raises ``TargetGone``.
    """

    #: ``docker:web``, ``ssh:deploy@build-1:22``: for messages.
    target: str

    async def run(self, script: str, argv: Sequence[str], *, what: str,
                  timeout: float | None = None, unverified: str = "") -> ShellResult:
        """Run ``script`` with ``argv`` to its end. ``what`` says what for (messages);
        ``unverified`` what may have happened if the answer was lost after sending."""
        ...

    async def follow(self, script: str, argv: Sequence[str], *, what: str) -> ShellResult | None:
        """Run a long operation (``watch``) whose heartbeat lines prove the path alive; None
        if this transport cannot hold one open now (the caller polls instead)."""
        return None

    @contextlib.asynccontextmanager
    async def listen(self, keys: Sequence[str]) -> AsyncIterator[asyncio.Event]:
        """An event set whenever something under ``keys`` may have changed (Docker's event
        stream); by default never set, so callers rely on their polling."""
        yield asyncio.Event()


# ---------------------------------------------------------------- parsing


def stat_rows(lines: Sequence[str]) -> list[Proc]:
    """``/proc/PID/stat`` lines as printed between ``S`` and the table's end. A command name may hold
    newlines: a line that does not parse is joined with the next until it does. A name is
    at most 15 bytes, so a piece of one never parses on its own."""
    rows: list[Proc] = []
    pending = ""
    for line in lines:
        text = f"{pending}\n{line}" if pending else line
        p = parse_stat(text)
        if p is not None:
            rows.append(p)
            pending = ""
        elif text.count("\n") < 16:
            pending = text
        else:
            pending = line  # never a record: start again from here
    return rows


def uptime_ticks(text: str, clk: int) -> int | None:
    """``/proc/uptime``'s first field (centiseconds) in clock ticks, rounded down."""
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        return None
    centis = int(whole) * 100 + int((frac + "00")[:2])
    return centis * clk // 100


@dataclass(frozen=True)
class Snapshot:
    """One ``scan``: the target's process table, proofs read in the same pass."""

    procs: Mapping[int, Proc]
    #: Clock ticks since boot read before the table (lets the rule trust older pgid members).
    now: int | None
    #: Whether the marker search could run there (no grep: it could not).
    markers: bool
    #: The target's boot id ("" if it has none): pids and start times hold within one boot.
    boot: str = ""


def parse_scan(result: ShellResult, clk: int, target: str) -> Snapshot:
    """The one parser of ``scan`` output. Marked processes (both marks, or in the group's
    cgroup) come back with ``marked`` set; the scan's own processes and pid 1 (a
    container's init, the host's init: never a member) are left out. An incomplete answer
    raises ``TargetUnreachable``: an empty table that was not read completely must never
    look like an empty group."""
    lines = result.out.splitlines()
    scanner = now = None
    markers = True
    boot = ""
    proven: set[int] = set()
    table: list[str] = []
    in_table = ended = False
    for line in lines:
        if in_table:
            if line == TABLE_END:
                in_table, ended = False, True
            else:
                table.append(line)
            continue
        tag, _, rest = line.partition(" ")
        if tag == "P" and rest.isdigit():
            scanner = int(rest)
        elif tag == "N":
            now = uptime_ticks(rest, clk)
        elif tag == "I":
            boot = rest
        elif tag == "S":
            in_table = True
        elif tag in ("M", "C") and rest.isdigit():
            proven.add(int(rest))
        elif tag == "G":
            markers = False
    procs = {p.pid: p for p in stat_rows(table)}
    done = ended and lines[-1:] == ["Z"]
    if result.status != 0 or not done or scanner is None or scanner not in procs:
        raise TargetUnreachable(target, "the process scan there gave an incomplete answer "
                                        f"(status {result.status}: "
                                        f"{(result.err.strip() or result.first_line())[:200]!r}); "
                                        "is /proc mounted and readable?")
    mine = {scanner}
    grew = True
    while grew:
        more = {p.pid for p in procs.values() if p.ppid in mine} - mine
        grew = bool(more)
        mine |= more
    out = {}
    for pid, p in procs.items():
        if pid in mine or pid <= 1:
            continue
        out[pid] = Proc(p.pid, p.ppid, p.pgid, p.sid, p.start, p.state, p.comm,
                        pid in proven)
    return Snapshot(out, now, markers, boot)


@dataclass(frozen=True)
class ProcInfo:
    """One ``proc`` answer: a process for adoption or an exec check."""

    proc: Proc | None
    btime: int
    clk: int
    #: "yes" (both marks), "no", "unreadable", or "unknown" (no grep there).
    marked: str
    cgroup: str = ""
    mount: tuple[str, str] | None = None
    boot: str = ""

    def epoch(self, ticks: int) -> float:
        return self.btime + ticks / max(self.clk, 1)

    def cgroup_dir(self) -> str:
        """Its cgroup as a path on the target, if the cgroup2 mount is known."""
        if not self.cgroup or self.mount is None:
            return ""
        root, point = self.mount
        rel = self.cgroup
        if root != "/" and rel.startswith(root):
            rel = rel[len(root):]
        return point.rstrip("/") + rel


def parse_proc(result: ShellResult, target: str) -> ProcInfo:
    lines = result.out.splitlines()
    if (result.status != 0 or lines[-1:] != ["Z"] or "S" not in lines
            or TABLE_END not in lines):
        raise TargetUnreachable(target, "looking at a process there gave an incomplete answer "
                                        f"(status {result.status}: {result.first_line()[:200]!r})")
    start, end = lines.index("S"), lines.index(TABLE_END)
    rows = stat_rows(lines[start + 1:end])
    info: dict[str, str] = {}
    for line in lines[:start] + lines[end + 1:]:
        tag, _, rest = line.partition(" ")
        info.setdefault(tag, rest)
    marked = ("yes" if "M" in info else "unreadable" if "U" in info
              else "unknown" if "G" in info else "no")
    root, _, point = info.get("m", "").partition(" ")
    return ProcInfo(rows[0] if rows else None, int(info.get("B", "0") or 0),
                    int(info.get("H", "100") or 100), marked, info.get("c", ""),
                    (root, point) if point else None, info.get("I", ""))


# ---------------------------------------------------------------- specs and starts


def marks(group_id: str, agent_marker: str) -> tuple[str, str]:
    """The two variables that mark a group's processes on every target."""
    return f"{MARKER_ENV}={group_id}", f"{AGENT_ENV}={agent_marker}"


def check_spec(spec: LaunchSpec, agent_marker: str, target: str) -> None:
    """What any remote target refuses before anything runs (``InvalidSpec``)."""

    def bad(what: str, field_: str) -> InvalidSpec:
        return InvalidSpec(f"{what}; target {target!r} cannot run it", field=field_)

    if not spec.argv or not spec.argv[0]:
        raise bad("argv is empty", "argv")
    values = (*spec.argv, *spec.env, *spec.env.values(), spec.cwd, spec.log_path, spec.where)
    if any("\0" in v for v in values):
        raise bad("a field holds a NUL byte, which no process can receive", "argv")
    if any(not k or "=" in k for k in spec.env):
        raise bad("an environment name is empty or holds '='", "env")
    if "=" in spec.argv[0]:
        raise bad(f"command {spec.argv[0]!r} holds '=', which `env` would take for a "
                  "variable; rename it or run it through sh", "argv")
    for path, name in ((spec.cwd, "cwd"), (spec.log_path, "log_path")):
        if path and not path.startswith("/"):
            raise bad(f"{name} {path!r} is not an absolute path", name)
    wanted = {MARKER_ENV: spec.group_id, AGENT_ENV: agent_marker}
    for name, value in wanted.items():
        if spec.env.get(name) != value or "\n" in value:
            raise bad(f"the group's environment must carry {name}={value} (it has "
                      f"{spec.env.get(name)!r}): without it, tether cannot find its processes "
                      "there", "env")


def spawn_argv(spec: LaunchSpec, *, mode: str, default_search: str, cgmode: str = "none",
               cgroot: str = "", cgname: str = "") -> list[str]:
    """``spawn`` arguments. ``default_search``: where to look for a command when the group's
    environment has no PATH ("-": the shell's own PATH there)."""
    path = spec.env.get("PATH")
    return ["spawn", mode, spec.cwd, spec.log_path, "0" if path is None else "1",
            default_search if path is None else path, cgmode, cgroot, cgname,
            f"{MARKER_ENV}={spec.group_id}", str(len(spec.env)),
            *(f"{k}={v}" for k, v in spec.env.items()), *spec.argv]


@dataclass(frozen=True)
class SpawnReply:
    ran: bool
    failed: tuple[int, str] | None = None
    #: pid, start ticks, btime, clock ticks per second
    ok: tuple[int, int, int, int] | None = None
    cgroup: str = ""
    exited: int | None = None
    notes: list[str] = field(default_factory=list)
    boot: str = ""
    #: The private directory a ``spool`` start writes the program's output to ("": none).
    spool: str = ""


def parse_spawn(result: ShellResult) -> SpawnReply:
    """The ``spawn`` reply; whatever a login shell printed before it is skipped."""
    lines = result.out.splitlines()
    if "tether-spawn 1" not in lines:
        return SpawnReply(ran=False)
    failed = ok = None
    cgroup = boot = spool = ""
    exited = None
    notes: list[str] = []
    for line in lines[lines.index("tether-spawn 1") + 1:]:
        tag, _, rest = line.partition(" ")
        if tag == "fail" and failed is None:
            code, _, why = rest.partition(" ")
            failed = (int(code) if code.isdigit() else -1, why)
        elif tag == "ok" and len(parts := rest.split()) == 4 and all(x.isdigit() for x in parts):
            ok = (int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]))
        elif tag == "cgroup":
            cgroup = rest
        elif tag == "exited" and rest.isdigit():
            exited = int(rest)
        elif tag == "note":
            notes.append(rest)
        elif tag == "boot":
            boot = rest
        elif tag == "spool" and rest.startswith("/"):
            spool = rest
    return SpawnReply(True, failed, ok, cgroup, exited, notes, boot, spool)


_FAILURES: Final[Mapping[int, tuple[FailureClass, str]]] = {
    127: (FailureClass.COMMAND_NOT_FOUND,
          "command {cmd!r} not found {where} (searched PATH={path}); check the spelling, give "
          "an absolute path, install it there, or set PATH in the group's environment"),
    126: (FailureClass.PERMISSION_DENIED,
          "command {cmd!r} {where} is not executable (not a file this user may execute); "
          "`chmod +x` it or run it through its interpreter"),
    125: (FailureClass.CWD_MISSING,
          "working directory {cwd!r} does not exist {where}; create it or pass another cwd"),
    124: (FailureClass.PERMISSION_DENIED,
          "cannot enter working directory {cwd!r} {where}: permission denied; fix its "
          "permissions or choose another cwd"),
    123: (FailureClass.PERMISSION_DENIED,
          "cannot append to log file {log!r} {where}: permission denied; fix its permissions "
          "or choose another log"),
    122: (FailureClass.CWD_MISSING,
          "the directory of log file {log!r} does not exist {where}; create it or choose "
          "another log"),
    121: (FailureClass.COMMAND_NOT_FOUND,
          "a tool tether needs is missing {where} ({detail}); install util-linux (setsid) "
          "and coreutils (env), or busybox"),
    120: (FailureClass.PERMISSION_DENIED,
          "a cgroup was required, but there is no writable cgroup v2 directory {where} "
          "({notes}); delegate one and name it with ssh_cgroup_root, or use "
          "ssh_containment=auto"),
    119: (FailureClass.INVALID_SPEC, "cannot run {cmd!r} {where}: {detail}"),
}


def start_failure(code: int, detail: str, spec: LaunchSpec, where: str, path: str,
                  notes: Sequence[str] = ()) -> StartFailed:
    """The one table of start failure classes and messages; ``where`` reads like "in
    container 'web'" or "on deploy@build-1"."""
    failure, template = _FAILURES.get(code, (
        FailureClass.IMMEDIATE_CRASH, "the start wrapper {where} failed with status {code}: "
                                      "{detail}"))
    return StartFailed(failure, template.format(
        cmd=spec.argv[0], where=where, path=path, cwd=spec.cwd, log=spec.log_path, code=code,
        detail=detail, notes="; ".join(notes) or "none found"))


def exec_failure(code: int, spec: LaunchSpec, where: str) -> StartFailed | None:
    """The leader died before its exec was seen, with 126/127 from ``env``: the exec
    itself failed (a script whose ``#!`` interpreter is missing)."""
    if code not in (126, 127):
        return None
    return StartFailed(
        FailureClass.COMMAND_NOT_FOUND if code == 127 else FailureClass.PERMISSION_DENIED,
        f"command {spec.argv[0]!r} could not be executed {where} (exit {code} from the "
        "exec); if it is a script, check that its #! interpreter exists there")


def status_from_code(code: int | None) -> LeaderStatus:
    """A shell's or containerd's exit status: above 128 means killed by signal N - 128."""
    if code is None:
        return LeaderStatus()
    if code > 128:
        with contextlib.suppress(ValueError):
            return LeaderStatus(signal=int(signal.Signals(code - 128)))
    return LeaderStatus(exit_code=code)


def signal_names(sigs: Sequence[signal.Signals]) -> str:
    """``TERM,CONT``: names go over the wire, never numbers (they differ between
    architectures)."""
    names = [s.name.removeprefix("SIG") for s in sigs]
    if not names or not all(_SIGNAL_NAME.match(n) for n in names):
        raise ValueError(f"not signal names: {names}")
    return ",".join(names)
