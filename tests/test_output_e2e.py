"""Captured output and stdio end to end: the real `tether` CLI and the SDK against a real
`tether serve` (coordinator and agent in one daemon, over gRPC).

`tether logs` interleaves a session's groups in the order their output was read, tags
stdout and stderr, cuts `--tail N` at line starts, and `-f` follows until the session is
stopped; roles: a reader reads logs but may not Attach, and Attach is audited. Then an
LSP-style program (JSON-RPC with Content-Length framing on stdin/stdout) is driven
through `attach()`: one writer, many readers, a writer that reconnects, and a stop that
closes stdin first so the server exits on its own, without a signal.

Every wait is for an event (a line the follower printed, a stream's end), never a sleep:
the timeouts below only bound a test that would otherwise hang."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.creds import Tokens
from tests.plugins.processes import Daemon, start_daemon, stop_daemon
from tether.client import Client
from tether.core.errors import Conflict, PermissionDenied, ResourceExhausted
from tether.core.model import ExitReason
from tether.core.output import Note, OutputChunk, Stream

BOUND = 60.0  # only bounds a hang; nothing below waits for time to pass


def gate(path: Path) -> Path:
    os.mkfifo(path)
    return path


def release(fifo: Path) -> None:
    """Open the FIFO a group blocks on (this waits until it opened it too) and say go."""
    with open(fifo, "w") as f:
        f.write("go\n")


class Follower:
    """`tether logs SESSION -f -o json` as a subprocess; its chunks as they come."""

    def __init__(self, d: Daemon, *args: str) -> None:
        env = {**os.environ, "TETHER_COORDINATOR": d.address, **d.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether.coordinator.cli", "logs", *args, "-f", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def until(self, data: str) -> list[dict[str, Any]]:
        """Chunks up to and including the one whose data is ``data``."""
        got = []
        while True:
            item = self.lines.get(timeout=BOUND)
            assert item is not None, f"the follower ended before {data!r}: {self.seen}"
            self.seen.append(item)
            got.append(item)
            if (item.get("data") or "").rstrip("\n") == data.rstrip("\n"):
                return got

    def rest(self) -> list[dict[str, Any]]:
        """Everything until the follower exits by itself; its exit status must be 0."""
        while (item := self.lines.get(timeout=BOUND)) is not None:
            self.seen.append(item)
        assert self.proc.wait(BOUND) == 0, self.proc.stderr.read() if self.proc.stderr else ""
        return self.seen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(BOUND)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def output(chunks: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(label, stream, data) of every output chunk, in order."""
    return [(c["label"], c["stream"], c["data"]) for c in chunks if c["stream"] != "tether"]


def jsonl(d: Daemon, *args: str) -> list[dict[str, Any]]:
    res = d.cli(*args, "-o", "json", check=True)
    return [json.loads(line) for line in res.stdout.splitlines()]


