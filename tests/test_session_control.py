"""Per-group control, waiting for a session, session_stopped, supervision and the status
endpoints, through the real API and CLI of a `tether serve` with real processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.plugins.common import require_binary
from tests.plugins.processes import (
    Daemon,
    catches,
    free_port,
    marked_alive,
    start_daemon,
    stop_daemon,
    wait_until,
)
from tether.client import AsyncClient, Client
from tether.core.model import EventKind, GroupState
from tether.core.sessions import GroupEntry


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[tuple[Daemon, str]]:
    """`tether serve` with its operations listener (/metrics, /healthz, /status)."""
    mport = free_port()
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"sc-{tmp_path.name[-8:]}", "--metrics-listen",
                               f"127.0.0.1:{mport}"], tmp_path)
    try:
        yield d, f"127.0.0.1:{mport}"
    finally:
        stop_daemon(d)


def spawn(d: Daemon, session: str, *args: str) -> str:
    return str(d.cli("spawn", "--session", session, "--grace", "1", *args, check=True)
               .stdout.strip())


def group(d: Daemon, session: str, gid: str) -> dict[str, object]:
    return next(g for g in d.json("show", session)["groups"] if g["group_id"] == gid)


def get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def next_event(d: Daemon, session: str, pred: Callable[[GroupEntry], bool],
               timeout: float = 30) -> GroupEntry:
    """Block on WatchSession until a group event satisfies ``pred``."""
    async def run() -> GroupEntry:
        async with AsyncClient(d.address) as c:
            async with asyncio.timeout(timeout):
                async for ev in c.watch(session):
                    if ev.group is not None and pred(ev.group):
                        return ev.group
        raise AssertionError("the watch ended")

    return asyncio.run(run())


TRAP = "trap 'echo $$ >> {out}' USR1; while :; do sleep 0.05; done"


# ------------------------------------------------------------------ one group of three


def test_one_group_of_three_is_stopped_signalled_and_restarted_while_the_others_run(
        srv: tuple[Daemon, str], tmp_path: Path) -> None:
    d, _ = srv
    outs = {name: tmp_path / f"{name}.usr1" for name in "abc"}
    ids = {name: spawn(d, "win", "--label", name, "--", "sh", "-c", TRAP.format(out=out))
           for name, out in outs.items()}
    wait_until(lambda: all(any(catches(p, signal.SIGUSR1) for p in marked_alive(g))
                           for g in ids.values()), 10, "three shells to trap USR1")
    leaders = {name: group(d, "win", g)["pid"] for name, g in ids.items()}

    # An editor closes one terminal: only that terminal's group ends.
    stop = d.json("stop", "win", "--group", ids["a"])
    assert [g["group_id"] for g in stop["groups"]] == [ids["a"]]
    assert stop["complete"] and stop["groups"][0]["state"] == "stopped"
    assert marked_alive(ids["a"]) == []
    assert leaders["b"] in marked_alive(ids["b"]) and leaders["c"] in marked_alive(ids["c"])
    assert d.json("show", "win")["state"] == "active"

    # A signal by label reaches that group only.
    sent = d.json("signal", "win", "USR1", "--label", "b")
    assert [g["group_id"] for g in sent["groups"]] == [ids["b"]]
    wait_until(lambda: outs["b"].exists(), 10, "b to trap USR1")
    assert not outs["c"].exists()

    # A restart in place: same id, new processes, the old run's record kept.
    res = d.json("restart", "win", "--group", ids["c"])
    assert [(g["group_id"], g["state"], g["restarts"]) for g in res["groups"]] == [
        (ids["c"], "running", 1)]
    c = group(d, "win", ids["c"])
    assert c["state"] == "running" and c["restarts"] == 1
    runs = c["runs"]
    assert isinstance(runs, list) and len(runs) == 1 and runs[0]["reason"] == "requested"
    assert c["pid"] != leaders["c"] and c["pid"] in marked_alive(ids["c"])
    assert leaders["c"] not in marked_alive(ids["c"])
    assert leaders["b"] in marked_alive(ids["b"]), "b kept running through c's restart"
    assert group(d, "win", ids["a"])["state"] == "stopped"

    assert d.cli("stop", "win").returncode == 0
    assert all(marked_alive(g) == [] for g in ids.values())


def test_two_restarts_at_once_share_one(srv: tuple[Daemon, str]) -> None:
    d, _ = srv
    gid = spawn(d, "twice", "--label", "web", "--", "sleep", "300")

    async def both() -> list[int]:
        async with AsyncClient(d.address) as c:
            reports = await asyncio.gather(c.restart("twice", groups=[gid]),
                                           c.restart("twice", labels=["web"]))
        return [r.groups[0].restarts if r.complete else (r.groups[0].state, r.groups[0].error)
                for r in reports]

    assert asyncio.run(both()) == [1, 1]
    assert group(d, "twice", gid)["restarts"] == 1 and len(marked_alive(gid)) == 1
    assert d.cli("stop", "twice").returncode == 0


def test_refused_input_names_the_problem_and_changes_nothing(srv: tuple[Daemon, str]) -> None:
    d, _ = srv
    mine = spawn(d, "mine", "--label", "web", "--", "sleep", "300")
    theirs = spawn(d, "theirs", "--", "sleep", "300")
    done = spawn(d, "mine", "--label", "once", "--", "true")
    wait_until(lambda: group(d, "mine", done)["state"] == "exited", 10, "`true` to exit")
    before = {g: marked_alive(g) for g in (mine, theirs)}

    cases = [
        (("stop", "mine", "--group", theirs), 3, "belongs to session 'theirs'"),
        (("signal", "mine", "TERM", "--label", "nope"), 3, "label 'nope' matches no group"),
        (("restart", "mine", "--group", "g-00000000"), 3, "is not in session 'mine'"),
        # A request that does not fit the group's state: refused like a keepalive of a
        # stopped session (exit 1).
        (("restart", "mine", "--group", done), 1, "ended groups are final"),
        (("forget", "mine", "--group", mine), 1, "only ended groups are forgotten"),
        (("forget", "mine"), 2, "--group ID or --label L"),
        (("wait", "nosuch"), 3, "no session 'nosuch'"),
        (("spawn", "--session", "mine", "--restart", "always", "--restart-max", "0", "--",
          "true"), 2, "restart max 0"),
        (("spawn", "--session", "mine", "--on-unhealthy", "restart", "--", "true"), 2,
         "needs a liveness probe"),
        (("spawn", "--session", "mine", "--live", "tcp:1", "--live-failures", "0", "--",
          "true"), 2, "live failures 0"),
        (("spawn", "--session", "mine", "--live", "tcp:1", "--live-interval", "-1", "--",
          "true"), 2, "must be zero or more"),
        (("spawn", "--session", "mine", "--live", "log:x", "--log", "/tmp/x", "--", "true"), 2,
         "cannot tell whether"),
    ]
    for args, status, words in cases:
        res = d.cli(*args)
        assert res.returncode == status, (args, res.stdout, res.stderr)
        assert words in res.stderr, (args, res.stderr)
    assert {g: marked_alive(g) for g in (mine, theirs)} == before
    shown = d.json("show", "mine")["groups"]
    assert sorted(g["group_id"] for g in shown) == sorted([mine, done]), "nothing was added"
    assert d.cli("stop", "mine").returncode == 0 and d.cli("stop", "theirs").returncode == 0


def test_forget_drops_an_ended_group_from_the_listing_for_good(
        srv: tuple[Daemon, str], tmp_path: Path) -> None:
    d, _ = srv
    keep = spawn(d, "f", "--", "sleep", "300")
    gone = spawn(d, "f", "--label", "scratch", "--", "sleep", "300")
    d.json("stop", "f", "--label", "scratch")
    assert d.json("forget", "f", "--label", "scratch")["forgotten"] == [gone]
    assert [g["group_id"] for g in d.json("show", "f")["groups"]] == [keep]
    # After a restart of serve (agent and coordinator reload their state), still gone.
    stop_daemon(d)
    again = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir",
                                   str(tmp_path / "st"), "--agent-name",
                                   f"sc-{tmp_path.name[-8:]}"], tmp_path, name="serve2")
    try:
        assert gone not in [g["group_id"] for g in again.json("show", "f")["groups"]]
    finally:
        stop_daemon(again)


# ------------------------------------------------------------------ wait, session_stopped


def test_wait_returns_once_the_last_group_ended(srv: tuple[Daemon, str]) -> None:
    d, _ = srv
    ids = [spawn(d, "job", "--", "sh", "-c", f"sleep {t}; exit {code}")
           for t, code in (("0.3", "0"), ("0.6", "3"))]
    res = d.cli("wait", "job", "-o", "json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["complete"] is True
    by_id = {g["group_id"]: g for g in report["groups"]}
    assert set(by_id) == set(ids)
    assert [by_id[g]["exit_code"] for g in ids] == [0, 3], "each group's own record"
    assert all(by_id[g]["state"] == "exited" for g in ids), "returned after the last one"

    # A session with no group at all: done at once. A live one: --timeout, exit 1.
    with Client(d.address) as c:
        c.create_session("empty")
    assert d.cli("wait", "empty").returncode == 0
    spawn(d, "busy", "--", "sleep", "300")
    res = d.cli("wait", "busy", "--timeout", "0.5")
    assert res.returncode == 1 and "still has 1 live group" in res.stderr
    assert d.cli("stop", "busy").returncode == 0


def test_session_stopped_carries_the_report_and_is_resumable(srv: tuple[Daemon, str]) -> None:
    d, _ = srv
    ids = {spawn(d, "done", "--", "sleep", "300") for _ in range(2)}

    async def run() -> None:
        async with AsyncClient(d.address) as c:
            stream = c.watch("done")
            first = await anext(stream)
            assert first.kind is EventKind.INITIAL
            report = await c.stop("done")
            async with asyncio.timeout(30):
                async for ev in stream:
                    if ev.kind is EventKind.SESSION_STOPPED:
                        break
            await stream.aclose()  # type: ignore[attr-defined]
            assert ev.group is None and ev.report is not None
            assert {g.group_id for g in ev.report.groups} == ids
            assert ev.report.complete and ev.report.clean
            assert [g.exit for g in ev.report.groups] == [g.exit for g in report.groups]
            # Resume from just before it: the same event again, once.
            resumed = c.watch("done", initial=False, since=ev.seq - 1, epoch=ev.epoch)
            again = await anext(resumed)
            await resumed.aclose()  # type: ignore[attr-defined]
            assert (again.seq, again.kind) == (ev.seq, EventKind.SESSION_STOPPED)
            # A watcher that comes after the stop still learns the session is done.
            late = [e async for e in _until_stopped(c.watch("done"))]
            assert [e.kind for e in late] == [EventKind.INITIAL] * 2 + [EventKind.SESSION_STOPPED]

    asyncio.run(run())


async def _until_stopped(stream: object) -> object:
    async for ev in stream:  # type: ignore[attr-defined]
        yield ev
        if ev.kind is EventKind.SESSION_STOPPED:
            await stream.aclose()  # type: ignore[attr-defined]
            return


# ------------------------------------------------------------------ supervision


HANGING_SERVER = textwrap.dedent("""
    import signal, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    hung = False
    def hang(*_):
        global hung
        hung = True
    signal.signal(signal.SIGUSR1, hang)
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            while hung:
                time.sleep(1)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_an_http_server_that_stops_answering_is_detected_and_restarted(
        srv: tuple[Daemon, str]) -> None:
    d, metrics = srv
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    gid = spawn(d, "web", "--label", "api", "--ready", url, "--live", url,
                "--live-interval", "0.2", "--live-timeout", "0.5", "--live-failures", "2",
                "--on-unhealthy", "restart", "--", sys.executable, "-c", HANGING_SERVER,
                str(port))
    first = marked_alive(gid)
    d.cli("signal", "web", "USR1", "--group", gid, check=True)  # it stops answering
    sick = next_event(d, "web", lambda g: g.view.unhealthy)
    assert sick.view.state is GroupState.RUNNING and "timeout" in sick.view.health.lower()
    back = next_event(d, "web", lambda g: g.view.restarts == 1
                      and g.view.state is GroupState.RUNNING)
    assert not back.view.unhealthy and back.view.group_id == gid
    assert back.view.runs[0].exit.reason.value == "requested"
    assert "unhealthy" in back.view.runs[0].exit.detail
    assert urllib.request.urlopen(url, timeout=5).status == 200, "the new run answers"
    assert not set(marked_alive(gid)) & set(first)
    text = get(metrics, "/metrics")[1]
    assert 'tether_restarts_total{reason="unhealthy"} 1.0' in text
    assert "tether_unhealthy_total 1.0" in text
    assert d.cli("stop", "web").returncode == 0


