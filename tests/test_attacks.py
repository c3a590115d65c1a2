"""Issue 13, items 1-6: what a holder of one credential (or none) could do before roles,
tried through the real API against real daemons. Each test failed before roles existed
and passes now; the reason is in its name."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.plugins.certs import CA
from tests.plugins.common import require
from tests.plugins.creds import (
    Tokens,
    call,
    outbound_address,
    refused_start,
    start_fake_agent,
    token_file,
)
from tests.plugins.processes import (
    Daemon,
    marked_alive,
    start_daemon,
    stop_daemon,
    wait_until,
)
from tether.rpc.security import ClientSecurity
from tether.v1 import coordinator_pb2 as cpb

C = "/tether.v1.CoordinatorService/"
DENIED = grpc.StatusCode.PERMISSION_DENIED


def coordinator(tmp: Path, *args: str, name: str = "c") -> Daemon:
    return start_daemon("coordinator", ["--listen", "127.0.0.1:0", "--state-dir",
                                        str(tmp / name), "--agent-ttl", "3", *args], tmp, name=name)


async def agents(address: str, dial: ClientSecurity) -> dict[str, cpb.Agent]:
    code, reply = await call(address, C + "ListAgents", cpb.ListAgentsRequest(), dial,
                             response_type=cpb.ListAgentsResponse)
    assert code == grpc.StatusCode.OK, reply
    return {a.name: a for a in reply.agents}


async def orphans(address: str, dial: ClientSecurity) -> cpb.CoordinatorListOrphansResponse:
    code, reply = await call(address, C + "ListOrphans", cpb.CoordinatorListOrphansRequest(),
                             dial, response_type=cpb.CoordinatorListOrphansResponse, timeout=60)
    assert code == grpc.StatusCode.OK, reply
    return reply


# ------------------------------------------------------------------ 1: stealing the coordinator's token


async def test_1_an_agent_token_cannot_register_another_name(tmp_path: Path) -> None:
    """Before: RegisterAgent(evil, <my server>) with any agent's token, then `tether
    orphans`, and the coordinator presented its own token to that server."""
    t = Tokens(tmp_path)
    admin, a1 = t.add("admin"), t.add("agent:a1")
    own = token_file(tmp_path / "own", "coordinator-own-token-0123456789abcdef")
    c = await asyncio.to_thread(coordinator, tmp_path, "--token-file", t.file(),
                                "--client-token-file", str(own))
    fake = await start_fake_agent()
    try:
        code, why = await call(c.address, C + "RegisterAgent", cpb.RegisterAgentRequest(
            name="evil", address=f"127.0.0.1:{fake.port}", epoch="e"), a1)
        assert code == DENIED, why
        assert "a1" in why and "evil" in why
        assert "evil" not in await agents(c.address, admin)
        # Its own name, but an address that is no TCP port (a gRPC target scheme).
        code, why = await call(c.address, C + "RegisterAgent", cpb.RegisterAgentRequest(
            name="a1", address="unix:/var/run/docker.sock", epoch="e"), a1)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "HOST:PORT" in why
        await orphans(c.address, admin)
        assert fake.seen == [], "the coordinator dialed a name nobody may register"
    finally:
        await fake.server.stop(None)
        await asyncio.to_thread(stop_daemon, c)


async def test_1_the_coordinator_keeps_its_token_from_an_unverified_plaintext_address(
        tmp_path: Path) -> None:
    """An agent's own token registers its own name at an address of its choosing: in
    plaintext, off loopback, nothing proves that address is the agent, so the
    coordinator dials it without its token (and says so in its log)."""
    host = outbound_address()
    require(host is not None, "needs a non-loopback IPv4 address on this host")
    t = Tokens(tmp_path)
    admin, a1 = t.add("admin"), t.add("agent:a1")
    own = token_file(tmp_path / "own", "coordinator-own-token-0123456789abcdef")
    c = await asyncio.to_thread(coordinator, tmp_path, "--token-file", t.file(),
                                "--client-token-file", str(own))
    fake = await start_fake_agent("0.0.0.0")
    try:
        code, why = await call(c.address, C + "RegisterAgent", cpb.RegisterAgentRequest(
            name="a1", address=f"{host}:{fake.port}", epoch="e"), a1)
        assert code == grpc.StatusCode.OK, why
        await orphans(c.address, admin)
        assert ("ListOrphans", "") in fake.seen, fake.seen
        assert fake.authorizations == [], "the coordinator's token went to an unverified address"
        assert "not sending this coordinator's token" in c.log()
    finally:
        await fake.server.stop(None)
        await asyncio.to_thread(stop_daemon, c)


async def test_1_under_tls_the_coordinator_dials_only_a_certificate_naming_the_agent(
        tmp_path: Path) -> None:
    """A certificate of the same CA for another name (here on loopback) is not agent a1:
    the handshake fails, no call (and no token) reaches it, and the error says why."""
    ca = CA(tmp_path / "pki")
    server, impostor = ca.issue("coordinator"), ca.issue("impostor")
    t = Tokens(tmp_path)
    admin, a1 = t.add("admin"), t.add("agent:a1")
    own = token_file(tmp_path / "own", "coordinator-own-token-0123456789abcdef")
    c = await asyncio.to_thread(
        coordinator, tmp_path, "--token-file", t.file(), "--client-token-file", str(own),
        "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", str(ca.path))
    fake = await start_fake_agent(tls=(impostor.key.read_bytes(), impostor.cert.read_bytes()))
    over_tls = [ClientSecurity(ca=str(ca.path), token_file=d.token_file) for d in (admin, a1)]
    admin, a1 = over_tls
    try:
        code, why = await call(c.address, C + "RegisterAgent", cpb.RegisterAgentRequest(
            name="a1", address=f"127.0.0.1:{fake.port}", epoch="e"), a1)
        assert code == grpc.StatusCode.OK, why
        reply = await orphans(c.address, admin)
        assert fake.seen == [], "a server whose certificate does not name a1 was called"
        assert "names 'a1'" in reply.unreachable["a1"], reply.unreachable
    finally:
        await fake.server.stop(None)
        await asyncio.to_thread(stop_daemon, c)


# ------------------------------------------------------------------ 2: hijacking a name


@pytest.mark.parametrize("auth", ["token", "open"])
async def test_2_nobody_takes_the_name_of_serves_own_agent(tmp_path: Path, auth: str) -> None:
    """Before: RegisterAgent(<serve's agent>, 127.0.0.1:1) cut the built-in agent off for
    good (`tether stop` exited 4, retried forever, the processes kept running)."""
    t = Tokens(tmp_path)
    admin = t.add("admin")
    name = f"local-{tmp_path.name[-8:]}"
    args = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"), "--agent-name", name]
    if auth == "token":
        args += ["--token-file", t.file()]
    else:
        admin = ClientSecurity()
    d = await asyncio.to_thread(start_daemon, "serve", args, tmp_path)
    try:
        code, why = await call(d.address, C + "RegisterAgent", cpb.RegisterAgentRequest(
            name=name, address="127.0.0.1:1", epoch="forged"), admin)
        assert code == DENIED, why
        assert (await agents(d.address, admin))[name].address == d.address
        cli = ["--token-file", admin.token_file] if admin.token_file else []
        spawned = await asyncio.to_thread(d.cli, "spawn", "--session", "s", *cli, "--",
                                          "sleep", "300")
        assert spawned.returncode == 0, spawned.stderr
        gid = spawned.stdout.strip()
        assert marked_alive(gid)
        stopped = await asyncio.to_thread(d.cli, "stop", "s", *cli)
        assert stopped.returncode == 0, stopped.stderr
        assert marked_alive(gid) == []
    finally:
        await asyncio.to_thread(stop_daemon, d)


async def test_2_a_live_agents_name_and_heartbeat_belong_to_its_credential(
        tmp_path: Path) -> None:
    """Before: any allowed credential re-registered a live agent's name at another
    address (redirecting spawns and their environments), and a heartbeat carrying the
    epoch `tether agents` shows kept a dead agent "up"."""
    t = Tokens(tmp_path)
    admin, a1, a1_again = t.add("admin"), t.add("agent:a1"), t.add("agent:a1")
    coord_own = Tokens(tmp_path, "agent-tokens")
    coord_dial = coord_own.add("coordinator")
    c = await asyncio.to_thread(coordinator, tmp_path, "--token-file", t.file(),
                                "--client-token-file", coord_dial.token_file)
    a = await asyncio.to_thread(
        start_daemon, "agent", ["--listen", "127.0.0.1:0", "--coordinator", c.address,
                                "--name", "a1", "--state-dir", str(tmp_path / "a"),
                                "--token-file", coord_own.file(),
                                "--client-token-file", a1.token_file], tmp_path, "a")
    try:
        await asyncio.to_thread(wait_until, lambda: asyncio.run(agents(c.address, admin))
                                .get("a1", cpb.Agent()).state == cpb.AGENT_STATE_UP, 20,
                                "agent a1 to register")
        real = (await agents(c.address, admin))["a1"]
        for who in (admin, a1_again):
            code, why = await call(c.address, C + "RegisterAgent", cpb.RegisterAgentRequest(
                name="a1", address="127.0.0.1:1", epoch="forged"), who)
            assert code == DENIED, why
            assert "belongs to another credential" in why
            code, why = await call(c.address, C + "Heartbeat", cpb.HeartbeatRequest(
                name="a1", epoch=real.epoch), who)
            assert code == DENIED, why
        assert (await agents(c.address, admin))["a1"].address == real.address
        # Its own credential takes the name over while it is up: a restarted agent.
        code, why = await call(c.address, C + "RegisterAgent", cpb.RegisterAgentRequest(
            name="a1", address=real.address, epoch="restarted"), a1)
        assert code == grpc.StatusCode.OK, why
        assert (await agents(c.address, admin))["a1"].epoch == "restarted"

        # The real agent still works: a spawn reaches it, a stop ends it.
        cli = ["--token-file", admin.token_file]
        spawned = await asyncio.to_thread(c.cli, "spawn", "--session", "s", "--agent", "a1",
                                          *cli, "--", "sleep", "300")
        assert spawned.returncode == 0, spawned.stderr
        assert (await asyncio.to_thread(c.cli, "stop", "s", *cli)).returncode == 0
        assert marked_alive(spawned.stdout.strip()) == []

        # Dead, it stays dead: forged heartbeats are refused, the TTL runs out.
        a.proc.kill()
        a.proc.wait()
        code, _ = await call(c.address, C + "Heartbeat", cpb.HeartbeatRequest(
            name="a1", epoch=real.epoch), admin)
        assert code == DENIED
        await asyncio.to_thread(wait_until, lambda: asyncio.run(agents(c.address, admin))
                                ["a1"].state == cpb.AGENT_STATE_UNREACHABLE, 20,
                                "dead agent a1 to be unreachable")
    finally:
        await asyncio.to_thread(stop_daemon, a)
        await asyncio.to_thread(stop_daemon, c)


async def test_2_an_agent_credential_cannot_put_groups_into_other_sessions(
        tmp_path: Path) -> None:
    """Before (review2): an agent:a1 credential's Watch reporting a running group in any
    session made it part of that session; the session's stop then waited on a1 forever."""
    import signal as signals
    import time

    from tether.core.model import Containment, GroupSpec, GroupState, GroupView, StopPolicy
    from tether.rpc.convert import group_to_pb, ts
    from tether.v1 import common_pb2

    t = Tokens(tmp_path)
    op, a1 = t.add("operator"), t.add("agent:a1")
    d = await asyncio.to_thread(start_daemon, "serve", [
        "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"), "--agent-name",
        f"inj-{os.getpid()}", "--token-file", t.file()], tmp_path)
    fake_id = "g-f4ke0000beef"
    injected = GroupView(group_id=fake_id, spec=GroupSpec(argv=("sleep", "1"),
                                                          session_id="victim"),
                         state=GroupState.RUNNING, containment=Containment.CGROUP,
                         stop=StopPolicy(signals.SIGTERM, 5.0), leader_pid=1,
                         started_at=time.time())
    event = common_pb2.GroupEvent(seq=1, kind="initial", group=group_to_pb(injected),
                                  at=ts(time.time()), epoch="e1")
    fake = await start_fake_agent(watch=(event.SerializeToString(),))
    try:
        cli = ["--token-file", op.token_file]
        spawned = await asyncio.to_thread(d.cli, "spawn", "--session", "victim", *cli, "--",
                                          "sleep", "300")
        assert spawned.returncode == 0, spawned.stderr
        code, why = await call(d.address, C + "RegisterAgent", cpb.RegisterAgentRequest(
            name="a1", address=f"127.0.0.1:{fake.port}", epoch="e1", instance="fake-1"), a1)
        assert code == grpc.StatusCode.OK, why
        await asyncio.to_thread(wait_until, lambda: f"reported group {fake_id}" in d.log(), 30,
                                "the coordinator to read a1's report")
        shown = await asyncio.to_thread(d.cli, "show", "victim", "-o", "json", *cli)
        assert fake_id not in shown.stdout and spawned.stdout.strip() in shown.stdout
        stopped = await asyncio.to_thread(d.cli, "stop", "victim", "--timeout", "30", *cli)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    finally:
        await fake.server.stop(0)
        await asyncio.to_thread(stop_daemon, d)


# ------------------------------------------------------------------ 3: streams


def test_3_tether_watch_sends_its_token(tmp_path: Path) -> None:
    """Before: with --token-file, `tether watch` was refused (no token on streams)."""
    t = Tokens(tmp_path)
    admin, reader = t.add("admin"), t.add("reader")
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"w-{tmp_path.name[-8:]}",
                               "--token-file", t.file()], tmp_path)
    try:
        spawned = d.cli("spawn", "--session", "s", "--token-file", admin.token_file, "--",
                        "sleep", "300")
        assert spawned.returncode == 0, spawned.stderr
        gid = spawned.stdout.strip()
        watch = subprocess.Popen(
            [sys.executable, "-m", "tether.coordinator.cli", "watch", "s", "--coordinator",
             d.address, "--token-file", reader.token_file],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        assert watch.stdout is not None
        first = watch.stdout.readline()
        watch.terminate()
        _, err = watch.communicate(timeout=30)
        assert gid in first, err
        assert d.cli("stop", "s", "--token-file", admin.token_file).returncode == 0
    finally:
        stop_daemon(d)


def test_3_natural_exits_reach_the_coordinator_through_an_authenticated_watch(
        tmp_path: Path) -> None:
    """Before: the coordinator's Watch of a token-protected agent failed silently, so a
    group that ended on its own stayed `running` at the coordinator."""
    t = Tokens(tmp_path)
    admin, a1 = t.add("admin"), t.add("agent:a1")
    agent_tokens = Tokens(tmp_path, "agent-tokens")
    coord_dial = agent_tokens.add("coordinator")
    c = coordinator(tmp_path, "--token-file", t.file(), "--client-token-file",
                    coord_dial.token_file)
    a = start_daemon("agent", ["--listen", "127.0.0.1:0", "--coordinator", c.address,
                               "--name", "a1", "--state-dir", str(tmp_path / "a"),
                               "--token-file", agent_tokens.file(),
                               "--client-token-file", a1.token_file], tmp_path, "a")
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    cli = ["--token-file", admin.token_file]
    try:
        wait_until(lambda: c.cli("agents", *cli).stdout.count(" up") == 1, 20, "a1 up")
        spawned = c.cli("spawn", "--session", "s", "--agent", "a1", *cli, "--", "sh", "-c",
                        f"read x < {gate}; exit 7")
        assert spawned.returncode == 0, spawned.stderr
        with open(gate, "w") as g:  # the group reads it, then exits on its own
            g.write("go\n")

        def exited() -> bool:
            (g,) = c.json("show", "s", *cli)["groups"]
            return bool(g["state"] == "exited" and g["exit_code"] == 7)

        wait_until(exited, 30, "the natural exit to reach the coordinator")
    finally:
        stop_daemon(a)
        stop_daemon(c)


# ------------------------------------------------------------------ 4, 5: who may listen how


def test_4_a_client_ca_without_identities_admits_nobody_by_default(tmp_path: Path) -> None:
    """Before: --tls-client-ca alone let any certificate of that CA do everything."""
    ca = CA(tmp_path / "pki")
    server = ca.issue("coordinator")
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key),
           "--tls-client-ca", str(ca.path)]
    err = refused_start("coordinator", ["--listen", "127.0.0.1:0", "--state-dir",
                                        str(tmp_path / "c"), *tls], tmp_path)
    assert "--allow-identity" in err and "--tls-client-ca" in err

    # With tokens as the way in, a certificate of the CA alone is not enough.
    t = Tokens(tmp_path)
    admin = t.add("admin")
    c = coordinator(tmp_path, *tls, "--token-file", t.file())
    try:
        anyone = ca.issue("anyone", server=False)
        cert_only = ClientSecurity(ca=str(ca.path), cert=str(anyone.cert), key=str(anyone.key))
        code, why = asyncio.run(call(c.address, C + "ListSessions",
                                     cpb.ListSessionsRequest(), cert_only))
        assert code == grpc.StatusCode.UNAUTHENTICATED, why
        with_token = ClientSecurity(ca=str(ca.path), cert=str(anyone.cert),
                                    key=str(anyone.key), token_file=admin.token_file)
        code, why = asyncio.run(call(c.address, C + "ListSessions",
                                     cpb.ListSessionsRequest(), with_token))
        assert code == grpc.StatusCode.OK, why
    finally:
        stop_daemon(c)


def test_5_a_non_loopback_listener_needs_authentication_not_only_tls(tmp_path: Path) -> None:
    """Before: --listen 0.0.0.0 with --tls-cert/--tls-key and no tokens or identities was
    accepted silently: an unauthenticated endpoint that runs any command."""
    ca = CA(tmp_path / "pki")
    server = ca.issue("coordinator")
    tls = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
    err = refused_start("coordinator", ["--listen", "0.0.0.0:0", "--state-dir",
                                        str(tmp_path / "c"), *tls], tmp_path)
    assert "0.0.0.0:0" in err and "authentication" in err and "--insecure" in err
    err = refused_start("serve", ["--listen", "0.0.0.0:0", "--state-dir",
                                  str(tmp_path / "s"), *tls], tmp_path)
    assert "authentication" in err

    d = start_daemon("coordinator", ["--listen", "0.0.0.0:0", "--state-dir",
                                     str(tmp_path / "c2"), *tls, "--insecure"], tmp_path)
    try:
        assert "WITHOUT AUTHENTICATION" in d.log()
    finally:
        stop_daemon(d)
    t = Tokens(tmp_path)
    t.add("admin")
    d = start_daemon("coordinator", ["--listen", "0.0.0.0:0", "--state-dir",
                                     str(tmp_path / "c3"), *tls, "--token-file", t.file()],
                     tmp_path, name="c3")
    stop_daemon(d)


def test_a_second_daemon_on_a_coordinators_state_directory_is_refused(tmp_path: Path) -> None:
    """Two coordinators on one state directory would share its database and its stop
    intents, each acting on the other's."""
    c = coordinator(tmp_path)
    try:
        for kind in ("coordinator", "serve"):
            err = refused_start(kind, ["--listen", "127.0.0.1:0", "--state-dir",
                                       str(tmp_path / "c")], tmp_path)
            assert f"another coordinator (pid {c.proc.pid})" in err and "--state-dir" in err
    finally:
        stop_daemon(c)


# ------------------------------------------------------------------ 6: private state


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def test_6_state_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """Spawn environments (API_KEY=...) live in the state: directories 0700, files 0600,
    created so under umask 0 (serve, and a standalone agent)."""
    t = Tokens(tmp_path)
    admin = t.add("admin")
    root = tmp_path / "deep" / "state"
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(root),
                               "--agent-name", f"p-{tmp_path.name[-8:]}",
                               "--token-file", t.file()], tmp_path, umask=0)
    a = start_daemon("agent", ["--listen", "127.0.0.1:0", "--name", "solo",
                               "--state-dir", str(tmp_path / "agent-state")], tmp_path,
                     name="a", umask=0)
    try:
        cli = ["--token-file", admin.token_file]
        res = d.cli("spawn", "--session", "s", "--env", "API_KEY=hunter2", *cli, "--",
                    "sleep", "300")
        assert res.returncode == 0, res.stderr
        for state in (root, tmp_path / "deep", tmp_path / "agent-state"):
            modes = _modes(state)
            names = set(modes)
            if state == root:
                assert {"coordinator.sqlite3", "coordinator.sqlite3-wal", "audit.jsonl",
                        "agent"} <= names, names
            wrong = {p: oct(m) for p, m in modes.items()
                     if m != (0o700 if (state / p).is_dir() else 0o600)}
            assert wrong == {}, f"not private under {state}: {wrong}"
        assert d.cli("stop", "s", *cli).returncode == 0
    finally:
        stop_daemon(a)
        stop_daemon(d)
