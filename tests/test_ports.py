"""--port: ports the agent assigns and reserves, and `tether ports` naming who holds a port.

Real sockets only: programs really listen on what they were given, a foreign
listener is a real socket of this test process, and owners are found by the
agent's /proc scan, not by what tether believes."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.plugins.processes import Daemon, make_authority, start_daemon, stop_daemon
from tether.agent.authority import Authority
from tether.client.spec import build_spec
from tether.core.errors import InvalidSpec
from tether.core.model import MAX_PORTS, FailureClass, GroupState

SERVER = ["sh", "-c", f'exec {sys.executable} -m http.server "$PORT" --bind 127.0.0.1']
ENV_DUMP = ["sh", "-c", 'echo "$PORT $TETHER_PORT_HTTP $TETHER_PORT_API"; exec sleep 300']


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[Authority]:
    a, signallers = await make_authority(f"ports-{os.getpid()}-{tmp_path.name[-6:]}")
    try:
        yield a
    finally:
        await a.stop_all()
        await a.shutdown()
        await signallers.aclose()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port held by something that is not tether: this test process."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s
    finally:
        s.close()


async def test_assigned_ports_reach_the_program_and_its_probe(auth: Authority,
                                                              tmp_path: Path) -> None:
    view = await auth.spawn(build_spec(SERVER, ports=["http", "api"], ready="tcp:$PORT",
                                       session="p", label="web"))
    assert view.state is GroupState.RUNNING, view.exit
    http, api = view.context.ports
    assert (http.name, api.name) == ("http", "api") and http.port != api.port
    # It really listens on the port it was given (the probe said so; so does /proc).
    owners = await auth.list_ports(http.port)
    assert [(o.group_id, o.name, o.session_id, o.label) for o in owners if o.listening] == [
        (view.group_id, "http", "p", "web")]
    log = tmp_path / "env.log"
    dump = await auth.spawn(build_spec(ENV_DUMP, ports=["http", "api"], log=str(log)))
    await _line(log)
    port, http_port, api_port = log.read_text().split()
    assert port == http_port  # PORT is the first one
    assert {int(http_port), int(api_port)} == {p.port for p in dump.context.ports}
    # Reserved against the other group: never handed out twice.
    assert not {p.port for p in dump.context.ports} & {http.port, api.port}


async def _line(path: Path) -> None:
    from tests.plugins.processes import async_wait_until

    await async_wait_until(lambda: path.exists() and path.read_text().endswith("\n"), 10,
                           f"a line in {path}")


async def test_picked_ports_never_collide_while_reserved(auth: Authority) -> None:
    views = [await auth.spawn(build_spec(["sleep", "300"], ports=["a", "b"])) for _ in range(20)]
    ports = [p.port for v in views for p in v.context.ports]
    assert len(ports) == len(set(ports)) == 40


async def test_a_reserved_port_is_refused_to_another_group_until_its_group_ends(
        auth: Authority) -> None:
    first = await auth.spawn(build_spec(["sleep", "300"], ports=["api"], session="s1",
                                        label="holder"))
    port = first.context.ports[0].port  # reserved, though nothing listens on it
    second = await auth.spawn(build_spec(["sleep", "300"], ports=[f"api={port}"]))
    assert second.state is GroupState.FAILED
    assert second.exit is not None and second.exit.failure is FailureClass.PORT_IN_USE
    assert first.group_id in second.exit.message and "holder" in second.exit.message
    assert "'s1'" in second.exit.message and "reserved" in second.exit.message
    await auth.stop(first.group_id)
    third = await auth.spawn(build_spec(["sleep", "300"], ports=[f"api={port}"]))
    assert third.state is GroupState.RUNNING, third.exit
    assert third.context.ports[0].fixed


async def test_a_fixed_port_held_by_another_process_names_it(auth: Authority,
                                                             listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    view = await auth.spawn(build_spec(["sleep", "300"], ports=[f"web={port}"]))
    assert view.exit is not None and view.exit.failure is FailureClass.PORT_IN_USE
    assert f"pid {os.getpid()}" in view.exit.message
    assert "user root" in view.exit.message or "user " in view.exit.message
    assert f"tether ports {port}" in view.exit.message
    # Nothing stays reserved by the failed start.
    assert all(o.group_id != view.group_id for o in await auth.list_ports())


async def test_list_ports_names_foreign_listeners(auth: Authority,
                                                  listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    owners = await auth.list_ports(port)
    assert len(owners) == 1
    o = owners[0]
    assert (o.port, o.address, o.pid, o.group_id) == (port, "127.0.0.1", os.getpid(), "")
    assert "pytest" in o.command or "python" in o.command


@pytest.mark.parametrize(("ports", "says"), [
    (["http=0"], "0 is not a fixed port"),
    (["http=abc"], "'abc' is not a TCP port"),
    (["http=70000"], "not a TCP port"),
    (["a=b=c"], "not a TCP port"),
    (["http", "HTTP"], "would both be TETHER_PORT_HTTP"),
    (["1http"], "port name '1http' is not valid"),
    (["ht-tp"], "is not valid"),
    (["a=3000", "b=3000"], "both ask for port 3000"),
    ([f"p{i}" for i in range(200)], f"at most {MAX_PORTS}"),
])
def test_bad_port_requests_are_refused(ports: list[str], says: str) -> None:
    with pytest.raises(InvalidSpec, match=says):
        build_spec(["true"], ports=ports)


#: Listens on $PORT until the readiness probe has connected once, then stops listening.
ONE_ANSWER = ["sh", "-c", f"exec {sys.executable} -c '"
              "import os, socket, time\n"
              "s = socket.create_server((\"127.0.0.1\", int(os.environ[\"PORT\"])))\n"
              "s.accept()[0].close(); s.close()\n"
              "time.sleep(300)'"]


async def test_a_liveness_probe_checks_the_assigned_port(auth: Authority) -> None:
    from tests.plugins.processes import async_wait_until

    view = await auth.spawn(build_spec(ONE_ANSWER, ports=["http"], ready="tcp:$PORT",
                                       live="tcp:$PORT", live_interval=0.2, live_failures=1))
    assert view.state is GroupState.RUNNING, view.exit
    (http,) = view.context.ports
    g = auth.find(view.group_id)
    await async_wait_until(lambda: g.unhealthy, 30, "the liveness check to fail")
    assert f":{http.port}" in g.health, g.health  # the assigned port, not a stand-in


def test_ports_and_env_or_probes_must_agree() -> None:
    with pytest.raises(InvalidSpec, match=r"liveness probe .* refers to \$PORT"):
        build_spec(["true"], live="tcp:$PORT")
    with pytest.raises(InvalidSpec, match="--env PORT conflicts with --port"):
        build_spec(["true"], ports=["http"], env={"PORT": "80"})
    with pytest.raises(InvalidSpec, match=r"refers to \$TETHER_PORT_API"):
        build_spec(["true"], ports=["http"], ready="tcp:$TETHER_PORT_API")
    with pytest.raises(InvalidSpec, match=r"refers to \$PORT"):
        build_spec(["true"], ready="http://127.0.0.1:$PORT/")
    spec = build_spec(["true"], ports=["http", "api"],
                      ready="http://127.0.0.1:${TETHER_PORT_API}/health")
    assert str(spec.ready.resolve({"TETHER_PORT_API": "4000"})) == \
        "http:http://127.0.0.1:4000/health"  # type: ignore[union-attr]
    lower = build_spec(["true"], ports=["http"])
    assert lower.ports[0].env_name == "TETHER_PORT_HTTP"


@pytest.mark.parametrize("target", ["docker:web", "ssh:nobody@127.0.0.1:1"])
async def test_remote_targets_refuse_ports(auth: Authority, target: str) -> None:
    with pytest.raises(InvalidSpec, match=f"--port is not supported for target '{target}'"):
        await auth.spawn(build_spec(["true"], ports=["http"], target=target, session="p"))


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
                               "--agent-name", f"prt-{tmp_path.name[-10:]}"], tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)


def test_cli_port_ready_show_and_tether_ports(srv: Daemon, listener: socket.socket,
                                              tmp_path: Path) -> None:
    res = srv.cli("spawn", "--session", "web", "--label", "api", "--port", "http",
                  "--ready", "tcp:$PORT", "--", *SERVER, check=True)
    gid = res.stdout.strip()
    group = srv.json("show", "web")["groups"][0]
    port = group["context"]["ports"]["http"]
    assert f"port http = {port} (TETHER_PORT_HTTP and PORT)" in srv.cli("show", "web").stdout
    everything = srv.json("ports")
    mine = [p for p in everything["ports"] if p["port"] == port]
    assert mine and mine[0]["group_id"] == gid and mine[0]["session"] == "web"
    assert mine[0]["label"] == "api" and mine[0]["name"] == "http"
    foreign = listener.getsockname()[1]
    one = srv.json("ports", str(foreign))["ports"]
    assert [(p["pid"], p["group_id"]) for p in one] == [(os.getpid(), "")]
    table = srv.cli("ports", str(port), check=True).stdout
    assert gid in table and "web" in table and "api" in table
    taken = srv.cli("spawn", "--session", "web2", "--port", f"x={foreign}", "--", "true")
    assert taken.returncode == 1 and "port_in_use" in taken.stderr
    assert f"pid {os.getpid()}" in taken.stderr
    assert srv.cli("ports", "70000").returncode == 2
    assert "nobody listens" in srv.cli("ports", "1", check=True).stdout
    file = tmp_path / "s.toml"
    file.write_text('session = "web3"\n[[group]]\nargv = ["sleep", "60"]\n'
                    'ports = ["a", "b=' + str(port) + '"]\n')
    up = srv.cli("up", str(file))
    assert up.returncode == 1 and "port_in_use" in up.stderr and gid in up.stderr
    srv.cli("stop", "web", check=True)
    free = srv.cli("spawn", "--session", "web4", "--port", f"b={port}", "--", "sleep", "60")
    assert free.returncode == 0, "the port is free again once its group ended"