def test_a_crashing_program_is_restarted_until_the_limit_with_a_record_per_run(
        srv: tuple[Daemon, str]) -> None:
    d, metrics = srv
    gid = spawn(d, "crash", "--restart", "on-failure", "--restart-max", "2", "--",
                "sh", "-c", "sleep 0.1; exit 7")
    res = d.cli("wait", "crash", "-o", "json")
    assert res.returncode == 0, res.stderr  # ended, no survivors: clean
    g = group(d, "crash", gid)
    assert g["state"] == "failed" and g["reason"] == "restart_limit" and g["exit_code"] == 7
    assert g["restarts"] == 2
    runs = g["runs"]
    assert isinstance(runs, list) and [r["exit_code"] for r in runs] == [7, 7, 7]
    assert "--restart-max 2" in str(g["message"])
    assert 'tether_restarts_total{reason="failed"} 2.0' in get(metrics, "/metrics")[1]


@pytest.mark.slow
def test_an_agent_killed_while_a_group_waits_to_restart_records_it_lost(
        srv: tuple[Daemon, str], tmp_path: Path) -> None:
    d, _ = srv
    gid = spawn(d, "bo", "--restart", "always", "--restart-max", "100", "--orphan-policy",
                "keep", "--", "sh", "-c", "exit 1")
    next_event(d, "bo", lambda g: g.view.state is GroupState.RESTARTING
               and g.view.restarts >= 2)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    again = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir",
                                   str(tmp_path / "st"), "--agent-name",
                                   f"sc-{tmp_path.name[-8:]}"], tmp_path, name="serve2")
    try:
        wait_until(lambda: group(again, "bo", gid)["state"] in ("exited", "lost"), 30,
                   "the restarted agent to account for the group")
        g = group(again, "bo", gid)
        assert g["reason"] == "lost" and "waited to restart" in str(g.get("detail"))
        assert marked_alive(gid) == []
    finally:
        stop_daemon(again)


