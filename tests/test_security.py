"""TLS, mTLS between coordinator and agents, bearer tokens, the non-loopback rule, config files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.plugins.certs import CA
from tests.plugins.processes import Daemon, marked_alive, start_daemon, stop_daemon, wait_until
from tether.rpc.security import ClientSecurity
from tether.v1 import agent_pb2 as apb
from tether.v1 import agent_pb2_grpc as agrpc
from tether.v1 import common_pb2 as pb


def tokens(tmp_path: Path, name: str, *values: str) -> Path:
    path = tmp_path / name
    path.write_text("".join(v + "\n" for v in values))
    path.chmod(0o600)
    return path


def test_non_loopback_listen_needs_tls_or_insecure(tmp_path: Path) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "tether.coordinator.cli", "coordinator",
                          "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2
    assert "0.0.0.0:0" in res.stderr and "--insecure" in res.stderr and "TLS" in res.stderr
    d = start_daemon("coordinator", ["--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "c"),
                                     "--insecure"], tmp_path)
    try:
        assert "WITHOUT TLS" in d.log()
    finally:
        stop_daemon(d)


@pytest.fixture
def tls_serve(tmp_path: Path) -> tuple[Daemon, CA, Path]:
    ca = CA(tmp_path / "pki")
    server = ca.issue("serve")
    token = tokens(tmp_path, "tokens", "s3cret-cli-token")
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"sec-{tmp_path.name[-8:]}",
                               "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                               "--token-file", str(token)], tmp_path)
    return d, ca, token


def test_tls_and_token_required_by_serve(tls_serve: tuple[Daemon, CA, Path],
                                         tmp_path: Path) -> None:
    d, ca, token = tls_serve
    try:
        ok = ["--tls-ca", str(ca.path), "--token-file", str(token)]
        res = d.cli("spawn", "--session", "s", *ok, "--", "sleep", "300")
        assert res.returncode == 0, res.stderr
        gid = res.stdout.strip()
        assert marked_alive(gid)

        no_token = d.cli("sessions", "--tls-ca", str(ca.path))
        assert no_token.returncode == 2
        assert "not authenticated" in no_token.stderr and "--token-file" in no_token.stderr
        wrong = tokens(tmp_path, "wrong", "guess")
        bad = d.cli("stop", "s", "--tls-ca", str(ca.path), "--token-file", str(wrong))
        assert bad.returncode == 2
        assert marked_alive(gid), "a refused call must change nothing"
        plaintext = d.cli("sessions", "--token-file", str(token), "--timeout", "5")
        assert plaintext.returncode == 4

        assert d.cli("stop", "s", *ok).returncode == 0
        assert marked_alive(gid) == []
    finally:
        stop_daemon(d)


async def _health(address: str, dial: ClientSecurity) -> int:
    async with dial.channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10)
        return int(reply.status)


def test_agent_accepts_lifecycle_calls_only_from_its_coordinators_identity(
        tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    coord_pair, agent_pair = ca.issue("coordinator"), ca.issue("agent-1")
    intruder = ca.issue("intruder")
    c = start_daemon("coordinator", [
        "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "c"),
        "--tls-cert", str(coord_pair.cert), "--tls-key", str(coord_pair.key),
        "--tls-client-ca", str(ca.path), "--allow-identity", "agent-1",
        "--tls-ca", str(ca.path)], tmp_path, name="c")
    a = None
    try:
        a = start_daemon("agent", [
            "--listen", "127.0.0.1:0", "--coordinator", c.address, "--name", "agent-1",
            "--state-dir", str(tmp_path / "a"),
            "--tls-cert", str(agent_pair.cert), "--tls-key", str(agent_pair.key),
            "--tls-client-ca", str(ca.path), "--allow-identity", "coordinator",
            "--tls-ca", str(ca.path)], tmp_path, name="a")
        # The coordinator admits only the identity agent-1: a client with another
        # certificate from the same CA is refused.
        refused = c.cli("agents", "--tls-ca", str(ca.path), "--tls-cert", str(intruder.cert),
                        "--tls-key", str(intruder.key))
        assert refused.returncode == 2 and "not authenticated" in refused.stderr

        # The agent registered over mTLS (its certificate is allowed by the coordinator).
        async def registered() -> bool:
            from tether.v1 import coordinator_pb2 as cpb
            from tether.v1 import coordinator_pb2_grpc as cgrpc

            dial = ClientSecurity(ca=str(ca.path), cert=str(agent_pair.cert),
                                  key=str(agent_pair.key))
            async with dial.channel(c.address) as ch:
                reply = await cgrpc.CoordinatorServiceStub(ch).ListAgents(
                    cpb.ListAgentsRequest(), timeout=10)
                return any(x.name == "agent-1" and x.state == cpb.AGENT_STATE_UP
                           for x in reply.agents)

        wait_until(lambda: asyncio.run(registered()), 20, "agent-1 to register over mTLS")

        # An intruder with a valid certificate from the same CA, but not the coordinator's
        # identity, cannot start anything on the agent; health stays open.
        async def intrude() -> grpc.StatusCode:
            dial = ClientSecurity(ca=str(ca.path), cert=str(intruder.cert),
                                  key=str(intruder.key))
            assert await _health(a.address, dial) == health_pb2.HealthCheckResponse.SERVING
            async with dial.channel(a.address) as ch:
                try:
                    await agrpc.AgentServiceStub(ch).Spawn(apb.SpawnRequest(
                        spec=pb.GroupSpec(argv=["sleep", "300"], session_id="x")), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
            return grpc.StatusCode.OK

        assert asyncio.run(intrude()) == grpc.StatusCode.UNAUTHENTICATED

        # The coordinator's identity is accepted: spawn through the agent directly.
        async def as_coordinator() -> str:
            dial = ClientSecurity(ca=str(ca.path), cert=str(coord_pair.cert),
                                  key=str(coord_pair.key))
            async with dial.channel(a.address) as ch:
                reply = await agrpc.AgentServiceStub(ch).Spawn(apb.SpawnRequest(
                    spec=pb.GroupSpec(argv=["sleep", "300"], session_id="x")), timeout=10)
                await agrpc.AgentServiceStub(ch).Stop(
                    apb.StopRequest(group_id=reply.group.group_id), timeout=10)
                return str(reply.group.group_id)

        gid = asyncio.run(as_coordinator())
        assert marked_alive(gid) == []
    finally:
        if a is not None:
            stop_daemon(a)
        stop_daemon(c)


def test_config_file_is_checked_and_applied_with_flags_overriding(tmp_path: Path) -> None:
    from tests.plugins.processes import free_port

    port, other = free_port(), free_port()
    good = tmp_path / "tether.toml"
    good.write_text(
        "[serve]\n"
        f'listen = "127.0.0.1:{port}"\n'
        f'state_dir = "{tmp_path / "st"}"\n'
        f'agent_name = "cfg-{tmp_path.name[-6:]}"\n'
        "default_grace = 2.5\n"
        'signaller_option = { known_hosts = "/dev/null" }\n'
        "[coordinator]\n"
        "agent_ttl = 7\n")
    import subprocess
    import sys

    def tether(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tether.coordinator.cli", *args],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)

    res = tether("config", "check", str(good))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text('[serve]\nlisten = "nowhere"\ntls_cert = "/no/such.pem"\ncolour = "red"\n'
                   '[agent]\ncontainment = "jar"\n[gateway]\n')
    res = tether("config", "check", str(bad))
    assert res.returncode == 2
    for words in ("'nowhere' is not HOST:PORT", "/no/such.pem", "no option 'colour'",
                  "'jar' is not one of", "unknown table [gateway]"):
        assert words in res.stderr, res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[serve\n")
    res = tether("config", "check", str(broken))
    assert res.returncode == 2 and "not valid TOML" in res.stderr

    d = start_daemon("serve", ["--config", str(good)], tmp_path)
    try:
        assert d.address == f"127.0.0.1:{port}", "the config file's listen applies"
    finally:
        stop_daemon(d)
    d = start_daemon("serve", ["--config", str(good), "--listen", f"127.0.0.1:{other}"],
                     tmp_path)
    try:
        assert d.address == f"127.0.0.1:{other}", "a flag overrides the config file"
    finally:
        stop_daemon(d)
