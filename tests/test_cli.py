"""The `tether` CLI end to end: a real `tether serve`, the CLI run as a subprocess.

What a user sees is the contract here: exit statuses, what is printed, and what
really runs on the host afterwards (checked independently with marked_alive).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.plugins.processes import (
    Daemon,
    free_port,
    marked_alive,
    of_agent,
    start_daemon,
    stop_daemon,
    wait_until,
)
from tether.coordinator.cli.output import table

GROUP_ID = re.compile(r"^g-[0-9a-f]+$")
# The documented per-group keys of `tether stop -o json` (issue 3, CLI contract).
STOP_KEYS = {"group_id", "label", "agent", "target", "reason", "exit_code", "signal",
             "survivors", "duration_ms"}
# Keys a stop report may add beyond the documented ones: the group's state always, the
# agent error while it is unreachable, and the start-failure fields.
STOP_OPTIONAL = {"state", "error", "failure", "message", "detail", "oom_kills", "pre_stop",
                 "context"}
LOOP = ["sh", "-c", "while :; do sleep 0.1; done"]


def test_every_table_cell_is_printed_escaped() -> None:
    """A field with control characters (a label, a command, a message) is shown escaped:
    one row stays one line, and nothing in it moves the cursor or erases a line."""
    out = table([["a\nb", "\x1b[2K\rerased", "tab\there", "\u202eevil"], ["ok", "é", "-", ""]],
                ["label", "command", "message", "group"], width=200)
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[1].split() == ["a\\nb", "\\x1b[2K\\rerased", "tab\\there", "\\u202eevil"]
    assert lines[2].split() == ["ok", "é", "-"]


def kill_agent_leftovers(*agents: str) -> list[int]:
    """SIGKILL every process started for one of these agents (TETHER_AGENT marker)."""
    killed = []
    for p in psutil.process_iter():
        try:
            marker = p.environ().get("TETHER_AGENT", "")
            if any(of_agent(marker, a) for a in agents):
                p.kill()
                killed.append(p.pid)
        except psutil.Error:
            continue
    return killed


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Daemon]:
    """`tether serve` on a free port; afterwards nothing it started may be left running."""
    agent = f"cli-{os.getpid()}-{tmp_path.name[-8:]}"
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                               "--agent-name", agent], tmp_path)
    d.env["TETHER_TEST_AGENT"] = agent
    try:
        yield d
    finally:
        stop_daemon(d)
        kill_agent_leftovers(agent)


def agent_of(d: Daemon) -> str:
    return d.env["TETHER_TEST_AGENT"]


def spawn(d: Daemon, session: str, argv: list[str], *opts: str) -> str:
    res = d.cli("spawn", "--session", session, *opts, "--", *argv)
    assert res.returncode == 0, res.stderr
    gid = res.stdout.strip()
    assert GROUP_ID.match(gid), f"spawn must print the group id, got {res.stdout!r}"
    return gid


def snapshot(d: Daemon) -> list[dict[str, Any]]:
    """Every session and group as the coordinator knows them (minus the lease countdown)."""
    out = d.json("sessions", "--all")["sessions"]
    for s in out:
        s.pop("lease_expires_in_seconds", None)
    return sorted(out, key=lambda s: s["session"])


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


# ------------------------------------------------------------------ spawn and views


def test_spawn_prints_id_and_views_show_it(srv: Daemon) -> None:
    gid = spawn(srv, "views", ["sleep", "300"], "--label", "web", "--window", "w1")
    alive = marked_alive(gid)
    assert len(alive) == 1, "exactly the one `sleep` runs, marked with its group id"

    # show: a header line naming the session and a table with the group.
    res = srv.cli("show", "views")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "session views: active"
    assert rows(lines[1])[0][:5] == ["GROUP", "LABEL", "AGENT", "TARGET", "STATE"]
    row = next(r for r in rows("\n".join(lines[2:])) if r[0] == gid)
    assert row[1:5] == ["web", agent_of(srv), "local", "running"]
    assert str(alive[0]) in row

    shown = srv.json("show", "views")
    assert shown["session"] == "views" and shown["window"] == "w1" and shown["state"] == "active"
    (g,) = shown["groups"]
    assert g["group_id"] == gid and g["label"] == "web" and g["state"] == "running"
    assert g["agent"] == agent_of(srv) and g["pid"] == alive[0]
    assert g["argv"] == ["sleep", "300"]

    # sessions: one row per active session, with group and live counts.
    res = srv.cli("sessions")
    assert res.returncode == 0, res.stderr
    table = rows(res.stdout)
    assert table[0] == ["SESSION", "WINDOW", "STATE", "GROUPS", "LIVE", "LEASE_S"]
    assert ["views", "w1", "active", "1", "1", "-"] in table[1:]
    listed = srv.json("sessions")["sessions"]
    assert [s["session"] for s in listed] == ["views"]
    assert [x["group_id"] for x in listed[0]["groups"]] == [gid]

    # agents: the local agent of `tether serve`, up.
    res = srv.cli("agents")
    assert res.returncode == 0, res.stderr
    table = rows(res.stdout)
    assert table[0][:3] == ["NAME", "ADDRESS", "STATE"]
    assert [agent_of(srv), srv.address, "up"] == next(r for r in table if r[0] == agent_of(srv))[:3]
    agents = srv.json("agents")["agents"]
    assert [(a["name"], a["state"], a["address"]) for a in agents] == [
        (agent_of(srv), "up", srv.address)]


def test_spawn_passes_env_cwd_and_log(srv: Daemon, tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    spawn(srv, "env", ["sh", "-c", 'echo "foo=$FOO pwd=$(pwd) home=${HOME:-unset}"; sleep 300'],
          "--env", "FOO=a=b", "--cwd", str(tmp_path), "--log", str(log))
    wait_until(lambda: log.exists() and "foo=" in log.read_text(), 10, "the child's output")
    # The child gets exactly what was asked (values may contain '='), nothing inherited.
    assert log.read_text().strip() == f"foo=a=b pwd={tmp_path} home=unset"


def test_stop_json_has_the_documented_record_per_group(srv: Daemon) -> None:
    polite = spawn(srv, "st", ["sh", "-c", "trap 'exit 3' TERM; while :; do sleep 0.1; done"],
                   "--label", "polite", "--grace", "5")
    stubborn = spawn(srv, "st", ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"],
                     "--label", "stubborn", "--grace", "0.5")
    plain = spawn(srv, "st", ["sleep", "300"], "--label", "plain")
    wait_until(lambda: len(marked_alive(stubborn)) == 3, 10, "the stubborn tree to start")

    res = srv.cli("stop", "st", "-o", "json")
    assert res.returncode == 0, f"every group ended with zero survivors: {res.stderr}"
    report = json.loads(res.stdout)
    assert report["session"] == "st"
    by_id = {g["group_id"]: g for g in report["groups"]}
    assert set(by_id) == {polite, stubborn, plain}, "one record per group, none dropped"
    for g in report["groups"]:
        assert set(g) >= STOP_KEYS, f"missing keys {STOP_KEYS - set(g)} in {g}"
        assert set(g) - STOP_KEYS <= STOP_OPTIONAL, f"undocumented keys in {g}"
        assert set(g) == STOP_KEYS | {"state"}, "a clean stop carries no error fields"
        assert g["agent"] == agent_of(srv) and g["target"] == "local"
        assert g["survivors"] == 0
        assert isinstance(g["duration_ms"], int | float) and g["duration_ms"] >= 0
    assert by_id[polite]["label"] == "polite"
    assert by_id[polite]["reason"] == "requested"
    assert (by_id[polite]["exit_code"], by_id[polite]["signal"]) == (3, None)
    assert by_id[stubborn]["reason"] == "forced_kill"
    assert (by_id[stubborn]["exit_code"], by_id[stubborn]["signal"]) == (None, 9)
    assert by_id[stubborn]["duration_ms"] >= 450, "it waited out the grace before SIGKILL"
    assert by_id[plain]["reason"] == "requested"
    assert (by_id[plain]["exit_code"], by_id[plain]["signal"]) == (None, 15)

    for gid in (polite, stubborn, plain):
        assert marked_alive(gid) == [], f"{gid} still has live processes after stop"

    # Stop is idempotent: the same records again, still exit 0; the session is stopped.
    again = srv.cli("stop", "st", "-o", "json")
    assert again.returncode == 0, again.stderr
    assert {g["group_id"]: g["reason"] for g in json.loads(again.stdout)["groups"]} == {
        gid: g["reason"] for gid, g in by_id.items()}
    assert srv.json("show", "st")["state"] == "stopped"
    assert "st" not in [s["session"] for s in srv.json("sessions")["sessions"]]
    assert "st" in [s["session"] for s in srv.json("sessions", "--all")["sessions"]]

    # The table form names every group with its reason.
    table = srv.cli("stop", "st")
    assert table.returncode == 0
    for gid, reason in ((polite, "requested"), (stubborn, "forced_kill")):
        assert reason in next(line for line in table.stdout.splitlines() if gid in line)


def test_stop_grace_override(srv: Daemon) -> None:
    gid = spawn(srv, "gr", ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"],
                "--grace", "60")
    # With the group's own 60 s grace this stop could not finish within its --timeout.
    res = srv.cli("stop", "gr", "--grace", "0.2", "--timeout", "20", "-o", "json", timeout=30)
    assert res.returncode == 0, f"--grace on stop did not override the group's 60 s: {res.stderr}"
    (g,) = json.loads(res.stdout)["groups"]
    assert g["reason"] == "forced_kill" and g["survivors"] == 0
    assert marked_alive(gid) == []


# ------------------------------------------------------------------ idempotency


def test_retried_spawn_with_idempotency_key_starts_one_copy(srv: Daemon) -> None:
    first = spawn(srv, "idem", ["sleep", "300"], "--idempotency-key", "k-1")
    second = spawn(srv, "idem", ["sleep", "300"], "--idempotency-key", "k-1")
    assert first == second
    assert len(marked_alive(first)) == 1
    other = spawn(srv, "idem", ["sleep", "300"], "--idempotency-key", "k-2")
    assert other != first
    assert sorted(g["group_id"] for g in srv.json("show", "idem")["groups"]) == sorted(
        [first, other])


def test_concurrent_retries_with_one_key_start_one_copy(srv: Daemon, tmp_path: Path) -> None:
    """A client that times out and retries while the first spawn is still starting."""
    log = tmp_path / "slow.log"
    argv = [sys.executable, "-m", "tether.coordinator.cli", "spawn", "--session", "idem2",
            "--idempotency-key", "slow", "--log", str(log), "--ready", "log:^ready$", "--",
            "sh", "-c", "sleep 1; echo ready; exec sleep 300"]
    env = {**os.environ, "TETHER_COORDINATOR": srv.address}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, stdin=subprocess.DEVNULL) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    ids = {o[0].strip() for o in outs}
    assert len(ids) == 1, f"three retries, one group: {ids}"
    (gid,) = ids
    assert len(marked_alive(gid)) == 1
    assert [g["group_id"] for g in srv.json("show", "idem2")["groups"]] == [gid]


# ------------------------------------------------------------------ watch, keepalive, signal


@pytest.mark.slow
def test_watch_streams_state_changes_and_exit_records(srv: Daemon) -> None:
    first = spawn(srv, "wt", ["sleep", "300"], "--label", "one")
    env = {**os.environ, "TETHER_COORDINATOR": srv.address}
    watch = subprocess.Popen(
        [sys.executable, "-m", "tether.coordinator.cli", "watch", "wt", "-o", "json",
         "--timeout", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        stdin=subprocess.DEVNULL)
    try:
        assert watch.stdout is not None
        # The stream opens with the current state of the session.
        initial = json.loads(watch.stdout.readline())
        assert (initial["kind"], initial["group_id"], initial["state"]) == (
            "initial", first, "running")
        second = spawn(srv, "wt", ["sleep", "300"], "--label", "two")
        assert srv.cli("stop", "wt").returncode == 0
        rest, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, f"the session's end ends a watch cleanly: {err}"
    *events, done = [initial] + [json.loads(line) for line in rest.splitlines() if line.strip()]
    # The last event says the session is done, with the whole stop report.
    assert done["kind"] == "session_stopped" and done["session"] == "wt"
    assert done["report"]["complete"] is True
    assert {g["group_id"] for g in done["report"]["groups"]} == {first, second}
    seqs = [e["seq"] for e in [*events, done]]
    assert seqs == sorted(seqs), "events arrive in order"
    seen = {(e["group_id"], e["state"]) for e in events}
    assert (second, "running") in seen, "the new group's start is streamed"
    exits = {e["group_id"]: e for e in events if e["kind"] == "exit"}
    assert set(exits) == {first, second}, "one exit record per group"
    for e in exits.values():
        assert e["state"] == "stopped" and e["reason"] == "requested" and e["survivors"] == 0
    assert exits[second]["label"] == "two"
    assert {e["kind"] for e in events} <= {"initial", "state", "exit"}


def test_keepalive_sets_and_renews_the_lease(srv: Daemon) -> None:
    spawn(srv, "lease", ["sleep", "300"])
    res = srv.cli("keepalive", "lease", "--ttl", "30")
    assert res.returncode == 0, res.stderr
    assert "30" in res.stdout
    s = srv.json("keepalive", "lease", "--ttl", "60")
    assert s["ttl_seconds"] == 60 and 50 < s["lease_expires_in_seconds"] <= 60
    listed = next(x for x in srv.json("sessions")["sessions"] if x["session"] == "lease")
    assert listed["ttl_seconds"] == 60 and listed["state"] == "active"
    table = rows(srv.cli("sessions").stdout)
    lease_s = float(next(r for r in table if r[0] == "lease")[5])
    assert 50 < lease_s <= 60

    # A zero or negative TTL is a usage error and leaves the lease alone.
    before = snapshot(srv)
    for bad in ("0", "-1", "soon"):
        res = srv.cli("keepalive", "lease", "--ttl", bad)
        assert res.returncode == 2, (bad, res.returncode, res.stderr)
        assert "ttl" in res.stderr.lower() or bad in res.stderr
    assert snapshot(srv) == before


def test_signal_reaches_the_group_and_leaves_it_running(srv: Daemon, tmp_path: Path) -> None:
    got = tmp_path / "got"
    log = tmp_path / "sig.log"
    gid = spawn(srv, "sig", ["sh", "-c", f'trap "echo got >> {got}" USR1; echo ready; '
                             "while :; do sleep 0.1; done"],
                "--log", str(log), "--ready", "log:^ready$")
    res = srv.cli("signal", "sig", "USR1", "-o", "json")
    assert res.returncode == 0, res.stderr
    (g,) = json.loads(res.stdout)["groups"]
    assert g["group_id"] == gid and g["members_signalled"] >= 1
    wait_until(lambda: got.exists() and "got" in got.read_text(), 10, "the USR1 trap to run")
    assert marked_alive(gid), "USR1 is not a stop: the group keeps running"
    assert srv.json("show", "sig")["groups"][0]["state"] == "running"

    # Numbers and SIG-prefixed names work too.
    assert srv.cli("signal", "sig", str(int(signal.SIGUSR1))).returncode == 0
    assert srv.cli("signal", "sig", "SIGUSR1").returncode == 0
    wait_until(lambda: got.read_text().count("got") >= 3, 10, "two more traps")


# ------------------------------------------------------------------ bad input


def test_unknown_session_exits_3_and_names_it(srv: Daemon) -> None:
    spawn(srv, "exists", ["sleep", "300"])
    before = snapshot(srv)
    for args in (["show", "nosuch"], ["stop", "nosuch"], ["signal", "nosuch", "TERM"],
                 ["keepalive", "nosuch", "--ttl", "5"], ["watch", "nosuch", "--timeout", "5"]):
        res = srv.cli(*args)
        assert res.returncode == 3, (args, res.returncode, res.stderr)
        assert "nosuch" in res.stderr, (args, res.stderr)
        assert res.stdout == ""
    assert snapshot(srv) == before, "asking about an unknown session changes nothing"


def test_unknown_agent_exits_3_names_it_and_creates_nothing(srv: Daemon) -> None:
    existing = spawn(srv, "keep", ["sleep", "300"])
    before = snapshot(srv)
    res = srv.cli("spawn", "--session", "fresh", "--agent", "nosuch", "--", "sleep", "300")
    assert res.returncode == 3, res.stderr
    assert "nosuch" in res.stderr and agent_of(srv) in res.stderr, \
        "the message names the unknown agent and the known ones"
    res = srv.cli("spawn", "--session", "keep", "--agent", "nosuch", "--", "sleep", "300")
    assert res.returncode == 3, res.stderr
    assert snapshot(srv) == before, "no session created, no group added"
    assert srv.cli("show", "fresh").returncode == 3
    assert len(marked_alive(existing)) == 1


def test_spec_the_agent_rejects_is_a_usage_error_and_creates_nothing(srv: Daemon) -> None:
    spawn(srv, "keep", ["sleep", "300"])
    before = snapshot(srv)
    for opts, words in ((["--target", "bogus:x"], ["bogus"]),
                        (["--ready", "log:ready"], ["--log"]),
                        (["--stop-signal", "NOPE"], ["NOPE"])):
        for session in ("keep", "fresh"):
            res = srv.cli("spawn", "--session", session, *opts, "--", "sleep", "300")
            assert res.returncode == 2, (opts, res.returncode, res.stderr)
            for w in words:
                assert w in res.stderr, (opts, res.stderr)
    assert snapshot(srv) == before, "a refused spawn leaves no session or group behind"


def test_unreachable_coordinator_exits_4_and_names_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    for args in (["sessions"], ["agents"], ["show", "s"], ["stop", "s"], ["signal", "s", "TERM"],
                 ["keepalive", "s", "--ttl", "5"], ["watch", "s"], ["orphans"],
                 ["spawn", "--session", "s", "--", "sleep", "1"]):
        # A refused connection must not hang: the subprocess timeout is the bound.
        res = subprocess.run([sys.executable, "-m", "tether.coordinator.cli", *args[:1],
                              "--coordinator", address, *args[1:]], capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode == 4, (args, res.returncode, res.stderr)
        assert address in res.stderr and "unreachable" in res.stderr, (args, res.stderr)
    # TETHER_COORDINATOR is the default when --coordinator is not given.
    res = subprocess.run([sys.executable, "-m", "tether.coordinator.cli", "sessions"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                         env={**os.environ, "TETHER_COORDINATOR": address})
    assert res.returncode == 4 and address in res.stderr


def test_malformed_env_is_a_usage_error(srv: Daemon) -> None:
    spawn(srv, "envs", ["sleep", "300"])
    before = snapshot(srv)
    for bad in ("FOO", "=x", ""):
        res = srv.cli("spawn", "--session", "envs", "--env", bad, "--", "sleep", "300")
        assert res.returncode == 2, (bad, res.returncode, res.stderr)
        assert "KEY=VALUE" in res.stderr and repr(bad) in res.stderr, res.stderr
        res = srv.cli("spawn", "--session", "envnew", "--env", "A=1", "--env", bad, "--",
                      "sleep", "300")
        assert res.returncode == 2
    assert snapshot(srv) == before


def test_unknown_signal_is_a_usage_error_and_signals_nothing(srv: Daemon, tmp_path: Path) -> None:
    got = tmp_path / "got"
    log = tmp_path / "sig.log"
    gid = spawn(srv, "sigs", ["sh", "-c", f"trap 'echo $? >> {got}' HUP INT QUIT USR1 USR2 TERM; "
                              "echo ready; while :; do sleep 0.1; done"],
                "--log", str(log), "--ready", "log:^ready$")
    leader = srv.json("show", "sigs")["groups"][0]["pid"]
    before = snapshot(srv)
    for bad in ("NOPE", "SIGNOPE", "99999", "-1", ""):
        res = srv.cli("signal", "sigs", bad)
        assert res.returncode == 2, (bad, res.returncode, res.stderr)
        assert "signal" in res.stderr.lower(), res.stderr
    assert "TERM" in srv.cli("signal", "sigs", "NOPE").stderr, "the message suggests real names"
    time.sleep(0.3)
    assert not got.exists(), "a rejected signal reaches no process"
    assert snapshot(srv) == before
    assert leader in marked_alive(gid), "the shell that got nothing still runs"


def test_empty_command_is_a_usage_error(srv: Daemon) -> None:
    before = snapshot(srv)
    for args in (["spawn", "--session", "empty"], ["spawn", "--session", "empty", "--"]):
        res = srv.cli(*args)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert "command" in res.stderr and "--" in res.stderr, res.stderr
    res = srv.cli("spawn", "--", "sleep", "1")
    assert res.returncode == 2 and "--session" in res.stderr
    assert snapshot(srv) == before
    assert srv.cli("show", "empty").returncode == 3


def test_missing_cwd_is_a_start_failure_naming_the_directory(srv: Daemon, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    res = srv.cli("spawn", "--session", "cwd", "--cwd", str(missing), "--", "sleep", "300")
    assert res.returncode == 1, res.stderr
    assert str(missing) in res.stderr and "cwd_missing" in res.stderr, res.stderr
    assert res.stdout.strip() == "", "no group id is printed for a failed start"
    (g,) = srv.json("show", "cwd")["groups"]
    assert g["state"] == "failed" and g["reason"] == "start_failed"
    assert g["failure"] == "cwd_missing" and str(missing) in g["message"]
    assert marked_alive(g["group_id"]) == []

    res = srv.cli("spawn", "--session", "cwd", "--", "/no/such/binary-xyz")
    assert res.returncode == 1
    assert "command_not_found" in res.stderr and "/no/such/binary-xyz" in res.stderr


# ------------------------------------------------------------------ help


HELP_MENTIONS = {
    "serve": ["--listen", "--state-dir", "--metrics-listen", "--agent-name", "--insecure",
              "--tls-cert", "--token-file", "--config"],
    "coordinator": ["--listen", "--state-dir", "--metrics-listen", "--agent-ttl"],
    "agent": ["--listen", "--coordinator", "--name", "--state-dir", "--metrics-listen",
              "--plugin", "--no-plugins", "--output-buffer", "--output-total"],
    "spawn": ["--session", "--window", "--label", "--env", "--inherit-env", "--cwd", "--log",
              "--grace", "--stop-order", "--ready", "--target", "--agent", "--orphan-policy",
              "--idempotency-key", "--user", "--port", "--memory", "--cpus", "--pids",
              "--pre-stop", "--pre-stop-timeout", "--no-plugins", "--live", "--live-interval",
              "--live-timeout", "--live-failures", "--on-unhealthy", "--restart",
              "--restart-max", "--restart-window", "--stdin", "--stop-stdin-grace", "COMMAND"],
    "adopt": ["--session", "--agent", "--pid", "--label"],
    "signal": ["session", "signal", "--group", "--label"],
    "stop": ["session", "--grace", "--group", "--label"],
    "restart": ["session", "--group", "--label", "--grace"],
    "forget": ["session", "--group", "--label"],
    "wait": ["session", "--timeout"],
    "sessions": ["--all"],
    "show": ["session"],
    "agents": [],
    "orphans": ["--sweep"],
    "watch": ["session"],
    "keepalive": ["session", "--ttl"],
    "up": ["file", "--session", "--add", "--parallel"],
    "config": ["check", "file"],
    "completion": ["bash", "zsh", "fish"],
    "audit": ["--since", "--limit"],
    "ports": ["port", "--agent"],
    "forget-agent": ["name", "--force"],
    "coordinators": [],
    "logs": ["session", "--group", "--follow", "--tail", "--since"],
}
CLIENT = {"spawn", "adopt", "signal", "stop", "sessions", "show", "agents", "orphans", "watch",
          "keepalive", "up", "audit", "ports", "forget-agent", "restart", "forget", "wait",
          "logs"}


def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether.coordinator.cli", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_help_lists_every_command_and_exit_statuses() -> None:
    res = tether("--help")
    assert res.returncode == 0, res.stderr
    for command in HELP_MENTIONS:
        assert re.search(rf"^\s+{command}\s", res.stdout, re.M), f"{command} missing from help"
    for status in ("0", "1", "2", "3", "4"):
        assert status in res.stdout
    assert "TETHER_COORDINATOR" in res.stdout
    bare = tether()
    assert bare.returncode == 2 and "usage" in (bare.stdout + bare.stderr).lower()


@pytest.mark.parametrize("command", sorted(HELP_MENTIONS))
def test_each_subcommand_help_mentions_its_options(command: str) -> None:
    res = tether(command, "--help")
    assert res.returncode == 0, res.stderr
    text = res.stdout.lower()
    assert f"tether {command}" in text
    for option in HELP_MENTIONS[command]:
        assert option.lower() in text, f"`tether {command} --help` does not mention {option}"
    if command in CLIENT:
        assert "--coordinator" in text and "json" in text


def test_every_option_of_every_command_is_explained() -> None:
    import argparse

    from tether.coordinator.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(HELP_MENTIONS)
    missing = [f"{name} {a.option_strings or a.dest}" for name, sp in sub.choices.items()
               for a in sp._actions if not a.help]
    assert missing == [], f"options without help text: {missing}"


def test_help_imports_nothing_heavy() -> None:
    code = ("import sys, runpy; sys.argv = ['tether', '--help']\n"
            "try:\n runpy.run_module('tether.coordinator.cli', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "heavy = [m for m in ('grpc', 'asyncssh', 'docker', 'prometheus_client') "
            "if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in res.stderr, res.stderr


# ------------------------------------------------------------------ serve


@pytest.mark.parametrize("kind", ["serve", "coordinator"])
def test_daemon_on_a_port_in_use_exits_nonzero_naming_the_address(
        srv: Daemon, tmp_path: Path, kind: str) -> None:
    res = subprocess.run([sys.executable, "-m", "tether.coordinator.cli", kind, "--listen",
                          srv.address, "--state-dir", str(tmp_path / f"other-{kind}")],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode != 0
    assert srv.address in res.stderr, res.stderr
    assert "listening on" not in res.stdout
    # The daemon already there is unharmed.
    assert srv.json("agents")["agents"][0]["state"] == "up"


def test_serve_on_a_port_held_by_another_program(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        res = subprocess.run([sys.executable, "-m", "tether.coordinator.cli", "serve", "--listen",
                              address, "--state-dir", str(tmp_path / "st"), "--agent-name",
                              f"busy-{tmp_path.name[-8:]}"],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode != 0
    assert address in res.stderr, res.stderr


def test_serve_shutdown_stops_every_group(tmp_path: Path) -> None:
    agent = f"down-{tmp_path.name[-8:]}"
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", agent], tmp_path)
    try:
        gids = [spawn(d, "sd", LOOP), spawn(d, "sd", ["sleep", "300"])]
        assert all(marked_alive(g) for g in gids)
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
        for g in gids:
            assert marked_alive(g) == []
    finally:
        stop_daemon(d)
        kill_agent_leftovers(agent)