# ------------------------------------------------------------------ /healthz, /status


def test_status_matches_show_and_healthz_answers(srv: tuple[Daemon, str]) -> None:
    d, metrics = srv
    assert get(metrics, "/healthz") == (200, "ok\n")
    running = spawn(d, "st", "--", "sleep", "300")
    sick = spawn(d, "st", "--label", "sick", "--live", f"tcp:{free_port()}",
                 "--live-interval", "0.1", "--live-failures", "1", "--", "sleep", "300")
    spawn(d, "st", "--", "true")
    stopped = spawn(d, "st", "--", "sleep", "300")
    d.cli("stop", "st", "--group", stopped, check=True)
    next_event(d, "st", lambda g: g.view.unhealthy)
    wait_until(lambda: not any(g["state"] in ("starting", "running") and g["argv"] == ["true"]
                               for g in d.json("show", "st")["groups"]), 10, "`true` to end")

    shown = d.json("show", "st")["groups"]
    code, body = get(metrics, "/status")
    assert code == 200, body
    status = json.loads(body)
    assert status["role"] == "serve"
    counted = {k: v for k, v in status["groups"].items() if v}
    assert counted == dict(Counter(g["state"] for g in shown))
    assert [u["group_id"] for u in status["unhealthy"]] == [sick]
    assert [g["group_id"] for g in shown if g["unhealthy"]] == [sick]
    sick_shown = next(g for g in shown if g["group_id"] == sick)
    # An anonymous reader gets the id and what the check saw, not the session or label.
    assert status["unhealthy"] == [{"group_id": sick, "health": sick_shown["health"]}]
    assert status["agent"]["unhealthy"] == status["unhealthy"]
    assert '"sick"' not in body and d.address not in body
    assert status["agents"] == {"up": 1, "unreachable": 0}
    assert status["sessions"]["active"] == 1
    assert status["orphans"] == 0
    assert status["agent"]["last_cleanup"]["result"] == "success"
    assert running in {g["group_id"] for g in shown}
    assert get(metrics, "/nope")[0] == 404

    promtool = require_binary("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "metrics"], input=get(metrics, "/metrics")[1],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    d.cli("stop", "st", check=True)
    status = json.loads(get(metrics, "/status")[1])
    assert status["last_cleanup"]["result"] == "clean"
    assert set(status["last_cleanup"]) == {"at", "result", "duration_ms"}, "no session name"


async def test_healthz_says_503_when_the_event_loop_is_stuck(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    from tether.rpc import ops

    monkeypatch.setattr(ops, "ANSWER_WITHIN", 0.2)
    server = ops.serve_ops(CollectorRegistry(), "127.0.0.1:0", lambda: {"ok": True})
    try:
        assert await asyncio.to_thread(get, f"127.0.0.1:{server.port}", "/status") == (
            200, '{\n  "ok": true\n}\n')
        answer: list[tuple[int, str]] = []
        asking = threading.Thread(target=lambda: answer.append(
            get(f"127.0.0.1:{server.port}", "/healthz")))
        asking.start()
        asking.join()  # on the event loop's thread, on purpose: the loop is stuck meanwhile
        assert answer[0][0] == 503 and "did not answer" in answer[0][1]
    finally:
        server.close()
