"""Hostile input through the real gRPC API of a real `tether serve`.

Generated requests (oversized argv and env, control characters in names, unknown
enum values, negative/huge/NaN durations, garbage bytes) must each get a status,
the daemon must keep serving, and nothing it started may outlive the test.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.plugins.processes import Daemon, marked_alive, start_daemon, stop_daemon, wait_until
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc
from tether.v1 import common_pb2 as pb
from tether.v1 import coordinator_pb2 as cpb
from tether.v1 import coordinator_pb2_grpc as cgrpc

AGENT = f"hostile-{os.getpid()}"
# Anything but these means the daemon did not handle the input on purpose.
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("hostile")
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp / "st"),
                               "--agent-name", AGENT, "--default-grace", "0.2"], tmp)
    try:
        yield d
    finally:
        stop_daemon(d)
        leftovers = marked_alive(agent=AGENT)
        for pid in leftovers:
            os.kill(pid, 9)
        assert leftovers == [], "processes outlived the daemon"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def call(address: str, fn: Any) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            await fn(ch)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


def healthy(address: str) -> bool:
    return run(call(address, lambda ch: asyncio.sleep(0))) == grpc.StatusCode.OK


text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
nasty_text = st.one_of(text, st.just("\x00"), st.just("a\nb\x1b[31m"), st.text(min_size=300,
                                                                              max_size=400))
durations = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from([-1.0, 0.0, 1e-9, 0.05, 1e12, math.nan]))
commands = st.sampled_from(["true", "/bin/true", "sleep", "no-such-command", "", "/", "\x00"])


@st.composite
def specs(draw: Any) -> pb.GroupSpec:
    argv = [draw(commands), *draw(st.lists(nasty_text, max_size=4))]
    if draw(st.booleans()) and draw(st.booleans()):
        argv.append("x" * draw(st.sampled_from([10, 200_000])))
    env = draw(st.dictionaries(nasty_text, nasty_text, max_size=4))
    if draw(st.booleans()) and draw(st.booleans()):
        env["HUGE"] = "y" * 300_000
    spec = pb.GroupSpec(argv=argv, env=env, session_id=draw(nasty_text),
                        label=draw(nasty_text), window=draw(nasty_text),
                        cwd=draw(st.sampled_from(["", "/", "/nonexistent", "relative", "/tmp"])),
                        ready=draw(st.sampled_from(["", "tcp:0", "tcp:99999", "http:nope",
                                                    "log:(", "exec:", "exec:true", "bogus"])),
                        target=draw(st.sampled_from(["", "local", "docker:", "ssh:",
                                                     "nope:x", "docker:\x00"])),
                        stop_order=draw(st.integers(-(2**31), 2**31 - 1)),
                        inherit_env=draw(st.booleans()))
    spec.orphan_policy = draw(st.integers(-3, 1000))  # type: ignore[assignment]
    spec.stop.signal = draw(st.sampled_from(["", "TERM", "KILL", "NOPE", "0", "-1", "65"]))
    for field, value in (("start_timeout_seconds", draw(durations)),
                         ("probe_timeout_seconds", draw(durations))):
        if value is not None:
            setattr(spec, field, value)
    grace = draw(durations)
    if grace is not None:
        spec.stop.grace_seconds = grace
    if draw(st.booleans()):  # supervision: probes, intervals, counts, unknown enum values
        spec.live = draw(st.sampled_from(["", "tcp:0", "tcp:1", "exec:true", "log:x",
                                          "http:nope", "bogus", "exec:"]))
        for field, value in (("live_interval_seconds", draw(durations)),
                             ("live_timeout_seconds", draw(durations)),
                             ("restart_window_seconds", draw(durations))):
            if value is not None:
                setattr(spec, field, value)
        for field in ("live_failures", "restart_max"):
            if draw(st.booleans()):
                setattr(spec, field, draw(st.integers(-(2**31), 2**31 - 1)))
        spec.on_unhealthy = draw(st.integers(-3, 5))  # type: ignore[assignment]
        spec.restart = draw(st.integers(-3, 5))  # type: ignore[assignment]
    return spec


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=specs(), through_coordinator=st.booleans())
def test_generated_spawns_get_a_status_and_the_daemon_keeps_serving(
        daemon: Daemon, spec: pb.GroupSpec, through_coordinator: bool) -> None:
    async def spawn(ch: grpc.aio.Channel) -> None:
        if through_coordinator:
            await cgrpc.CoordinatorServiceStub(ch).Spawn(
                cpb.CoordinatorSpawnRequest(spec=spec), timeout=5)
        else:
            await agrpc.AgentServiceStub(ch).Spawn(apb.SpawnRequest(spec=spec), timeout=5)

    code = run(call(daemon.address, spawn))
    assert code in ACCEPTABLE, f"{code} for {spec}"
    assert healthy(daemon.address)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["/tether.v1.AgentService/Spawn", "/tether.v1.AgentService/Stop",
                               "/tether.v1.CoordinatorService/StopSession",
                               "/tether.v1.CoordinatorService/KeepAlive",
                               "/tether.v1.AgentService/Signal",
                               "/tether.v1.AgentService/Restart",
                               "/tether.v1.AgentService/Forget",
                               "/tether.v1.CoordinatorService/RestartGroups",
                               "/tether.v1.CoordinatorService/ForgetGroups",
                               "/tether.v1.CoordinatorService/Wait"]),
       payload=st.binary(max_size=2000))
def test_malformed_messages_are_answered(daemon: Daemon, method: str, payload: bytes) -> None:
    async def raw(ch: grpc.aio.Channel) -> None:
        await ch.unary_unary(method, request_serializer=None,
                             response_deserializer=None)(payload, timeout=5)

    code = run(call(daemon.address, raw))
    # Undecodable bytes are INTERNAL in gRPC itself; bytes that decode into some
    # message are judged like any request.
    assert code in ACCEPTABLE | {grpc.StatusCode.INTERNAL}
    assert healthy(daemon.address)


def test_names_with_control_characters_and_bad_durations_are_refused(daemon: Daemon) -> None:
    async def go(ch: grpc.aio.Channel) -> list[grpc.StatusCode]:
        stub = cgrpc.CoordinatorServiceStub(ch)
        codes = []
        for req in (cpb.CreateSessionRequest(session_id="bad\x07name"),
                    cpb.CreateSessionRequest(session_id="ok", ttl_seconds=-1),
                    cpb.CreateSessionRequest(session_id="ok", ttl_seconds=math.nan),
                    cpb.CreateSessionRequest(session_id="", ttl_seconds=5)):
            try:
                await stub.CreateSession(req, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        try:
            await stub.KeepAlive(cpb.KeepAliveRequest(session_id="nope", ttl_seconds=1e300),
                                 timeout=5)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
        return codes

    assert run(go_with(daemon, go)) == [grpc.StatusCode.INVALID_ARGUMENT] * 4 + [
        grpc.StatusCode.NOT_FOUND]


def test_users_ports_limits_and_hooks_are_checked_at_the_api(daemon: Daemon) -> None:
    """The spec fields of issue 15, hostile, through the coordinator's Spawn: each refused
    with INVALID_ARGUMENT before anything starts."""
    def spec(**kw: Any) -> pb.GroupSpec:
        s = pb.GroupSpec(argv=["sleep", "60"], session_id="hostile-15")
        for key, value in kw.items():
            if key == "ports":
                s.ports.extend(pb.PortRequest(name=n, port=p) for n, p in value)
            elif key in ("memory_bytes", "cpus", "pids"):
                setattr(s.limits, key, value)
            elif key == "pre_stop":
                s.pre_stop.SetInParent()
                s.pre_stop.argv.extend(value)
            elif key == "env":
                s.env.update(value)
            else:
                setattr(s, key, value)
        return s

    bad = [
        spec(user="root\n"), spec(user="a b"), spec(user="../../etc"), spec(user="x:y:z"),
        spec(ports=[("http", 0), ("HTTP", 0)]), spec(ports=[("a=b", 0)]),
        spec(ports=[("http", 70000)]), spec(ports=[("http", -1)]),
        spec(ports=[(f"p{i}", 0) for i in range(200)]),
        spec(ports=[("a", 3000), ("b", 3000)]),
        spec(ports=[("http", 0)], env={"PORT": "1"}),
        spec(ready="tcp:$PORT"),
        spec(memory_bytes=-1), spec(memory_bytes=0), spec(memory_bytes=2**62),
        spec(cpus=0.0), spec(cpus=math.nan), spec(cpus=math.inf), spec(cpus=-1.0),
        spec(pids=0), spec(pids=-5), spec(pids=2**40),
        spec(pre_stop=[]), spec(pre_stop=["a\x00b"]), spec(pre_stop=[""]),
        spec(user="nobody", target="ssh:x@127.0.0.1:1"),
        spec(ports=[("http", 0)], target="docker:web"),
    ]
    timeouts = pb.GroupSpec(argv=["true"], session_id="hostile-15")
    timeouts.pre_stop.argv.append("true")
    timeouts.pre_stop.timeout_seconds = math.nan
    bad.append(timeouts)

    async def go(ch: grpc.aio.Channel) -> list[grpc.StatusCode]:
        stub = cgrpc.CoordinatorServiceStub(ch)
        codes = []
        for s in bad:
            try:
                await stub.Spawn(cpb.CoordinatorSpawnRequest(spec=s), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        for port in (-1, 65536, 2**31 - 1):
            try:
                await stub.ListPorts(cpb.CoordinatorListPortsRequest(port=port), timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        try:  # nothing was started, and no session was left behind either
            await stub.GetSession(cpb.GetSessionRequest(session_id="hostile-15"), timeout=10)
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
        return codes

    codes = run(go_with(daemon, go))
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * (len(bad) + 3) + [
        grpc.StatusCode.NOT_FOUND], codes
    assert healthy(daemon.address)


selectors = st.builds(cpb.GroupSelector,
                      group_ids=st.lists(st.one_of(nasty_text, st.just("g-00000000")), max_size=3),
                      labels=st.lists(nasty_text, max_size=3))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(session=st.one_of(nasty_text, st.just("sel")), selector=selectors,
       which=st.sampled_from(["stop", "signal", "restart", "forget", "wait"]),
       seconds=durations)
def test_generated_group_selections_get_a_status_and_change_nothing(
        daemon: Daemon, session: str, selector: cpb.GroupSelector, which: str,
        seconds: float | None) -> None:
    """A live group in session "sel" (label "web") must survive every generated request
    that does not name it: bad ids, labels with control characters, other sessions."""
    named = "web" in selector.labels
    async def go(ch: grpc.aio.Channel) -> None:
        stub = cgrpc.CoordinatorServiceStub(ch)
        if which == "stop":
            req = cpb.StopSessionRequest(session_id=session, selector=selector)
            if seconds is not None:
                req.grace_seconds = seconds
            await stub.StopSession(req, timeout=10)
        elif which == "signal":
            await stub.SignalSession(cpb.SignalSessionRequest(
                session_id=session, signal="USR2", selector=selector), timeout=10)
        elif which == "restart":
            await stub.RestartGroups(cpb.RestartGroupsRequest(
                session_id=session, selector=selector), timeout=10)
        elif which == "forget":
            await stub.ForgetGroups(cpb.ForgetGroupsRequest(
                session_id=session, selector=selector), timeout=10)
        else:
            req = cpb.WaitRequest(session_id=session)
            if seconds is not None:
                req.timeout_seconds = seconds
            await stub.Wait(req, timeout=2)

    shown = daemon.json("show", "sel") if daemon.cli("show", "sel").returncode == 0 else None
    if shown is None or not any(g["state"] == "running" for g in shown["groups"]):
        daemon.cli("spawn", "--session", "sel", "--label", "web", "--", "sleep", "300",
                   check=True)
    (web,) = [g for g in daemon.json("show", "sel")["groups"] if g["state"] == "running"]
    code = run(call(daemon.address, go))
    assert code in ACCEPTABLE, f"{code} for {which} {session!r} {selector}"
    assert healthy(daemon.address)
    if not (session == "sel" and (named or not (selector.group_ids or selector.labels))):
        assert marked_alive(web["group_id"]) == [web["pid"]], "a request not naming it"


async def go_with(daemon: Daemon, fn: Any) -> Any:
    async with grpc.aio.insecure_channel(daemon.address) as ch:
        return await fn(ch)


def test_thousands_of_abandoned_streams_leak_nothing(daemon: Daemon) -> None:
    proc = psutil.Process(daemon.proc.pid)

    async def abandon(n: int) -> None:
        async with grpc.aio.insecure_channel(daemon.address) as ch:
            agent = agrpc.AgentServiceStub(ch)
            coord = cgrpc.CoordinatorServiceStub(ch)
            await coord.CreateSession(cpb.CreateSessionRequest(session_id="streams"), timeout=5)
            for start in range(0, n, 250):
                calls = []
                for i in range(start, min(n, start + 250)):
                    if i % 2:
                        calls.append(agent.Watch(apb.WatchRequest(initial=True)))
                    else:
                        calls.append(coord.WatchSession(
                            cpb.WatchSessionRequest(session_id="streams", initial=True)))
                await asyncio.sleep(0.05)
                for c in calls:
                    c.cancel()

    run(abandon(200))
    wait_until(lambda: healthy(daemon.address), 10, "health")
    fds_before, threads_before = proc.num_fds(), proc.num_threads()
    run(abandon(2000))
    assert healthy(daemon.address)
    # Abandoned streams must not pile up file descriptors or threads in the daemon.
    wait_until(lambda: proc.num_fds() <= fds_before + 10, 20, "fds to return to baseline")
    assert proc.num_threads() <= threads_before + 4

    # And a fresh stream still works: it sees a spawn and its exit.
    async def fresh() -> list[str]:
        async with grpc.aio.insecure_channel(daemon.address) as ch:
            coord = cgrpc.CoordinatorServiceStub(ch)
            stream = coord.WatchSession(cpb.WatchSessionRequest(session_id="streams"))
            kinds: list[str] = []

            async def read() -> None:
                async for ev in stream:
                    kinds.append(ev.kind)
                    if ev.group.state == pb.GROUP_STATE_EXITED:
                        return

            reader = asyncio.ensure_future(read())
            await stream.initial_metadata()  # subscribed: nothing can fall between
            await coord.Spawn(cpb.CoordinatorSpawnRequest(spec=pb.GroupSpec(
                argv=["sh", "-c", "sleep 0.1"], session_id="streams")), timeout=10)
            await asyncio.wait_for(reader, 10)
            stream.cancel()
            return kinds

    assert run(fresh())


def test_every_generated_group_is_stopped(daemon: Daemon, tmp_path: Path) -> None:
    """Runs last in this module: stopping every session leaves nothing of ours alive."""
    sessions = daemon.json("sessions", "--all")["sessions"]
    for s in sessions:
        if s["state"] != "stopped":
            res = daemon.cli("stop", "--grace", "0.2", "--", s["session"], timeout=120)
            assert res.returncode in (0, 1), res.stderr  # 1: it ended uncleanly, but ended
    wait_until(lambda: not marked_alive(agent=AGENT), 30, "every generated group to be gone")