def spawn(d: Daemon, session: str, label: str, script: str, *opts: str) -> str:
    res = d.cli("spawn", "--session", session, "--label", label, *opts, "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


# ------------------------------------------------------------------ tether logs


def test_logs_interleaves_groups_tags_streams_tails_and_follows_until_the_stop(
        serve: Daemon, tmp_path: Path) -> None:
    to_db, to_web = gate(tmp_path / "to-db"), gate(tmp_path / "to-web")
    # web writes, then waits; db writes once released, then web once more: the order the
    # agent reads them in is forced by the follower seeing each step before the next.
    web = spawn(serve, "e2e", "web", f"echo web-out-1; echo web-err-1 >&2; read _ < {to_web}; "
                "echo web-out-2; exec sleep 300")
    db = spawn(serve, "e2e", "db", f"read _ < {to_db}; echo db-out-1; echo db-err-1 >&2; "
               "exec sleep 300")
    follower = Follower(serve, "e2e")
    try:
        first = follower.until("web-out-1")
        assert ("run_started" in [c.get("event") for c in first]), first
        follower.until("web-err-1")
        release(to_db)
        follower.until("db-out-1")
        follower.until("db-err-1")
        release(to_web)
        follower.until("web-out-2")

        # Without -f: the same interleaving, streams tagged, each chunk naming its group.
        backlog = jsonl(serve, "logs", "e2e")
        expected = [("web", "stdout", "web-out-1\n"), ("web", "stderr", "web-err-1\n"),
                    ("db", "stdout", "db-out-1\n"), ("db", "stderr", "db-err-1\n"),
                    ("web", "stdout", "web-out-2\n")]
        assert output(backlog) == expected
        assert output(follower.seen) == expected, "the follower saw them in the same order"
        assert {c["group_id"] for c in follower.seen if c["label"] == "web"} == {web}
        assert {c["agent"] for c in follower.seen} == {f"local-{tmp_path.name[-12:]}"}

        # As text: stdout to stdout, stderr to stderr, each line prefixed with its group.
        text = serve.cli("logs", "e2e", check=True)
        assert text.stdout.splitlines() == [f"web {web} | web-out-1", f"db {db} | db-out-1",
                                            f"web {web} | web-out-2"]
        assert [ln for ln in text.stderr.splitlines() if "[tether]" not in ln] == \
            [f"web {web} | web-err-1", f"db {db} | db-err-1"]

        # --tail N: the last N lines of each group, over both streams, cut at line starts.
        tail2 = jsonl(serve, "logs", "e2e", "--group", web, "--tail", "2")
        assert output(tail2) == [("web", "stderr", "web-err-1\n"), ("web", "stdout", "web-out-2\n")]
        one = serve.cli("logs", "e2e", "--group", web, "--tail", "1", check=True)
        assert one.stdout == "web-out-2\n", "one group: its bytes exactly, unprefixed"
        both = jsonl(serve, "logs", "e2e", "--tail", "1")
        assert output(both) == [("db", "stderr", "db-err-1\n"), ("web", "stdout", "web-out-2\n")]

        # -f ends by itself once the session is stopped and every group's output is complete.
        serve.cli("stop", "e2e", check=True)
        seen = follower.rest()
        ended = [c["group_id"] for c in seen if c.get("event") == Note.OUTPUT_ENDED.value]
        assert sorted(ended) == sorted([web, db])
        assert output(seen) == expected, "nothing was repeated or lost while following"
    finally:
        follower.kill()


def test_logs_of_an_unknown_session_or_group_is_a_clear_error(serve: Daemon) -> None:
    res = serve.cli("logs", "no-such-session")
    assert res.returncode != 0 and "no-such-session" in res.stderr
    spawn(serve, "known", "x", "exec sleep 300")
    res = serve.cli("logs", "known", "--group", "g-00000000")
    assert res.returncode != 0 and "g-00000000" in res.stderr
    serve.cli("stop", "known", check=True)


# ------------------------------------------------------------------ roles and audit


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[Daemon, dict[str, str]]]:
    """`tether serve` with tokens: admin, operator and reader client token files."""
    t = Tokens(tmp_path / "tokens")
    files = {role: t.add(role).token_file for role in ("admin", "operator", "reader")}
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"lg-{tmp_path.name[-8:]}",
                               "--token-file", t.file()], tmp_path)
    try:
        yield d, files
    finally:
        stop_daemon(d)


def test_a_reader_reads_logs_but_may_not_attach_and_attach_is_audited(
        guarded: tuple[Daemon, dict[str, str]]) -> None:
    d, files = guarded
    op, rd, admin = (["--token-file", files[r]] for r in ("operator", "reader", "admin"))
    res = d.cli("spawn", "--session", "roles", "--stdin", "pipe", *op, "--",
                "sh", "-c", "echo hello; while read line; do echo \"got $line\"; done")
    assert res.returncode == 0, res.stderr
    gid = res.stdout.strip()
    follower = Follower(d, "roles", "--group", gid, *rd)
    try:
        follower.until("hello\n")
        # A reader may follow output...
        logs = d.cli("logs", "roles", *rd, check=True)
        assert logs.stdout == f"{gid} | hello\n"
        # ...but not attach, even only to read: Attach is for operators.
        with Client(d.address, token_file=files["reader"]) as reader, \
                pytest.raises(PermissionDenied) as refused:
            reader.attach("roles", gid)
        assert "Attach" in str(refused.value)
        with Client(d.address, token_file=files["operator"]) as operator, \
                operator.attach("roles", gid, write=True) as a:
            # Audited once it holds the writer role, not only when it ends (days later).
            now = [json.loads(line) for line in
                   d.cli("audit", "-o", "json", *admin, check=True).stdout.splitlines()]
            assert [(e["role"], e["result"], e.get("details", {}).get("write"))
                    for e in now if e["method"] == "CoordinatorService/Attach"] == \
                [("reader", "PERMISSION_DENIED", None), ("operator", "OK", "true")]
            a.write(b"ping\n")
            a.close_stdin()
            got = list(a)  # until the group's output ended (cat-like: EOF ends it)
        assert b"".join(c.data for c in got if c.is_output) == b"got ping\n"
        assert got[-1].event == Note.OUTPUT_ENDED.value
        assert output(follower.rest())[-1] == ("", "stdout", "got ping\n"), \
            "the reader's follower saw the writer's effect, then ended with the group"
    finally:
        follower.kill()
    audit = d.cli("audit", "-o", "json", *admin, check=True)
    entries = [json.loads(line) for line in audit.stdout.splitlines()]
    attaches = [e for e in entries if e["method"] == "CoordinatorService/Attach"]
    assert [(e["role"], e["result"]) for e in attaches] == \
        [("reader", "PERMISSION_DENIED"), ("operator", "OK")]
    ok = attaches[1]
    assert ok["session"] == "roles" and ok["group"] == gid
    assert ok["details"]["write"] == "true"
    assert not [e for e in entries if e["method"].endswith("/Logs")], "reading is not audited"


