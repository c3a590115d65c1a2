"""The role table, exhaustively: every method of both services x every kind of caller,
through a real `tether serve` (both services on one listener), with tokens and with
client certificates; every handler kind (the bidirectional ones are coming) through a
real server; and what a hostile caller can put in a credential."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf.message_factory import GetMessageClass

from tests.plugins.certs import CA
from tests.plugins.creds import REFUSED, Tokens, new_token, refused_start, token_file
from tests.plugins.processes import Daemon, start_daemon, stop_daemon
from tether.core.audit import AuditLog
from tether.rpc.auth import (
    ADMITTED_HEADER,
    RULES,
    Role,
    RoleKind,
    ServerAuth,
    current_caller,
    load_tokens,
    parse_identities,
)
from tether.rpc.daemon import start_server
from tether.rpc.security import ClientSecurity, SecurityConfigError
from tether.v1 import agent_pb2 as apb
from tether.v1 import coordinator_pb2 as cpb

SERVICES = {"AgentService": apb, "CoordinatorService": cpb}

#: Who may call what, written out here independently of tether.rpc.auth.RULES: the
#: roles each method lets through besides admin. The README's table says the same.
LET_THROUGH: dict[str, set[str]] = {
    "CoordinatorService/RegisterAgent": {"agent:a1"},
    "CoordinatorService/Heartbeat": {"agent:a1"},
    "CoordinatorService/ListAgents": {"operator", "reader"},
    "CoordinatorService/CreateSession": {"operator"},
    "CoordinatorService/GetSession": {"operator", "reader"},
    "CoordinatorService/ListSessions": {"operator", "reader"},
    "CoordinatorService/KeepAlive": {"operator"},
    "CoordinatorService/Spawn": {"operator"},
    "CoordinatorService/Adopt": {"operator"},
    "CoordinatorService/SignalSession": {"operator"},
    "CoordinatorService/StopSession": {"operator"},
    "CoordinatorService/WatchSession": {"operator", "reader"},
    "CoordinatorService/ListOrphans": {"operator"},
    "CoordinatorService/ReadAudit": set(),
    "CoordinatorService/ListPorts": {"operator"},
    "CoordinatorService/ForgetAgent": set(),
    "CoordinatorService/GetLeader": {"operator", "reader"},
    "CoordinatorService/RestartGroups": {"operator"},
    "CoordinatorService/ForgetGroups": {"operator"},
    "CoordinatorService/Wait": {"operator", "reader"},
    "CoordinatorService/OpenLease": {"operator"},
    "CoordinatorService/Logs": {"operator", "reader"},
    "CoordinatorService/Attach": {"operator"},
    "AgentService/Spawn": {"coordinator"},
    "AgentService/Adopt": {"coordinator"},
    "AgentService/Signal": {"coordinator"},
    "AgentService/Stop": {"coordinator"},
    "AgentService/StopGroups": {"coordinator"},
    "AgentService/Get": {"coordinator", "operator", "reader"},
    "AgentService/List": {"coordinator", "operator", "reader"},
    "AgentService/Watch": {"coordinator", "operator", "reader"},
    "AgentService/ListOrphans": {"coordinator"},
    "AgentService/Info": {"coordinator", "operator", "reader"},
    "AgentService/ListPorts": {"coordinator", "operator"},
    "AgentService/Restart": {"coordinator"},
    "AgentService/Forget": {"coordinator"},
    "AgentService/Logs": {"coordinator", "operator", "reader"},
    "AgentService/Attach": {"coordinator"},
}
#: Callers that hold a role: (name in the matrix, role).
ROLE_CALLERS = [("admin", "admin"), ("operator", "operator"), ("reader", "reader"),
                ("agent:a1", "agent:a1"), ("agent:a2 (wrong name)", "agent:a2"),
                ("coordinator", "coordinator")]
WATCHED = "watched"


def all_methods() -> Iterator[tuple[str, Any]]:
    for service, module in SERVICES.items():
        for m in module.DESCRIPTOR.services_by_name[service].methods:
            yield f"{service}/{m.name}", m


def test_every_rpc_of_both_services_has_a_rule_and_the_table_says_what_the_issue_asks() -> None:
    methods = {name for name, _ in all_methods()}
    assert {m.removeprefix("/tether.v1.") for m in RULES} == methods, \
        "a new RPC needs an entry in tether.rpc.auth.RULES (and in LET_THROUGH here)"
    assert set(LET_THROUGH) == methods
    for method, rule in RULES.items():
        assert RoleKind.ADMIN in rule.roles, method
        assert (RoleKind.AGENT in rule.roles) == (rule.agent_name is not None), method
        name = method.removeprefix("/tether.v1.")
        expected = {r.split(":")[0] for r in LET_THROUGH[name]} | {"admin"}
        assert {k.value for k in rule.roles} == expected, method


def request_for(name: str, method: Any) -> Any:
    """A request that changes nothing whoever sends it: the call is let through or not,
    then fails on its content (or answers harmlessly)."""
    short = name.partition("/")[2]
    cls = GetMessageClass(method.input_type)
    if short in ("RegisterAgent", "Heartbeat"):
        # As agent a1; no address, so even a let-through registration changes nothing.
        return cls(name="a1", epoch="e")
    if short == "Watch":
        return cls(session_id=WATCHED, initial=True)
    if short == "WatchSession":
        return cls(session_id=WATCHED, initial=True)
    return cls()


async def first_reply(channel: grpc.aio.Channel, name: str, method: Any) -> grpc.StatusCode:
    path = f"/tether.v1.{name}"
    request = request_for(name, method)
    deserialize = GetMessageClass(method.output_type).FromString
    try:
        if method.client_streaming:
            # A request stream (OpenLease, Attach): written once admitted (grpc/grpc#36066);
            # an empty opening message names no session or group, so a let-through call is
            # refused for its content and changes nothing.
            both = channel.stream_stream(path, request_serializer=type(request).SerializeToString,
                                         response_deserializer=deserialize)(timeout=20)
            try:
                headers = await both.initial_metadata()
                if any(key == ADMITTED_HEADER for key, _ in headers or ()):
                    try:
                        await both.write(request)
                    except asyncio.InvalidStateError:
                        return await both.code()  # ended before anything was written
                await both.read()
            finally:
                both.cancel()
        elif method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=type(request).SerializeToString,
                                          response_deserializer=deserialize)(request, timeout=20)
            try:
                async for _ in stream:
                    break
            finally:
                stream.cancel()
        else:
            await channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                      response_deserializer=deserialize)(request, timeout=20)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def expected(caller: str, role: str | None, name: str) -> str:
    if role is None:
        return "UNAUTHENTICATED"
    if role == "admin" or role in LET_THROUGH[name]:
        return "let through"
    return "PERMISSION_DENIED"


async def matrix(address: str, callers: dict[str, tuple[str | None, ClientSecurity]]
                 ) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    got, want = {}, {}
    for caller, (role, dial) in callers.items():
        async with dial.channel(address) as channel:
            for name, method in all_methods():
                code = await first_reply(channel, name, method)
                got[(caller, name)] = code.name if code in REFUSED else "let through"
                want[(caller, name)] = expected(caller, role, name)
    return got, want


def prepare(d: Daemon, admin: list[str]) -> None:
    """A session with a live group, so watches answer at once with a snapshot."""
    res = d.cli("spawn", "--session", WATCHED, *admin, "--", "sleep", "300")
    assert res.returncode == 0, res.stderr


@dataclass
class Served:
    daemon: Daemon
    callers: dict[str, tuple[str | None, ClientSecurity]]
    admin_cli: list[str]


@pytest.fixture
def with_tokens(tmp_path: Path) -> Iterator[Served]:
    t = Tokens(tmp_path)
    callers: dict[str, tuple[str | None, ClientSecurity]] = {
        caller: (role, t.add(role)) for caller, role in ROLE_CALLERS}
    callers["token alone (admin)"] = ("admin", t.add(None))
    unknown = token_file(tmp_path / "unknown", new_token("unknown"))
    callers["unknown token"] = (None, ClientSecurity(token_file=str(unknown)))
    callers["no credential"] = (None, ClientSecurity())
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"m-{tmp_path.name[-8:]}",
                               "--token-file", t.file()], tmp_path)
    admin = ["--token-file", callers["admin"][1].token_file]
    try:
        prepare(d, admin)
        yield Served(d, callers, admin)
    finally:
        d.cli("stop", WATCHED, *admin)
        stop_daemon(d)


def several_cns(ca: CA, *names: str) -> Any:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names]
                        or [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no common name")])
    return ca.issue("", server=False, subject=subject, file="-".join(names) or "no-cn")


@pytest.fixture
def with_certificates(tmp_path: Path) -> Iterator[Served]:
    ca = CA(tmp_path / "pki")
    server = ca.issue("serve")
    callers: dict[str, tuple[str | None, ClientSecurity]] = {}
    allow = []
    for caller, role in ROLE_CALLERS:
        cn = "cn-" + role.replace(":", "-")
        pair = ca.issue(cn, server=False)
        allow += ["--allow-identity", f"{cn}={role}"]
        callers[caller] = (role, ClientSecurity(ca=str(ca.path), cert=str(pair.cert),
                                                key=str(pair.key)))
    legacy = ca.issue("cn-legacy", server=False)
    allow += ["--allow-identity", "cn-legacy"]
    callers["CN alone (admin)"] = ("admin", ClientSecurity(ca=str(ca.path), cert=str(legacy.cert),
                                                           key=str(legacy.key)))
    for caller, pair in (("unlisted certificate of the CA", ca.issue("cn-nobody", server=False)),
                         ("two CNs, the first an admin's", several_cns(ca, "cn-admin", "x")),
                         ("no CN", several_cns(ca))):
        callers[caller] = (None, ClientSecurity(ca=str(ca.path), cert=str(pair.cert),
                                                key=str(pair.key)))
    d = start_daemon("serve", ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"),
                               "--agent-name", f"m-{tmp_path.name[-8:]}",
                               "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                               "--tls-client-ca", str(ca.path), *allow], tmp_path)
    admin_dial = callers["admin"][1]
    admin = ["--tls-ca", str(ca.path), "--tls-cert", admin_dial.cert, "--tls-key", admin_dial.key]
    try:
        prepare(d, admin)
        yield Served(d, callers, admin)
    finally:
        d.cli("stop", WATCHED, *admin)
        stop_daemon(d)


@pytest.mark.parametrize("kind", ["with_tokens", "with_certificates"])
def test_every_method_times_every_caller(kind: str, request: pytest.FixtureRequest) -> None:
    served: Served = request.getfixturevalue(kind)
    got, want = asyncio.run(matrix(served.daemon.address, served.callers))
    wrong = {k: f"got {got[k]}, want {want[k]}" for k in want if got[k] != want[k]}
    assert wrong == {}, "\n".join(f"{c} -> {m}: {v}" for (c, m), v in sorted(wrong.items()))
    assert len(got) == len(served.callers) * len(LET_THROUGH)
    log = served.daemon.log()
    if kind == "with_tokens":
        assert re.search(r"token file \S+/tokens: 1 token\(s\) without a role", log), log
    else:
        assert "--allow-identity 'cn-legacy' has no role" in log


# ------------------------------------------------------------------ every handler kind

KINDS = "/tether.test.Kinds/"


class Kinds(grpc.GenericRpcHandler):  # type: ignore[misc]
    """One method of each kind, answering with the role of the caller the interceptor
    admitted (read through current_caller, per call)."""

    def __init__(self) -> None:
        self.both_inside = asyncio.Event()
        self.inside = 0
        self.closed = asyncio.Event()

    def service(self, details: Any) -> Any:
        name = details.method.removeprefix(KINDS)

        def role() -> bytes:
            return str(current_caller().role).encode()

        async def unary_unary(request: bytes, context: Any) -> bytes:
            return role()

        async def whoami(request: bytes, context: Any) -> bytes:
            # Two callers inside at once (this waits for the other): each sees its own.
            self.inside += 1
            if self.inside == 2:
                self.both_inside.set()
            await self.both_inside.wait()
            return current_caller().credential.encode()

        async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            yield role()
            yield role()

        async def forever(request: bytes, context: Any) -> AsyncIterator[bytes]:
            try:
                yield role()
                await asyncio.Event().wait()  # until the client goes away
            finally:
                self.closed.set()

        async def stream_unary(requests: Any, context: Any) -> bytes:
            return role() + b":" + b"".join([r async for r in requests])

        async def stream_stream(requests: Any, context: Any) -> AsyncIterator[bytes]:
            async for r in requests:
                yield role() + b":" + r

        def strict(raw: bytes) -> bytes:  # a request type that refuses some bytes
            if raw == b"bad":
                raise ValueError("not a request")
            return raw

        handlers = {"UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
                    "Decoded": grpc.stream_stream_rpc_method_handler(
                        stream_stream, request_deserializer=strict),
                    "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
                    "Forever": grpc.unary_stream_rpc_method_handler(forever),
                    "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
                    "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
                    "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream)}
        return handlers.get(name)


async def writing(call: Any, many: bool) -> Any:
    """A request stream written the way a careful client does: once admitted (the
    response headers came), never into a refused call (grpc/grpc#36066)."""
    headers = await call.initial_metadata()
    if any(key == ADMITTED_HEADER for key, _ in headers or ()):
        for item in (b"a", b"b"):
            await call.write(item)
        await call.done_writing()
    return await (_collect(call) if many else call)


async def each_kind(channel: grpc.aio.Channel) -> dict[str, str]:
    """What each kind of call answered (the role) or the status code it got."""
    out = {}
    calls = {
        "UnaryUnary": lambda: channel.unary_unary(KINDS + "UnaryUnary")(b"x", timeout=10),
        "UnaryStream": lambda: _collect(channel.unary_stream(KINDS + "UnaryStream")(b"x",
                                                                                     timeout=10)),
        "StreamUnary": lambda: writing(channel.stream_unary(KINDS + "StreamUnary")(timeout=10),
                                       False),
        "StreamStream": lambda: writing(channel.stream_stream(KINDS + "StreamStream")(
            timeout=10), True),
    }
    for kind, make in calls.items():
        try:
            reply = await make()
            out[kind] = reply.decode() if isinstance(reply, bytes) else "|".join(
                r.decode() for r in reply)
        except grpc.aio.AioRpcError as exc:
            out[kind] = exc.code().name
    return out


async def _collect(stream: Any) -> list[bytes]:
    return [item async for item in stream]


@pytest.fixture
async def kinds_server(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, ClientSecurity],
                                                              AuditLog, Kinds, CA]]:
    ca = CA(tmp_path / "pki")
    server = ca.issue("localhost")
    t = Tokens(tmp_path)
    dials = {role: t.add(role) for role in ("admin", "reader")}
    admin_cert, reader_cert = ca.issue("c-admin", server=False), ca.issue("c-reader",
                                                                          server=False)
    for name, pair in (("admin-cert", admin_cert), ("reader-cert", reader_cert)):
        dials[name] = ClientSecurity(ca=str(ca.path), cert=str(pair.cert), key=str(pair.key))
    # A token decides over the certificate it comes with.
    dials["admin"] = ClientSecurity(ca=str(ca.path), cert=str(reader_cert.cert),
                                    key=str(reader_cert.key), token_file=dials["admin"].token_file)
    dials["reader"] = ClientSecurity(ca=str(ca.path), cert=str(admin_cert.cert),
                                     key=str(admin_cert.key), token_file=dials["reader"].token_file)
    from tether.rpc.daemon import TLSFiles

    auth = ServerAuth(load_tokens(t.file()), ["c-admin=admin", "c-reader=reader"])
    audit = AuditLog(tmp_path / "audit.jsonl")
    kinds = Kinds()
    srv, port, _ = await start_server(
        "127.0.0.1:0", [lambda s: s.add_generic_rpc_handlers([kinds])], [],
        TLSFiles(str(server.cert), str(server.key), str(ca.path)), auth=auth, audit=audit)
    try:
        yield f"localhost:{port}", dials, audit, kinds, ca
    finally:
        await srv.stop(None)
        await audit.aclose()


