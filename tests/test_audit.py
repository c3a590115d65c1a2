"""The audit log: every mutating call, who made it (role and credential id), on which
session or group, and how it ended; in the state directory and the daemon's log, never
with an environment value; rotated, private, and read back with `tether audit`."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.plugins.creds import Tokens, call
from tests.plugins.processes import Daemon, start_daemon, stop_daemon, wait_until
from tether.core.audit import MAX_ENTRY, AuditLog, read_entries
from tether.rpc.auth import REFUSED_RECORDED, AuthInterceptor, ServerAuth, load_tokens
from tether.rpc.security import ClientSecurity, MalformedRequestInterceptor, load_token
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc
from tether.v1 import coordinator_pb2 as cpb

SECRET = "hunter2-do-not-log-me"


def credential_of(dial: ClientSecurity) -> str:
    return "token:" + hashlib.sha256(load_token(dial.token_file).encode()).hexdigest()[:8]


def audit(d: Daemon, dial: ClientSecurity, *args: str) -> list[dict[str, Any]]:
    res = d.cli("audit", "-o", "json", "--token-file", dial.token_file, *args)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_serve_audits_mutating_calls_with_who_what_and_result(tmp_path: Path) -> None:
    t = Tokens(tmp_path)
    admin, operator, reader = t.add("admin"), t.add("operator"), t.add("reader")
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"au-{tmp_path.name[-8:]}",
                               "--token-file", t.file()], tmp_path)
    op = ["--token-file", operator.token_file]
    try:
        spawned = d.cli("spawn", "--session", "s", "--env", f"API_KEY={SECRET}", *op, "--",
                        "sleep", "300")
        assert spawned.returncode == 0, spawned.stderr
        gid = spawned.stdout.strip()
        refused = d.cli("spawn", "--session", "s", "--token-file", reader.token_file, "--",
                        "sleep", "1")
        assert refused.returncode == 2 and "refused" in refused.stderr
        assert d.cli("keepalive", "s", "--ttl", "600", *op).returncode == 0
        assert d.cli("signal", "s", "CONT", *op).returncode == 0
        assert d.cli("sessions", *op).returncode == 0  # a read: not audited
        assert d.cli("orphans", *op).returncode == 0  # without --sweep: a read
        assert d.cli("orphans", "--sweep", *op).returncode == 0
        assert d.cli("stop", "s", *op).returncode == 0

        entries = audit(d, admin)
        calls = [(e["method"].split("/")[-1], e["role"], e["result"]) for e in entries]
        assert calls == [("Spawn", "operator", "OK"), ("Spawn", "reader", "PERMISSION_DENIED"),
                         ("KeepAlive", "operator", "OK"), ("SignalSession", "operator", "OK"),
                         ("ListOrphans", "operator", "OK"), ("StopSession", "operator", "OK")]
        spawn = entries[0]
        assert spawn["method"] == "CoordinatorService/Spawn"
        assert spawn["credential"] == credential_of(operator) and spawn["proof"] == "token"
        assert spawn["session"] == "s" and spawn["group"] == gid
        assert spawn["details"]["program"] == "sleep"
        assert spawn["peer"].startswith("ipv4:127.0.0.1:")
        assert "may not call it" in entries[1]["message"]
        assert entries[4]["details"]["sweep"] == "true"
        assert entries[5]["session"] == "s"

        text = (tmp_path / "st" / "audit.jsonl").read_text()
        assert [json.loads(line) for line in text.splitlines()] == entries
        for where in (text, d.log()):
            assert SECRET not in where and "API_KEY" not in where
        # Admitted calls are logged as their entry; a refused one as a short summary.
        assert d.log().count("INFO tether.core.audit: audit {") == len(entries) - 1
        assert d.log().count("INFO tether.core.audit: audit refused CoordinatorService/Spawn "
                             f"for reader {credential_of(reader)} from ipv4:127.0.0.1:") == 1

        # --since: a duration, or a time (here: that of the signal, keeping what followed).
        assert len(audit(d, admin, "--since", "1h")) == len(entries)
        since = audit(d, admin, "--since", entries[3]["time"])
        assert [e["method"].split("/")[-1] for e in since] == ["SignalSession", "ListOrphans",
                                                                "StopSession"]
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        assert audit(d, admin, "--since", later.isoformat()) == []
        table = d.cli("audit", "--token-file", admin.token_file)
        assert table.returncode == 0 and "PERMISSION_DENIED" in table.stdout

        res = d.cli("audit", *op)
        assert res.returncode == 2 and "ReadAudit" in res.stderr and "admin" in res.stderr
        bad = d.cli("audit", "--since", "yesterday-ish", "--token-file", admin.token_file)
        assert bad.returncode == 2 and "neither a duration" in bad.stderr
    finally:
        stop_daemon(d)


#: A line as `tether audit` prints one, smuggled inside a session name.
FORGED = "2024-01-01T00:00:00.000Z  admin   token:00000000  StopSession  prod  -  OK"


async def test_a_hostile_field_reaches_the_audit_table_escaped(tmp_path: Path) -> None:
    """A refused call is audited before its request is validated: its session name may
    hold anything. The admin's table must not carry raw control characters (erase the
    line, move the cursor) nor let a newline start a forged row."""
    t = Tokens(tmp_path)
    admin, reader = t.add("admin"), t.add("reader")
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"au-{tmp_path.name[-8:]}",
                               "--token-file", t.file()], tmp_path)
    try:
        hostile = "x\r\x1b[2K\x1b[1A\x00\u202e\n" + FORGED
        code, _ = await call(d.address, "/tether.v1.CoordinatorService/StopSession",
                             cpb.StopSessionRequest(session_id=hostile), reader)
        assert code is grpc.StatusCode.PERMISSION_DENIED
        res = await asyncio.to_thread(d.cli, "audit", "--token-file", admin.token_file)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert len(lines) == 2, lines  # the header and the one refused call
        assert not any(c in res.stdout for c in "\r\x1b\x00\u202e")
        assert "\\x1b[2K" in lines[1] and "\\n" + FORGED[:20] in lines[1]
    finally:
        stop_daemon(d)


async def test_a_credential_hammering_refused_calls_cannot_rotate_real_entries_away(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reader's refused calls were audited whole (20 group ids of any length in one
    line): about 30 calls rotated every real entry out of the log. Now every entry is cut
    to MAX_ENTRY, a credential's refused calls past the first few of a window are one
    summary entry, and their INFO line holds nothing the caller sent."""
    t = Tokens(tmp_path)
    admin, reader = t.add("admin"), t.add("reader")
    log = AuditLog(tmp_path / "audit" / "audit.jsonl", max_bytes=64 * 1024, backups=1)
    server = grpc.aio.server(interceptors=[
        MalformedRequestInterceptor(),
        AuthInterceptor(ServerAuth(load_tokens(t.file())), "test agent", log,
                        refused_window=0.5)])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent_pb2_grpc.AgentServiceServicer(),
                                                      server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    huge = [f"g-{'x' * 10_000}{n}" for n in range(20)]
    calls = 30
    try:
        code, _ = await call(address, "/tether.v1.AgentService/Stop",
                             apb.StopRequest(group_id="g-evidence"), admin)
        assert code is grpc.StatusCode.UNIMPLEMENTED  # admitted (and audited): no servicer
        with caplog.at_level(logging.INFO, logger="tether.core.audit"):
            for _ in range(calls):
                code, _ = await call(address, "/tether.v1.AgentService/StopGroups",
                                     apb.StopGroupsRequest(group_ids=huge), reader)
                assert code is grpc.StatusCode.PERMISSION_DENIED
            summary: list[dict[str, Any]] = []
            async with asyncio.timeout(30):  # the window's end records the rest as one
                while not summary:
                    entries = await log.read()
                    summary = [e for e in entries if e["method"] == "(refused calls)"]
                    await asyncio.sleep(0.1)
        lines = [line for p in log.files() for line in p.read_text().splitlines()]
        assert all(len(line) <= MAX_ENTRY for line in lines), max(map(len, lines))
        assert len(log.files()) == 1, "nothing was rotated"
        entries = await log.read()
        assert [e["group"] for e in entries if e["role"] == "admin"] == ["g-evidence"]
        refused = [e for e in entries if e["method"] == "AgentService/StopGroups"]
        assert len(refused) == REFUSED_RECORDED
        assert all(len(e["group"]) < 1200 and "(20 in all)" in e["group"] for e in refused)
        assert summary[0]["details"]["refused"] == str(calls - REFUSED_RECORDED)
        assert summary[0]["credential"] == credential_of(reader)
        assert "StopGroups x25" in summary[0]["message"]
        said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(said) == REFUSED_RECORDED + 1, said
        assert all("xxxxxxxxxx" not in line and len(line) < 400 for line in said), said
    finally:
        await server.stop(None)
        await log.aclose()