# ------------------------------------------------------------------ an LSP over attach

LSP_SERVER = r'''
import json, os, signal, sys

def term(*_):
    sys.stderr.write("got TERM\n")
    sys.stderr.flush()
    sys.exit(3)

signal.signal(signal.SIGTERM, term)
inp, out = sys.stdin.buffer, sys.stdout.buffer

def read_message():
    headers = {}
    while True:
        line = inp.readline()
        if not line:
            return None
        line = line.rstrip(b"\r\n")
        if not line:
            break
        key, value = line.split(b":", 1)
        headers[key.strip().lower()] = value.strip()
    return json.loads(inp.read(int(headers[b"content-length"])))

def send(message):
    body = json.dumps(message).encode()
    out.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
    out.flush()

while (msg := read_message()) is not None:
    if "id" not in msg:
        continue  # a notification
    if msg["method"] == "initialize":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"pid": os.getpid()}})
    elif msg["method"] == "echo":
        send({"jsonrpc": "2.0", "id": msg["id"], "result": msg["params"]})
    else:
        send({"jsonrpc": "2.0", "id": msg["id"],
              "error": {"code": -32601, "message": "no method " + msg["method"]}})
sys.stderr.write("stdin closed: exiting\n")
sys.stderr.flush()
'''


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


class Framed:
    """Reads Content-Length framed JSON-RPC messages from an attachment's stdout chunks."""

    def __init__(self, attachment: Any) -> None:
        self.a = attachment
        self.buf = b""
        self.stderr = b""
        self.events: list[str] = []

    def _fill(self) -> bool:
        chunk: OutputChunk | None = self.a.read(timeout=BOUND)
        if chunk is None:
            return False
        if chunk.stream is Stream.STDOUT:
            self.buf += chunk.data
        elif chunk.stream is Stream.STDERR:
            self.stderr += chunk.data
        else:
            self.events.append(chunk.event)
        return True

    def message(self) -> dict[str, Any]:
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if sep:
                length = int(head.split(b":", 1)[1])
                if len(rest) >= length:
                    self.buf = rest[length:]
                    return dict(json.loads(rest[:length]))
            assert self._fill(), f"the output ended inside a message: {self.buf!r}"

    def drain(self) -> None:
        while self._fill():
            pass