async def test_every_handler_kind_is_checked_and_every_kind_carries_the_token(
        kinds_server: tuple[str, dict[str, ClientSecurity], AuditLog, Kinds, CA]) -> None:
    """A method missing from the table is admin-only, for unary and streaming calls in
    both directions; a token decides over a certificate; each call sees its own caller."""
    address, dials, audit, _, _ = kinds_server
    results = {}
    for name, dial in dials.items():
        async with dial.channel(address) as channel:
            results[name] = await each_kind(channel)
    admin_answers = {"UnaryUnary": "admin", "UnaryStream": "admin|admin",
                     "StreamUnary": "admin:ab", "StreamStream": "admin:a|admin:b"}
    assert results["admin"] == admin_answers, \
        "a token is sent on every kind of call, and decides over a reader's certificate"
    assert results["admin-cert"] == admin_answers
    denied = dict.fromkeys(admin_answers, "PERMISSION_DENIED")
    assert results["reader"] == denied, "a reader's token, though with an admin's certificate"
    assert results["reader-cert"] == denied

    # Two calls inside the servicer at once: each reads its own caller.
    async with dials["admin"].channel(address) as a, dials["admin-cert"].channel(address) as c:
        got = await asyncio.gather(a.unary_unary(KINDS + "Whoami")(b"", timeout=10),
                                   c.unary_unary(KINDS + "Whoami")(b"", timeout=10))
    assert got[0].startswith(b"token:") and got[1] == b"cn:c-admin", got

    entries = await audit.read()
    methods = {(e["method"], e["role"], e["result"]) for e in entries}
    assert ("tether.test.Kinds/StreamStream", "admin", "OK") in methods
    assert ("tether.test.Kinds/StreamStream", "reader", "PERMISSION_DENIED") in methods


