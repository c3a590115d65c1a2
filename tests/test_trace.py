"""Trace context (issue 17, item 6): a caller's W3C traceparent is kept on the group, put in
its processes' environment as TRACEPARENT, and carried on its events, records and log
lines; a malformed one is ignored with a log line and never reaches a child. With the
extra tether[otel] the daemons emit spans for spawn, stop and fan-out (checked here
with an in-memory exporter around an in-process `tether serve`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.plugins.processes import (
    Daemon,
    free_port,
    marked_alive,
    start_daemon,
    stop_daemon,
    wait_until,
)
from tether.client import AsyncClient, Client
from tether.core import trace
from tether.core.errors import InvalidSpec

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"tr-{tmp_path.name[-10:]}"], tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


def test_a_traceparent_follows_the_group_to_its_processes_events_records_and_logs(
        srv: Daemon) -> None:
    with Client(srv.address) as c:
        g = c.spawn(["sleep", "300"], session="tr", label="lsp", traceparent=TP).view
        assert g.spec.traceparent == TP
        (pid,) = marked_alive(g.group_id)
        assert env_of(pid)["TRACEPARENT"] == TP
        events = c.watch("tr", initial=True)
        first = next(events)
        events.close()
        assert first.group is not None and first.group.view.spec.traceparent == TP
        shown = srv.json("show", "tr")["groups"][0]
        assert shown["traceparent"] == TP
        report = c.stop("tr", traceparent=TP2)
        assert [r.traceparent for r in report.groups] == [TP]
    stopped = srv.json("stop", "tr")
    assert stopped["groups"][0]["traceparent"] == TP, "the record keeps it"


def test_malformed_traceparents_are_ignored_and_never_reach_a_child(srv: Daemon) -> None:
    bad = ["00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # upper case
           "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
           "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
           "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
           TP + "-extra", "x" * 4000, "00-4bf92f35\n77b34da6a3ce929d0e0e4736-00f067aa0ba902b7"]
    assert trace.valid(TP) and not any(trace.valid(b) for b in bad)

    async def raw() -> list[str]:
        ids = []
        from tether.client.spec import build_spec
        from tether.rpc.convert import spec_to_pb
        from tether.v1 import coordinator_pb2 as cpb
        from tether.v1 import coordinator_pb2_grpc as cgrpc

        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = cgrpc.CoordinatorServiceStub(channel)
            for n, b in enumerate(bad[:5]):
                spec = spec_to_pb(build_spec(["sleep", "300"], session="bad"))
                spec.traceparent = b  # in the spec, and in the metadata
                g = await stub.Spawn(cpb.CoordinatorSpawnRequest(spec=spec,
                                                                 idempotency_key=f"k{n}"),
                                     metadata=((trace.HEADER, b),), timeout=30)
                assert g.state == 2 and g.spec.traceparent == "", g  # running, dropped
                ids.append(g.group_id)
        return ids

    ids = asyncio.run(raw())
    for gid in ids:
        (pid,) = marked_alive(gid)
        assert "TRACEPARENT" not in env_of(pid)
    assert "ignoring a malformed traceparent from a Spawn call" in srv.log()
    assert "ignoring a malformed traceparent from a request's spec" in srv.log()

    async def sdk() -> None:
        async with AsyncClient(srv.address) as c:
            with pytest.raises(InvalidSpec, match="not a W3C traceparent"):
                await c.spawn(["sleep", "1"], session="bad", traceparent=bad[0])

    asyncio.run(sdk())
    srv.cli("stop", "bad")


def test_the_callers_traceparent_variable_is_honoured_and_an_explicit_env_wins(
        srv: Daemon) -> None:
    res = subprocess.run([sys.executable, "-m", "tether.coordinator.cli", "spawn", "--session",
                          "envtp", "--", "sleep", "300"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "TETHER_COORDINATOR": srv.address,
                                          "TRACEPARENT": TP2})
    assert res.returncode == 0, res.stderr
    (pid,) = marked_alive(res.stdout.strip())
    assert env_of(pid)["TRACEPARENT"] == TP2
    with Client(srv.address) as c:
        g = c.spawn(["sleep", "300"], session="envtp", env={"TRACEPARENT": "mine"},
                    traceparent=TP).view
        (pid,) = marked_alive(g.group_id)
        assert env_of(pid)["TRACEPARENT"] == "mine", "a variable the spec asks for wins"
        none = c.spawn(["sleep", "300"], session="envtp", traceparent="").view
        (pid,) = marked_alive(none.group_id)
        assert "TRACEPARENT" not in env_of(pid) or os.environ.get("TRACEPARENT")
        c.stop("envtp")


async def test_spans_for_spawn_stop_and_fanout(tmp_path: Path) -> None:
    from opentelemetry import trace as otel
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tether.agent.run import AgentConfig
    from tether.coordinator.run import CoordinatorDaemonConfig, run_serve
    from tether.rpc.daemon import Shutdown

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.set_tracer_provider(provider)  # once per process: the first one set stays
    if otel.get_tracer_provider() is not provider:
        pytest.skip("another test set the global tracer provider first")
    port = free_port()
    shutdown = Shutdown()
    cfg = CoordinatorDaemonConfig(listen=f"127.0.0.1:{port}", state_dir=str(tmp_path / "st"))
    serving = asyncio.ensure_future(run_serve(cfg, AgentConfig(name="otel", guardian=False),
                                              shutdown))
    try:
        async with AsyncClient(f"127.0.0.1:{port}", failover=30) as c:
            async def up() -> bool:
                try:
                    await c.agents(timeout=2)
                    return True
                except Exception:
                    return False

            while not await up():
                assert not serving.done(), serving
                await asyncio.sleep(0.05)
            g = await c.spawn(["sleep", "300"], session="sp", traceparent=TP)
            await c.stop("sp", traceparent=TP2)
    finally:
        shutdown.request("test")
        await serving
    spans = {s.name: s for s in exporter.get_finished_spans()}
    # (serve's coordinator calls its agent in-process: no tether.agent.spawn here)
    assert {"tether.spawn", "tether.stop.request", "tether.stop",
            "tether.fanout.stop"} <= set(spans), sorted(spans)
    trace_id = int(TP.split("-")[1], 16)
    spawn = spans["tether.spawn"]
    assert spawn.context.trace_id == trace_id and spawn.parent.span_id == int(TP.split("-")[2], 16)
    assert spawn.attributes["tether.group_id"] == g.view.group_id
    stop_id = int(TP2.split("-")[1], 16)
    assert spans["tether.stop"].context.trace_id == stop_id
    assert spans["tether.fanout.stop"].context.trace_id == stop_id
    assert spans["tether.fanout.stop"].attributes["tether.agent"] == "otel"
    wait_until(lambda: marked_alive(g.view.group_id) == [], 30, "the group to be gone")


def test_without_the_extra_nothing_imports_opentelemetry() -> None:
    code = ("import sys, importlib.util as u\n"
            "u.find_spec = lambda name, *a: None if name.startswith('opentelemetry') else "
            "_f(name, *a)\n")
    script = ("import importlib.util as u; _f = u.find_spec\n" + code +
              "from tether.core import trace\n"
              "import tether.coordinator.service, tether.agent.service, tether.client\n"
              "with trace.span('x', '" + TP + "') as s: assert s is None\n"
              "trace.setup('t')\n"
              "assert not [m for m in sys.modules if m.startswith('opentelemetry')], "
              "sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr


def test_a_later_versions_traceparent_is_continued_as_version_00(srv: Daemon) -> None:
    """W3C: a parser meeting a version after 00 reads its first 55 characters as version 00
    (followed by the end or by "-" and more); only version ff is invalid. The trace goes
    on (as version 00) instead of being dropped, and the SDK takes it."""
    body = TP[2:]
    later = ["01" + body, "cc" + body + "-more-fields", "01" + body + "-"]
    bad = ["ff" + body, "01" + body + "x", "01" + body + "-a\nb", "01" + body + "-a\0b",
           "01" + body + "-a b", "01" + body + "-" + "x" * 600]
    assert all(trace.valid(v) for v in later) and not any(trace.valid(b) for b in bad)

    async def raw() -> list[str]:
        from tether.client.spec import build_spec
        from tether.rpc.convert import spec_to_pb
        from tether.v1 import coordinator_pb2 as cpb
        from tether.v1 import coordinator_pb2_grpc as cgrpc

        ids = []
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = cgrpc.CoordinatorServiceStub(channel)
            for n, v in enumerate(later):
                spec = spec_to_pb(build_spec(["sleep", "300"], session="later"))
                spec.traceparent = v
                g = await stub.Spawn(cpb.CoordinatorSpawnRequest(spec=spec,
                                                                 idempotency_key=f"l{n}"),
                                     metadata=((trace.HEADER, v),), timeout=30)
                assert g.spec.traceparent == TP, g.spec.traceparent
                ids.append(g.group_id)
        async with AsyncClient(srv.address) as c:
            g2 = await c.spawn(["sleep", "300"], session="later", traceparent=later[1])
            assert g2.view.spec.traceparent == TP
            ids.append(g2.view.group_id)
        return ids

    for gid in asyncio.run(raw()):
        (pid,) = marked_alive(gid)
        assert env_of(pid)["TRACEPARENT"] == TP
    assert "malformed traceparent" not in srv.log()
    srv.cli("stop", "later")