def test_selector_calls_record_their_groups_and_labels_and_what_was_forgotten(
        tmp_path: Path) -> None:
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"au-{tmp_path.name[-8:]}"], tmp_path)
    try:
        g1, g2 = (d.cli("spawn", "--session", "s", "--label", label, "--", "sleep", "300",
                        check=True).stdout.strip() for label in ("one", "two"))
        d.cli("stop", "s", "--group", g1, check=True)
        d.cli("forget", "s", "--group", g1, check=True)
        d.cli("signal", "s", "CONT", "--label", "two", check=True)
        d.cli("restart", "s", "--label", "two", check=True)
        lines = d.cli("audit", "-o", "json", check=True).stdout.splitlines()
        entries = {e["method"].split("/")[-1]: e for e in map(json.loads, lines)
                   if e["method"].startswith("CoordinatorService/")}
        assert entries["StopSession"]["group"] == g1
        assert entries["ForgetGroups"]["group"] == g1
        assert entries["ForgetGroups"]["details"]["forgotten"] == g1
        assert entries["SignalSession"]["details"]["labels"] == "two"
        assert entries["RestartGroups"]["details"]["labels"] == "two"
        assert g2 not in json.dumps(entries["StopSession"])
    finally:
        d.cli("stop", "s")
        stop_daemon(d)