async def test_a_client_gone_mid_stream_is_audited_and_the_server_goes_on(
        kinds_server: tuple[str, dict[str, ClientSecurity], AuditLog, Kinds, CA]) -> None:
    address, dials, audit, kinds, _ = kinds_server
    gate = asyncio.Event()

    async def requests() -> AsyncIterator[bytes]:
        yield b"first"
        await gate.wait()  # never set: the client goes away with the stream open
        yield b"never"

    async with dials["admin"].channel(address) as channel:
        both = channel.stream_stream(KINDS + "StreamStream")(requests(), timeout=10)
        assert await both.read() == b"admin:first"
        both.cancel()
        watching = channel.unary_stream(KINDS + "Forever")(b"", timeout=10)
        assert await watching.read() == b"admin"
        watching.cancel()
        await kinds.closed.wait()  # the servicer's finally ran, at once
        assert (await each_kind(channel))["UnaryUnary"] == "admin", "the server goes on"

    async def ended() -> list[str]:
        return [e["result"] for e in await audit.read()
                if e["method"].endswith(("/Forever", "/StreamStream"))]

    # The server learns of the end on its own time: re-check, bounded.
    for _ in range(500):
        if len(await ended()) == 3:  # the stream above, Forever, and each_kind's own
            break
        await asyncio.sleep(0.02)
    entries = [e for e in await audit.read() if e["method"].endswith("/Forever")]
    assert [e["result"] for e in entries] == ["CANCELLED"]
    # A client that half-closes and one that goes away look alike to a request stream's
    # reader (its requests just end): that call is recorded once, however it ended.
    assert len(await ended()) == 3