def test_an_lsp_server_over_attach_one_writer_many_readers_and_a_stop_by_stdin(
        serve: Daemon, tmp_path: Path) -> None:
    server = tmp_path / "lsp.py"
    server.write_text(LSP_SERVER)
    with Client(serve.address) as c:
        entry = c.spawn([sys.executable, "-u", str(server)], session="lsp", label="lsp",
                        stdin="pipe", stop_stdin_grace=30, grace=30)
        gid = entry.view.group_id
        editor = Framed(c.attach("lsp", gid, write=True))
        watchers = [Framed(c.attach("lsp", gid)) for _ in range(2)]
        with pytest.raises(Conflict) as second:
            c.attach("lsp", gid, write=True)
        assert "already has a writer" in str(second.value)
        (g,) = c.session("lsp").groups
        assert g.view.stdin_open and g.view.stdin_writer, "the view names the writer"

        init = frame({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
        editor.a.write(init[:7])  # a header split across writes reaches it whole
        editor.a.write(init[7:])
        tricky = {"text": "\r\n\r\nContent-Length: 3\r\n\r\n", "unicode": "héllo ✓"}
        editor.a.write(frame({"jsonrpc": "2.0", "method": "initialized", "params": {}}) +
                       frame({"jsonrpc": "2.0", "id": 2, "method": "echo", "params": tricky}) +
                       frame({"jsonrpc": "2.0", "id": 3, "method": "nope", "params": {}}))
        replies = [editor.message() for _ in range(3)]
        assert [r["id"] for r in replies] == [1, 2, 3]
        assert replies[0]["result"]["pid"] == g.view.leader_pid
        assert replies[1]["result"] == tricky
        assert replies[2]["error"]["code"] == -32601
        for w in watchers:
            assert [w.message() for _ in range(3)] == replies, "every reader sees the same bytes"

        # The editor goes away without closing stdin; it reconnects and carries on.
        editor.a.close()
        again = Framed(c.attach("lsp", gid, write=True))
        again.a.write(frame({"jsonrpc": "2.0", "id": 4, "method": "echo", "params": [4]}))
        assert again.message() == {"jsonrpc": "2.0", "id": 4, "result": [4]}
        assert watchers[0].message()["id"] == 4

        # A stop closes stdin first: the server sees end-of-file and exits on its own.
        report = c.stop("lsp")
        (stopped,) = report.groups
        rec = stopped.exit
        assert rec is not None and rec.reason is ExitReason.REQUESTED and rec.clean, rec
        assert rec.signal is None and rec.exit_code == 0, rec
        assert "stdin was closed first" in rec.detail
        for w in (again, *watchers):
            w.drain()  # each stream ends by itself: the group's output is complete
            assert w.events[-1] == Note.OUTPUT_ENDED.value
            assert w.stderr == b"stdin closed: exiting\n", "no TERM reached it"
        again.a.close()
        for w in watchers:
            w.a.close()


# ------------------------------------------------------------------ closing stdin

EOF_PROG = "echo ready; cat >/dev/null; echo got-eof"


def read_until(a: Any, data: bytes) -> bytes:
    """An attachment's output until ``data`` appeared in it (or it ended)."""
    seen = b""
    while data not in seen:
        chunk = a.read(timeout=BOUND)
        assert chunk is not None, f"the output ended before {data!r}: {seen!r}"
        seen += chunk.data if chunk.is_output else b""
    return seen


def test_a_keep_groups_program_reads_end_of_file_when_its_stdin_is_closed(
        serve: Daemon) -> None:
    # The guardian holds a keep group's output pipes, never its stdin: the agent's end is
    # the only writer, so closing it is end-of-file to the program.
    with Client(serve.address) as c:
        for policy in ("kill", "keep"):
            entry = c.spawn(["sh", "-c", EOF_PROG], session=f"eof-{policy}", stdin="pipe",
                            orphan_policy=policy)
            with c.attach(f"eof-{policy}", entry.view.group_id, write=True, tail=10) as a:
                read_until(a, b"ready")
                a.write(b"hello\n")
                a.close_stdin()
                assert b"got-eof" in read_until(a, b"got-eof"), policy


def test_close_stdin_then_detaching_at_once_still_closes_it(serve: Daemon) -> None:
    # close_stdin() returns once the agent closed the pipe (its stdin_closed note), so the
    # cancel that leaving `with` sends can no longer overtake the close.
    with Client(serve.address) as c:
        for i in range(8):
            entry = c.spawn(["sh", "-c", EOF_PROG], session="detach", label=f"p{i}",
                            stdin="pipe")
            gid = entry.view.group_id
            with c.attach("detach", gid, write=True) as a:
                a.write(b"x" * 100_000)
                a.close_stdin()
            out = b"".join(ch.data for ch in c.logs("detach", groups=[gid], follow=True,
                                                  timeout=BOUND)
                           if ch.is_output)
            assert out.endswith(b"got-eof\n"), out


def test_one_credential_may_have_at_most_max_logs_streams_logs_calls_open(
        tmp_path: Path) -> None:
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"ml-{tmp_path.name[-8:]}",
                               "--max-logs-streams", "2"], tmp_path)
    try:
        with Client(d.address) as c:
            c.spawn(["sh", "-c", "echo hi; exec sleep 300"], session="many", label="w")
            followers = [c.logs("many", follow=True, timeout=BOUND) for _ in range(2)]
            for f in followers:  # each call is open: it answered its first chunk
                assert next(f) is not None
            with pytest.raises(ResourceExhausted) as third:
                list(c.logs("many"))
            assert "--max-logs-streams 2" in str(third.value)
            followers[0].close()  # type: ignore[attr-defined]
            # The coordinator counts it gone once its call ended there (the cancel reaches
            # it asynchronously): ask until admitted; the deadline only bounds a hang.
            deadline = time.monotonic() + BOUND
            while True:
                try:
                    ok = [ch for ch in c.logs("many") if ch.is_output]
                    break
                except ResourceExhausted:
                    assert time.monotonic() < deadline, "the closed call was never counted out"
            assert b"hi\n" in b"".join(ch.data for ch in ok)
            followers[1].close()  # type: ignore[attr-defined]
            c.stop("many")
    finally:
        stop_daemon(d)
