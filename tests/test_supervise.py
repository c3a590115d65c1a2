"""Supervision on the agent, with real processes: restart policies, backoff and the limit,
restart requests, liveness checks, and a stop winning in every phase of a restart.

Every wait is for an event of the authority's own Watch stream (``until``), never a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.plugins.certs import CA
from tests.plugins.processes import async_wait_until, marked_alive
from tether.agent.authority import Authority
from tether.agent.hooks import Hooks
from tether.agent.probes import HTTP_LINE_MAX, Prober
from tether.core.errors import Conflict, InvalidSpec
from tether.core.model import (
    RESTART_BACKOFF_FIRST,
    RESTART_BACKOFF_MAX,
    EventKind,
    ExitReason,
    ExitRecord,
    FailureClass,
    GroupSpec,
    GroupState,
    GroupView,
    Liveness,
    Probe,
    RestartMode,
    RestartPolicy,
    StopPolicy,
    UnhealthyAction,
    restart_delay,
)
from tether.signallers.base import SignallerContext
from tether.signallers.local import LocalSignaller
from tether.signallers.registry import Signallers

GRACE = StopPolicy(grace=1.0)


async def until(authority: Authority, group_id: str, pred: Callable[[GroupView], bool],
                timeout: float = 30.0, kinds: set[EventKind] | None = None) -> GroupView:
    """The first view of the group (now, or in a later event) that satisfies ``pred``."""
    view = authority.get(group_id)
    if kinds is None and pred(view):
        return view
    stream = authority.watch(lambda e: e.group.group_id == group_id)
    async with asyncio.timeout(timeout):
        async for ev in stream:
            if (kinds is None or ev.kind in kinds) and pred(ev.group):
                return ev.group
    raise AssertionError("the watch stream ended")


def live(probe: str, *, interval: float = 0.1, failures: int = 2, timeout: float = 0.5,
         action: UnhealthyAction = UnhealthyAction.NONE) -> Liveness:
    return Liveness(Probe.parse(probe, timeout=timeout, field_="live"), interval, failures,
                    action)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ the model's rules


def test_backoff_doubles_is_capped_and_jittered() -> None:
    assert restart_delay(0, 0.5) == RESTART_BACKOFF_FIRST
    steps = [restart_delay(n, 0.5) for n in range(12)]
    assert steps == sorted(steps) and steps[-1] == RESTART_BACKOFF_MAX
    assert restart_delay(0, 0.0) == 0.75 * RESTART_BACKOFF_FIRST
    assert restart_delay(0, 0.999) < 1.25 * RESTART_BACKOFF_FIRST
    assert restart_delay(100, 0.999) == RESTART_BACKOFF_MAX


@pytest.mark.parametrize(("make", "field"), [
    (lambda: RestartPolicy(RestartMode.ALWAYS, 0), "restart_max"),
    (lambda: RestartPolicy(RestartMode.ALWAYS, 3, -1.0), "restart_window"),
    (lambda: live("tcp:80", failures=0), "live_failures"),
    (lambda: live("tcp:80", interval=-1.0), "live_interval"),
    (lambda: live("tcp:80", interval=0.0), "live_interval"),
    (lambda: live("tcp:80", interval=0.01), "live_interval"),
    (lambda: GroupSpec(argv=("x",), log_path="/tmp/l",
                       liveness=live("log:ready")), "live"),
])
def test_bad_supervision_input_is_refused_naming_the_field(make: Callable[[], object],
                                                          field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        make()
    assert info.value.field == field


@pytest.mark.parametrize(("record", "restarts"), [
    (ExitRecord(ExitReason.NATURAL, exit_code=0), False),
    (ExitRecord(ExitReason.NATURAL, exit_code=3), True),
    (ExitRecord(ExitReason.EXTERNAL_SIGNAL, signal=9), True),
    # The OOM killer's SIGKILL at the --memory limit: the commonest crash of a limited service.
    (ExitRecord(ExitReason.OOM_KILLED, signal=9, oom_kills=1), True),
    # A re-adopted leader's status cannot be read: a crash must not pass for a clean exit.
    (ExitRecord(ExitReason.UNKNOWN), True),
    (ExitRecord(ExitReason.REQUESTED, signal=15), False),
    (ExitRecord(ExitReason.FORCED_KILL, signal=9), False),
])
def test_on_failure_restarts_every_end_but_a_clean_or_requested_one(record: ExitRecord,
                                                                    restarts: bool) -> None:
    assert RestartPolicy(RestartMode.ON_FAILURE).wants(record) is restarts
    assert RestartPolicy(RestartMode.ALWAYS).wants(record)
    assert not RestartPolicy(RestartMode.NO).wants(record)


# ------------------------------------------------------------------ restart policies


async def test_crash_loop_restarts_with_backoff_until_the_limit_then_fails(
        authority: Authority) -> None:
    spec = GroupSpec(argv=("sh", "-c", "sleep 0.1; exit 3"), stop=GRACE,
                     restart=RestartPolicy(RestartMode.ON_FAILURE, 3, 60))
    view = await authority.spawn(spec)
    assert view.state is GroupState.RUNNING
    planned: list[float] = []
    stream = authority.watch(lambda e: e.group.group_id == view.group_id)
    async with asyncio.timeout(60):
        async for ev in stream:
            g = ev.group
            if g.state is GroupState.RESTARTING and g.next_restart_at and len(g.runs) > len(planned):
                planned.append(g.next_restart_at - g.runs[-1].exit.ended_at)
            if g.state.ended:
                break
    final = authority.get(view.group_id)
    assert final.state is GroupState.FAILED
    assert final.exit is not None and final.exit.reason is ExitReason.RESTART_LIMIT
    assert final.exit.exit_code == 3
    assert "--restart-max 3" in final.exit.message
    assert final.restarts == 3
    assert len(final.runs) == 4, "one record per run, the last one included"
    assert all(r.exit.reason is ExitReason.NATURAL and r.exit.exit_code == 3 for r in final.runs)
    assert all(r.duration > 0 for r in final.runs)
    assert len(planned) == 3 and planned == sorted(planned), f"backoff must grow: {planned}"
    assert marked_alive(view.group_id) == []


async def test_on_failure_lets_a_clean_exit_end_and_always_restarts_it(
        authority: Authority) -> None:
    once = await authority.spawn(GroupSpec(
        argv=("true",), restart=RestartPolicy(RestartMode.ON_FAILURE)))
    ended = await until(authority, once.group_id, lambda v: v.state.ended)
    assert ended.state is GroupState.EXITED and ended.restarts == 0 and not ended.runs

    again = await authority.spawn(GroupSpec(
        argv=("sh", "-c", "sleep 0.05"), stop=GRACE, restart=RestartPolicy(RestartMode.ALWAYS)))
    view = await until(authority, again.group_id,
                       lambda v: v.restarts >= 2 and v.state is GroupState.RUNNING)
    assert [r.exit.exit_code for r in view.runs][:2] == [0, 0]
    stopped = await authority.stop(again.group_id)
    assert stopped.state is GroupState.STOPPED and stopped.exit is not None
    assert marked_alive(again.group_id) == []


async def test_a_stop_during_the_backoff_wins_and_nothing_starts_again(
        authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(
        argv=("sh", "-c", "exit 1"), stop=GRACE,
        restart=RestartPolicy(RestartMode.ALWAYS, 100, 60)))
    # A crash loop grows its backoff; stop it in a pause long enough to be sure of the phase.
    waiting = await until(authority, view.group_id, lambda v: v.state is GroupState.RESTARTING
                          and v.next_restart_at - time.time() > 1.0)
    assert waiting.leader_pid == 0, "between runs nothing runs"
    stopped = await authority.stop(view.group_id)
    assert stopped.state is GroupState.STOPPED
    assert stopped.exit is not None and stopped.exit.reason is ExitReason.REQUESTED
    assert "waiting to restart" in stopped.exit.detail
    assert stopped.restarts == waiting.restarts, "no run started after the stop request"
    assert marked_alive(view.group_id) == []


async def test_a_stop_while_a_restart_is_probing_readiness_wins(
        authority: Authority, tmp_path: Path) -> None:
    """The first run's probe passes (and leaves a flag); the restarted run's probe then
    never passes, so the group sits in its restart's readiness check when the stop comes.
    Each run learns whether it is the first from a file of its own."""
    ran, probed = tmp_path / "ran", tmp_path / "probed"
    spec = GroupSpec(argv=("sh", "-c", f"if [ -e {ran} ]; then exec sleep 100; fi; "
                           f"touch {ran}; sleep 0.2"),
                     stop=GRACE, start_timeout=60,
                     ready=Probe.parse(f"exec:sh -c 'test ! -e {probed} && touch {probed}'"),
                     restart=RestartPolicy(RestartMode.ALWAYS))
    view = await authority.spawn(spec)
    assert view.state is GroupState.RUNNING
    await until(authority, view.group_id, lambda v: v.state is GroupState.RESTARTING)
    await async_wait_until(lambda: marked_alive(prefix=view.group_id + ".probe"), 10,
                           "the restarted run's readiness probe to run")
    stopped = await authority.stop(view.group_id)
    assert stopped.state is GroupState.STOPPED and stopped.exit is not None
    assert stopped.exit.survivors == 0 and stopped.restarts == 1
    assert marked_alive(prefix=view.group_id) == [], "the run and its probes are gone"


async def test_a_restart_that_never_becomes_ready_counts_until_the_limit(
        authority: Authority, tmp_path: Path) -> None:
    """The first run becomes ready and crashes; every restart then fails its readiness
    probe: each attempt is a run with its own record, and the limit ends the group."""
    ran, probed = tmp_path / "ran", tmp_path / "probed"
    spec = GroupSpec(argv=("sh", "-c", f"if [ -e {ran} ]; then exec sleep 100; fi; "
                           f"touch {ran}; sleep 0.3; exit 1"),
                     stop=GRACE, start_timeout=1,
                     ready=Probe.parse(f"exec:sh -c 'test ! -e {probed} && touch {probed}'"),
                     restart=RestartPolicy(RestartMode.ON_FAILURE, 2, 60))
    view = await authority.spawn(spec)
    assert view.state is GroupState.RUNNING
    final = await until(authority, view.group_id, lambda v: v.state.ended, timeout=60)
    assert final.state is GroupState.FAILED and final.exit is not None
    assert final.exit.reason is ExitReason.RESTART_LIMIT and final.restarts == 2
    assert final.exit.failure is FailureClass.READINESS_FAILED
    first, *attempts = final.runs
    assert first.exit.exit_code == 1 and first.exit.reason is ExitReason.NATURAL
    assert len(attempts) == 2
    assert all(r.exit.failure is FailureClass.READINESS_FAILED for r in attempts)
    assert marked_alive(prefix=view.group_id) == []


async def test_a_first_start_that_fails_is_reported_not_restarted(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(
        argv=("sh", "-c", "exit 2"), stop=GRACE, start_timeout=5,
        ready=Probe.parse(f"tcp:{closed_port()}"), restart=RestartPolicy(RestartMode.ALWAYS)))
    assert view.state is GroupState.FAILED and view.exit is not None
    assert view.exit.failure is FailureClass.IMMEDIATE_CRASH and view.restarts == 0


# ------------------------------------------------------------------ restart requests


async def test_requested_restart_keeps_the_id_and_the_old_runs_record(
        authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(argv=("sleep", "100"), stop=GRACE))
    old_pid = view.leader_pid
    a, b = await asyncio.gather(authority.restart(view.group_id),
                                authority.restart(view.group_id))
    assert a.state is b.state is GroupState.RUNNING
    assert a.restarts == b.restarts == 1, "two requests at once share one restart"
    assert a.leader_pid != old_pid
    (run,) = a.runs
    assert run.exit.reason is ExitReason.REQUESTED and run.exit.signal == 15
    assert "restart was requested" in run.exit.detail
    assert marked_alive(view.group_id) == [a.leader_pid]
    await authority.stop(view.group_id)


async def test_restart_is_refused_for_ended_starting_and_adopted_groups(
        authority: Authority) -> None:
    done = await authority.spawn(GroupSpec(argv=("true",)))
    await until(authority, done.group_id, lambda v: v.state.ended)
    with pytest.raises(Conflict, match="ended groups are final"):
        await authority.restart(done.group_id)
    with pytest.raises(InvalidSpec, match="adopted group cannot be restarted"):
        await authority.adopt(1, None, GroupSpec(argv=("adopted:1",),
                                                 restart=RestartPolicy(RestartMode.ALWAYS)))


class StopAtStartFailure(Hooks):
    """Requests a stop of every restarting group the moment a start fails: the window
    between a restart attempt failing and the supervisor judging it, made certain."""

    def __init__(self) -> None:
        self.authority: Authority | None = None
        self.stops: list[asyncio.Task[None]] = []

    def start_failure(self, failure: str) -> None:
        assert self.authority is not None
        for g in self.authority.lc.table:
            if g.state is GroupState.RESTARTING:
                self.stops.append(self.authority.stopper.begin(g, None, time.monotonic()))


async def test_a_stop_as_a_restart_attempt_fails_is_recorded_requested(tmp_path: Path) -> None:
    """The failed attempt's (empty) handle stayed attached, so the stop found nothing to
    signal and recorded the end as ``natural``, as if the program had exited on its own."""
    hooks = StopAtStartFailure()
    ctx = SignallerContext(f"sup-{tmp_path.name[-8:]}", "", {"containment": "auto"})
    signallers = Signallers(ctx)
    signallers.add(LocalSignaller(ctx))
    authority = hooks.authority = Authority(ctx.agent_name, signallers, hooks)
    ready, ran = tmp_path / "ready", tmp_path / "ran"
    program = f"if [ -e {ran} ]; then exit 3; fi; touch {ran} {ready}; exec sleep 300"
    try:
        view = await authority.spawn(GroupSpec(
            argv=("sh", "-c", program), stop=GRACE,
            ready=Probe.parse(f"exec:test -e {ready}", field_="ready"),
            restart=RestartPolicy(RestartMode.ON_FAILURE)))
        assert view.state is GroupState.RUNNING
        ready.unlink()  # the next run crashes before it is ready
        await authority.restart(view.group_id)
        assert len(hooks.stops) == 1
        await hooks.stops[0]
        final = authority.get(view.group_id)
        assert final.state is GroupState.STOPPED and final.exit is not None
        assert final.exit.reason is ExitReason.REQUESTED, final.exit
        assert final.runs[-1].exit.reason is ExitReason.START_FAILED
        assert marked_alive(view.group_id) == []
    finally:
        await authority.stop_all()
        await authority.shutdown()
        await signallers.aclose()


async def test_a_restart_request_that_joins_one_relaunching_shares_its_outcome(
        authority: Authority, tmp_path: Path) -> None:
    """Two restarts at once share one, also when the second comes while the first one's
    new run is already counted and waits to be ready: it returns with that run up, not
    with "could not be restarted" (CI saw it through the coordinator)."""
    ready = tmp_path / "ready"
    ready.touch()
    view = await authority.spawn(GroupSpec(
        argv=("sleep", "300"), stop=GRACE,
        ready=Probe.parse(f"exec:test -e {ready}", field_="ready")))
    ready.unlink()  # the next run waits to be ready until the file is back
    first = asyncio.ensure_future(authority.restart(view.group_id))
    await async_wait_until(lambda: authority.find(view.group_id).restarts == 1, 30,
                           "the restart's new run to be counted and waiting to be ready")
    second = asyncio.ensure_future(authority.restart(view.group_id))
    await asyncio.sleep(0)  # its request is in (it waits on the restart under way)
    ready.touch()
    views = await asyncio.wait_for(asyncio.gather(first, second), 60)
    assert [v.state for v in views] == [GroupState.RUNNING] * 2
    assert [v.restarts for v in views] == [1, 1], "one restart, shared"
    await authority.stop(view.group_id)


async def test_a_stop_during_a_requested_restart_wins(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(
        argv=("sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"),
        stop=StopPolicy(grace=30)))
    await async_wait_until(lambda: len(marked_alive(view.group_id)) == 2, 10,
                           "the shell to ignore TERM and start sleep")
    restarting = asyncio.ensure_future(authority.restart(view.group_id))
    await async_wait_until(lambda: 15 in authority.find(view.group_id).signals_sent, 10,
                           "the restart to send TERM")
    stopped = await authority.stop(view.group_id, StopPolicy(grace=0.2))
    after = await asyncio.wait_for(restarting, 30)
    assert stopped.state is after.state is GroupState.STOPPED
    assert after.restarts == 0, "no run started after the stop request"
    assert marked_alive(view.group_id) == []


# ------------------------------------------------------------------ liveness


async def test_unhealthy_is_flagged_and_cleared_by_a_passing_check(
        authority: Authority) -> None:
    port = closed_port()
    view = await authority.spawn(GroupSpec(argv=("sleep", "100"), stop=GRACE,
                                           liveness=live(f"tcp:{port}")))
    sick = await until(authority, view.group_id, lambda v: v.unhealthy,
                       kinds={EventKind.UNHEALTHY})
    assert sick.state is GroupState.RUNNING and f"{port}" in sick.health
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        well = await until(authority, view.group_id, lambda v: not v.unhealthy,
                           kinds={EventKind.HEALTHY})
    assert well.health == "" and well.restarts == 0
    await authority.stop(view.group_id)


async def test_an_over_long_http_answer_is_a_failed_check_and_checks_go_on(
        authority: Authority) -> None:
    """A status line longer than the stream's limit made readline raise and ended the
    group's liveness task for good: the group then passed for healthy whatever it said."""
    answers: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        first = not answers
        answers.append(b"long" if first else b"500")
        writer.write(b"A" * 70000 if first else
                     b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        view = await authority.spawn(GroupSpec(
            argv=("sleep", "100"), stop=GRACE,
            liveness=live(f"http://127.0.0.1:{port}/", failures=3)))
        sick = await until(authority, view.group_id, lambda v: v.unhealthy,
                           kinds={EventKind.UNHEALTHY})
        assert answers[0] == b"long" and len(answers) >= 3, answers
        assert "answered 500" in sick.health, sick.health
        task = authority.find(view.group_id).live_task
        assert task is not None and not task.done()
        await authority.stop(view.group_id)


async def no_exec(argv: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    raise AssertionError("an http probe runs nothing")


async def test_an_http_answer_without_a_line_end_is_a_definite_no() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"A" * (HTTP_LINE_MAX * 8))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async with await asyncio.start_server(serve, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        probe = Probe.parse(f"http://127.0.0.1:{port}/", timeout=5, field_="live")
        attempt = await Prober(probe, "", no_exec).attempt()
    assert not attempt.ok and attempt.answered
    assert "not an HTTP answer" in attempt.detail, attempt.detail


async def test_an_https_check_is_not_held_by_a_peer_that_never_closes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TLS server that answers, then never answers the probe's close_notify: closing the
    connection used to wait out ssl's 30 s shutdown timeout, far past the check's own."""
    ca = CA(tmp_path / "ca")
    pair = ca.issue("localhost")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.path))  # the probe trusts the test CA
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    answered = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        tls = context.wrap_socket(conn, server_side=True)
        tls.recv(4096)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        held.append(tls)  # never read again, never closed while the probe runs
        answered.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    probe = Probe.parse(f"https://localhost:{listener.getsockname()[1]}/", timeout=2,
                        field_="live")
    try:
        # Not held for ssl's 30 s shutdown timeout: the check closes at once, whatever the
        # peer does (a deadline far from both, so a slow machine cannot fail it).
        async with asyncio.timeout(15):
            attempt = await Prober(probe, "", no_exec).attempt()
        assert attempt.ok, attempt.detail
        assert answered.is_set()
    finally:
        thread.join(10)
        for tls in held:
            tls.close()
        listener.close()


async def test_a_hung_exec_check_is_killed_and_counts_as_failed(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(
        argv=("sleep", "100"), stop=GRACE,
        liveness=live("exec:sleep 100", timeout=0.2, action=UnhealthyAction.STOP)))
    stopped = await until(authority, view.group_id, lambda v: v.state.ended, timeout=30)
    assert stopped.state is GroupState.STOPPED and stopped.exit is not None
    assert "unhealthy" in stopped.exit.detail and "timed out" in stopped.exit.detail
    assert marked_alive(prefix=view.group_id) == [], "checks never outlive their timeout"


async def test_unhealthy_restart_starts_a_new_run(authority: Authority) -> None:
    port = closed_port()
    view = await authority.spawn(GroupSpec(
        argv=("sleep", "100"), stop=GRACE,
        liveness=live(f"tcp:{port}", action=UnhealthyAction.RESTART),
        restart=RestartPolicy(RestartMode.NO, 2, 60)))
    again = await until(authority, view.group_id,
                        lambda v: v.restarts == 1 and v.state is GroupState.RUNNING)
    assert not again.unhealthy, "a new run starts healthy"
    assert again.runs[0].exit.reason is ExitReason.REQUESTED
    assert "unhealthy" in again.runs[0].exit.detail
    # It stays unreachable: the limit (2 automatic restarts) ends it, failed.
    final = await until(authority, view.group_id, lambda v: v.state.ended, timeout=60)
    assert final.state is GroupState.FAILED and final.exit is not None
    assert final.exit.reason is ExitReason.RESTART_LIMIT
    assert marked_alive(prefix=view.group_id) == []


async def test_groups_without_live_have_no_check_task(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(argv=("sleep", "100"), stop=GRACE))
    assert authority.find(view.group_id).live_task is None
    await authority.stop(view.group_id)


async def test_forget_drops_ended_groups_only(authority: Authority) -> None:
    ended = await authority.spawn(GroupSpec(argv=("true",)))
    await until(authority, ended.group_id, lambda v: v.state.ended)
    running = await authority.spawn(GroupSpec(argv=("sleep", "100"), stop=GRACE))
    done, errors = authority.forget([ended.group_id, running.group_id, "g-00000000"])
    assert done == [ended.group_id]
    assert set(errors) == {running.group_id, "g-00000000"}
    assert ended.group_id not in {v.group_id for v in authority.views()}
    assert authority.get(running.group_id).state is GroupState.RUNNING
    await authority.stop(running.group_id)


async def test_a_check_in_flight_ends_with_its_group(authority: Authority) -> None:
    view = await authority.spawn(GroupSpec(
        argv=("sleep", "100"), stop=GRACE,
        liveness=live("exec:sleep 100", interval=0.1, timeout=60)))
    await async_wait_until(lambda: marked_alive(prefix=view.group_id + ".live"), 10,
                           "a liveness check to run")
    stopped = await authority.stop(view.group_id)
    assert stopped.state is GroupState.STOPPED
    task = authority.find(view.group_id).live_task
    assert task is not None
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert marked_alive(prefix=view.group_id) == [], "the check's tree went with the group"


@pytest.mark.parametrize("mode", [RestartMode.NO, RestartMode.ON_FAILURE])
async def test_a_requested_restart_whose_run_never_gets_ready(
        authority: Authority, tmp_path: Path, mode: RestartMode) -> None:
    """--restart no: the failed start surfaces (failed, start_failed), as a first start's
    would; with a restart policy it is retried with backoff (restarting)."""
    probed = tmp_path / "probed"
    view = await authority.spawn(GroupSpec(
        argv=("sleep", "100"), stop=GRACE, start_timeout=1, restart=RestartPolicy(mode),
        ready=Probe.parse(f"exec:sh -c 'test ! -e {probed} && touch {probed}'")))
    assert view.state is GroupState.RUNNING
    after = await authority.restart(view.group_id)
    assert after.restarts == 1
    assert after.runs[-1].exit.failure is FailureClass.READINESS_FAILED
    if mode is RestartMode.NO:
        assert after.state is GroupState.FAILED and after.exit is not None
        assert after.exit.reason is ExitReason.START_FAILED
        assert after.exit.failure is FailureClass.READINESS_FAILED
    else:
        assert after.state is GroupState.RESTARTING
        stopped = await authority.stop(view.group_id)
        assert stopped.state is GroupState.STOPPED
    assert marked_alive(prefix=view.group_id) == []