def test_agents_audit_their_coordinators_calls_and_coordinators_their_agents(
        tmp_path: Path) -> None:
    t = Tokens(tmp_path)
    admin, a1 = t.add("admin"), t.add("agent:a1")
    agent_tokens = Tokens(tmp_path, "agent-tokens")
    coordinator_dial = agent_tokens.add("coordinator")
    c = start_daemon("coordinator", ["--listen", "127.0.0.1:0", "--state-dir",
                                     str(tmp_path / "c"), "--token-file", t.file(),
                                     "--client-token-file", coordinator_dial.token_file],
                     tmp_path, name="c")
    a = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", c.address,
                               "--name", "a1", "--state-dir", str(tmp_path / "a"),
                               "--token-file", agent_tokens.file(),
                               "--client-token-file", a1.token_file], tmp_path, name="a")
    cli = ["--token-file", admin.token_file]
    try:
        wait_until(lambda: c.cli("agents", *cli).stdout.count(" up") == 1, 20, "a1 up")
        spawned = c.cli("spawn", "--session", "s", "--agent", "a1", "--env",
                        f"API_KEY={SECRET}", *cli, "--", "sleep", "300")
        assert spawned.returncode == 0, spawned.stderr
        gid = spawned.stdout.strip()
        assert c.cli("stop", "s", *cli).returncode == 0

        registered = [e for e in audit(c, admin) if e["method"].endswith("/RegisterAgent")]
        assert registered and registered[0]["role"] == "agent:a1"
        assert registered[0]["credential"] == credential_of(a1)
        assert registered[0]["agent"] == "a1" and registered[0]["result"] == "OK"
    finally:
        stop_daemon(a)
        stop_daemon(c)
    # The agent's own log, in its state directory: what its coordinator asked of it.
    text = (tmp_path / "a" / "audit.jsonl").read_text()
    assert SECRET not in text
    entries = [json.loads(line) for line in text.splitlines()]
    spawn = next(e for e in entries if e["method"] == "AgentService/Spawn")
    assert spawn["role"] == "coordinator" and spawn["group"] == gid and spawn["session"] == "s"
    assert spawn["credential"] == credential_of(coordinator_dial)
    assert any(e["method"] == "AgentService/StopGroups" and gid in e["group"] for e in entries)


async def test_the_audit_log_rotates_by_size_and_stays_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        log = AuditLog(tmp_path / "state" / "audit.jsonl", max_bytes=2000, backups=2)
        for n in range(100):
            log.record({"method": "X/Y", "role": "admin", "credential": "open",
                        "result": "OK", "details": {"n": n}})
        entries = await log.read()
        await log.aclose()
    finally:
        os.umask(old)
    files = log.files()
    assert [p.name for p in files] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    assert all(p.stat().st_size <= 2000 for p in files)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    numbers = [e["details"]["n"] for e in entries]
    assert numbers == list(range(100 - len(numbers), 100)), "the newest, in order"
    assert numbers == [e["details"]["n"] for e in read_entries(files)]
    # A torn last line (a crash mid-write) is skipped, not fatal.
    with open(files[-1], "a") as f:
        f.write('{"time": "2024-')
    assert len(list(read_entries(files))) == len(numbers)


async def test_every_entry_is_cut_to_the_entry_size_whatever_its_fields_hold(
        tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    try:
        big = "\u202e\x1b\U0001f600" * 20_000
        log.record({"method": "X/Y", "role": "reader", "credential": "token:1", "result":
                    "PERMISSION_DENIED", "session": big, "group": big, "agent": big,
                    "peer": big, "message": big, **{f"extra{n}": big for n in range(30)},
                    "details": {f"k{n}{big}": big for n in range(50)}})
        log.record({"method": "X/Y", "role": "admin", "credential": "open", "result": "OK"})
        entries = await log.read()
    finally:
        await log.aclose()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(len(line) <= MAX_ENTRY for line in lines)
    cut, whole = entries
    assert cut["method"] == "X/Y" and cut["role"] == "reader" and cut["credential"] == "token:1"
    assert cut["session"].endswith("...") and "truncated" in cut["details"]
    assert whole == {"time": whole["time"], "method": "X/Y", "role": "admin",
                     "credential": "open", "result": "OK"}


async def test_reading_waits_for_what_was_recorded_before(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    try:
        for n in range(1000):
            log.record({"method": "X/Y", "role": "admin", "credential": "open",
                        "result": "OK", "details": {"n": n}})
        got = await asyncio.wait_for(log.read(limit=5), 30)
        assert [e["details"]["n"] for e in got] == [995, 996, 997, 998, 999]
    finally:
        await log.aclose()
