"""Credentials for security tests: token files, raw calls with a given credential, and a
real gRPC server posing as an agent that records what each caller presented."""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tether.rpc.security import ClientSecurity

REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def new_token(role: str) -> str:
    return f"{role.replace(':', '-')}-{secrets.token_hex(16)}"


def token_file(path: Path, *lines: str, mode: int = 0o600) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(mode)
    return path


class Tokens:
    """A daemon's token file and one client token file per credential.

    A client file holds the daemon's line as it is (``TOKEN ROLE``): a client sends the
    first field; a tether without roles read the whole line on both sides, so the same
    tests run against it and fail for the reason they describe, not a setup mismatch."""

    def __init__(self, directory: Path, name: str = "tokens") -> None:
        self.dir = directory
        self.name = name
        self.lines: list[str] = []
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, role: str | None) -> ClientSecurity:
        """A new token with ``role`` (None: a line with the token alone)."""
        token = new_token(role or "legacy")
        line = f"{token} {role}" if role else token
        self.lines.append(line)
        path = token_file(self.dir / f"{self.name}-client-{len(self.lines)}", line)
        return ClientSecurity(token_file=str(path))

    def file(self) -> str:
        return str(token_file(self.dir / self.name, *self.lines))


async def call(address: str, method: str, request: Any, dial: ClientSecurity, *,
               response_type: Any = None, timeout: float = 20) -> tuple[grpc.StatusCode, Any]:
    """Call ``method`` (``/pkg.Service/Method``) with ``dial``'s credentials. For a
    streaming method, the first message (or the end of the stream) decides. Returns the
    status code (OK when a message or a clean end came) and the first reply."""
    deserialize = response_type.FromString if response_type is not None else None
    async with dial.channel(address) as channel:
        streaming = method.endswith(("/Watch", "/WatchSession", "/ReadAudit"))
        try:
            if streaming:
                stream = channel.unary_stream(
                    method, request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=deserialize)(request, timeout=timeout)
                try:
                    async for first in stream:
                        return grpc.StatusCode.OK, first
                    return grpc.StatusCode.OK, None
                finally:
                    stream.cancel()
            reply = await channel.unary_unary(
                method, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=deserialize)(request, timeout=timeout)
            return grpc.StatusCode.OK, reply
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()


def outbound_address() -> str | None:
    """This host's non-loopback address (the one a default route would use), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.200", 9))  # TEST-NET: nothing is sent for a UDP connect
        except OSError:
            return None
        addr = str(s.getsockname()[0])
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


@dataclass
class FakeAgent:
    """A gRPC server that answers AgentService calls with empty replies and records the
    ``authorization`` metadata of every call: a credential thief's view."""

    server: grpc.aio.Server
    port: int
    seen: list[tuple[str, str]] = field(default_factory=list)

    @property
    def authorizations(self) -> list[str]:
        return [auth for _, auth in self.seen if auth]


async def start_fake_agent(host: str = "127.0.0.1",
                           tls: tuple[bytes, bytes] | None = None,
                           watch: tuple[bytes, ...] = ()) -> FakeAgent:
    """``watch``: serialized GroupEvents its Watch stream sends before it falls silent."""
    from tether.v1 import agent_pb2 as apb

    replies = {"ListOrphans": apb.ListOrphansResponse, "Info": apb.InfoResponse,
               "List": apb.ListResponse, "StopGroups": apb.StopGroupsResponse}
    fake: FakeAgent

    class Recorder(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: Any) -> Any:
            name = details.method.rsplit("/", 1)[1]
            auth = dict(details.invocation_metadata or ()).get("authorization", "")
            fake.seen.append((name, auth))

            async def unary(request: bytes, context: Any) -> bytes:
                return bytes(replies.get(name, apb.InfoResponse)().SerializeToString())

            async def stream(request: bytes, context: Any) -> Any:
                for event in watch:
                    yield event
                await asyncio.Event().wait()  # then a stream that never says anything
                yield b""

            if name == "Watch":
                return grpc.unary_stream_rpc_method_handler(stream)
            return grpc.unary_unary_rpc_method_handler(unary)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([Recorder()])
    if tls is not None:
        port = server.add_secure_port(f"{host}:0", grpc.ssl_server_credentials([tls]))
    else:
        port = server.add_insecure_port(f"{host}:0")
    fake = FakeAgent(server, port)
    await server.start()
    return fake


def refused_start(kind: str, args: list[str], cwd: Path) -> str:
    """Start `tether KIND ARGS` expecting a refusal (exit status 2); returns its stderr.
    A daemon that starts instead is stopped and fails the test."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "tether.coordinator.cli", kind, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" in line:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"tether {kind} started: {line.strip()}\n{err}")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    return err