async def test_a_malformed_message_in_a_request_stream_is_invalid_argument(
        kinds_server: tuple[str, dict[str, ClientSecurity], AuditLog, Kinds, CA]) -> None:
    """The malformed-request check covers each message of a request stream, after the
    caller was admitted."""
    address, dials, _, _, _ = kinds_server
    async with dials["admin"].channel(address) as channel:
        call = channel.stream_stream(KINDS + "Decoded")(timeout=10)
        headers = await call.initial_metadata()
        assert dict(headers)[ADMITTED_HEADER] == "admin"
        await call.write(b"ok")
        assert await call.read() == b"admin:ok"
        await call.write(b"bad")
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in await call.details()
    async with dials["reader-cert"].channel(address) as channel:
        call = channel.stream_stream(KINDS + "Decoded")(timeout=10)
        await call.initial_metadata()
        assert await call.code() == grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------------------------------ hostile credentials


async def _raw(address: str, ca: CA, metadata: list[tuple[str, str]]) -> grpc.StatusCode:
    # A client certificate is required by this server; an unlisted one identifies nobody.
    nobody = ca.issue("nobody", server=False)
    creds = grpc.ssl_channel_credentials(ca.path.read_bytes(), nobody.key.read_bytes(),
                                         nobody.cert.read_bytes())
    async with grpc.aio.secure_channel(address, creds) as channel:
        try:
            await channel.unary_unary(KINDS + "UnaryUnary")(b"x", metadata=metadata,
                                                            timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_malformed_bearer_headers_are_refused(
        kinds_server: tuple[str, dict[str, ClientSecurity], AuditLog, Kinds, CA]) -> None:
    address, dials, _, _, ca = kinds_server
    good = load_token_of(dials["admin"])
    assert await _raw(address, ca, [("authorization", f"Bearer {good}")]) == grpc.StatusCode.OK
    for bad in ([("authorization", f"Bearer {good} ")],
                [("authorization", f"Bearer  {good}")],
                [("authorization", f"Basic {good}")],
                [("authorization", f"Bearer {good}"), ("authorization", f"Bearer {good}")],
                [("authorization", "Bearer " + "x" * 5000)],
                [("authorization", "Bearer")]):
        code = await _raw(address, ca, bad)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (bad[0][1][:40], code)


def load_token_of(dial: ClientSecurity) -> str:
    from tether.rpc.security import load_token

    return load_token(dial.token_file)


def test_token_files_are_parsed_strictly(tmp_path: Path) -> None:
    def parse(text: str) -> Any:
        return load_tokens(str(token_file(tmp_path / "t", text)))

    a, b = "a" * 32, "b" * 32
    entries = parse(f"# comment\n\n{a} operator\n{b}\n  {a}   operator  \n")
    assert sorted(str(e.role) for e in entries.values()) == ["admin", "operator"]
    assert all(e.id.startswith("token:") and a not in e.id for e in entries.values())
    for text, words in ((f"{a} root\n", "is not a role"),
                        (f"{a} agent:\n", "agent name is empty"),
                        (f"{a} reader extra\n", "expected `TOKEN ROLE`"),
                        (f"{a} reader\n{a} admin\n", "another role"),
                        ("# only a comment\n", "holds no token"),
                        (f"{a}\x00b reader\n", "visible ASCII"),
                        ("é" * 20 + " reader\n", "visible ASCII"),
                        ("x" * 5000 + " reader\n", "longer than")):
        with pytest.raises(SecurityConfigError, match=words):
            parse(text)
    (tmp_path / "t").write_bytes(b"\xff\xfe reader\n")
    with pytest.raises(SecurityConfigError, match="not UTF-8"):
        load_tokens(str(tmp_path / "t"))
    (tmp_path / "t").write_text(f"{a} reader\n" * 40000)
    with pytest.raises(SecurityConfigError, match="larger than"):
        load_tokens(str(tmp_path / "t"))
    assert parse_identities(["x=agent:x", "y"]) == {"x": Role(RoleKind.AGENT, "x"),
                                                    "y": Role(RoleKind.ADMIN)}
    with pytest.raises(SecurityConfigError, match="listed twice"):
        parse_identities(["x=reader", "x=admin"])
    with pytest.raises(SecurityConfigError, match="give CN=ROLE"):
        parse_identities(["=reader"])


def test_a_daemon_refuses_a_token_file_that_is_a_fifo_or_readable_by_others(
        tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    base = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "c")]
    err = refused_start("coordinator", [*base, "--token-file", str(fifo)], tmp_path)
    assert "not a regular file" in err and str(fifo) in err
    loose = token_file(tmp_path / "loose", f"{'a' * 32} admin", mode=0o644)
    err = refused_start("coordinator", [*base, "--token-file", str(loose)], tmp_path)
    assert "other users" in err and f"chmod 600 {loose}" in err
    err = refused_start("coordinator", [*base, "--client-token-file", str(loose)], tmp_path)
    assert "other users" in err
    # A client may read its token from a pipe (`--token-file <(pass show tether)`).
    res = subprocess.run(
        ["bash", "-c", f'{sys.executable} -m tether.coordinator.cli sessions --coordinator '
         f'127.0.0.1:1 --timeout 1 --token-file <(echo {"a" * 32})'],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 4, res.stderr  # read the pipe, then found nobody listening
