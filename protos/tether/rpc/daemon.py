"""Daemon plumbing shared by `tether agent`, `tether coordinator` and `tether serve`.

Signal handlers only set an Event (the main task does the work). The
shutdown trigger is injectable, so tests never signal the test runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tether.core.errors import TetherError

if TYPE_CHECKING:
    from tether.core.audit import AuditLog
    from tether.rpc.auth import ServerAuth

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
MAX_MESSAGE = 4 * 1024 * 1024


class ListenError(TetherError):
    def __init__(self, address: str, why: str) -> None:
        super().__init__(f"cannot listen on {address}: {why}")
        self.address = address
        self.why = why


class Shutdown:
    """Set once to start the ordered shutdown; a second SIGINT escalates."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.escalated = asyncio.Event()
        self.cause = ""

    def request(self, cause: str) -> None:
        if self.requested.is_set():
            if cause == "SIGINT":
                log.warning("second SIGINT: escalating, remaining groups get SIGKILL now")
                self.escalated.set()
            return
        self.cause = cause
        log.info("shutdown requested (%s)", cause)
        self.requested.set()


@contextlib.contextmanager
def capture_signals(shutdown: Shutdown):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, shutdown.request, sig.name)
    try:
        yield shutdown
    finally:
        for sig in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(sig)


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class TLSFiles:
    cert: str = ""
    key: str = ""
    # Clients must present a certificate signed by this CA (mTLS).
    client_ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert and self.key)

    def server_credentials(self) -> grpc.ServerCredentials:
        def read(path: str) -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise ListenError("tls", f"cannot read {path}: {exc.strerror}") from exc

        ca = read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials([(read(self.key), read(self.cert))],
                                           root_certificates=ca,
                                           require_client_auth=ca is not None)


def check_listen(address: str, tls: TLSFiles, insecure: bool, *,
                 authenticated: bool = False) -> None:
    """A non-loopback listener needs TLS *and* authentication (tokens or identities):
    TLS alone lets anyone who reaches the port start any command as this daemon's user.
    ``--insecure`` is the explicit escape hatch, and says what it leaves open."""
    if ":" not in address:
        raise ListenError(address, "give HOST:PORT, e.g. 127.0.0.1:7400")
    if is_loopback(address):
        return  # without credentials: warned about once the port is known
    if not tls.enabled and not insecure:
        raise ListenError(
            address,
            "refusing a non-loopback address without TLS; pass --tls-cert/--tls-key, "
            "or --insecure if the network is trusted",
        )
    if not authenticated and not insecure:
        raise ListenError(
            address,
            "refusing a non-loopback address without authentication: TLS encrypts, but "
            "anyone who reaches the port could start any command as this daemon's user; "
            "pass --token-file (lines `TOKEN ROLE`) and/or --tls-client-ca with "
            "--allow-identity CN=ROLE, or --insecure if the network is trusted")
    if not tls.enabled:
        log.warning("listening on %s WITHOUT TLS (--insecure): anyone who can reach it can "
                    "start and stop processes", address)
    if not authenticated:
        log.warning("listening on %s WITHOUT AUTHENTICATION (--insecure): every caller is "
                    "admin", address)


def warn_open_loopback(address: str) -> None:
    """No credentials on a loopback listener (the default, so the quickstart needs no
    set-up): allowed, but said loudly, and plainly when that hands out root."""
    if os.geteuid() == 0:
        who = ("ANY LOCAL USER CAN RUN COMMANDS AS ROOT through it (this daemon runs as "
               "root; a spawn without --user runs as root)")
    else:
        who = "any local user can run commands as this daemon's user through it"
    log.warning("listening on %s WITHOUT AUTHENTICATION (no --token-file or "
                "--allow-identity): every caller that can connect is admin, so %s; on a "
                "host with other users give it --token-file FILE (lines `TOKEN ROLE`, mode "
                "600; README: Security)", address, who)


async def start_server(address: str, register: list[Callable[[grpc.aio.Server], None]],
                       service_names: list[str], tls: TLSFiles | None = None,
                       insecure: bool = False,
                       interceptors: list[grpc.aio.ServerInterceptor] | None = None, *,
                       auth: ServerAuth | None = None, audit: AuditLog | None = None,
                       label: str = "this daemon",
                       ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A grpc.aio server with health checking and reflection on, every call checked
    against its caller's role (``tether.rpc.auth``) and mutating ones audited.
    Returns (server, port, health)."""
    from tether.rpc.auth import AuthInterceptor, ServerAuth, check_auth
    from tether.rpc.security import MalformedRequestInterceptor

    tls = tls or TLSFiles()
    auth = auth or ServerAuth()
    check_listen(address, tls, insecure, authenticated=auth.enforced)
    check_auth(auth, tls.client_ca)
    server = grpc.aio.server(
        # Decoding first (outermost), so the auth check sees the request (an agent:NAME
        # caller may only act as NAME); a streaming request is checked before any message.
        interceptors=[MalformedRequestInterceptor(), AuthInterceptor(auth, label, audit),
                      *(interceptors or [])],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.so_reuseport", 0),
                 # Coordinators ping agents every 2 s to notice partitions quickly.
                 ("grpc.keepalive_permit_without_calls", 1),
                 ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
                 ("grpc.http2.max_ping_strikes", 0)],
    )
    for fn in register:
        fn(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in service_names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME,
                                         health.SERVICE_NAME], server)
    try:
        if tls.enabled:
            port = server.add_secure_port(address, tls.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ListenError(address, f"{exc}; is another process using the port? "
                          "Pick another --listen port or stop it") from exc
    if port == 0:
        raise ListenError(address, "the port is in use or the address is not on this host; "
                          "pick another --listen port or stop what holds it")
    if is_loopback(address) and not auth.enforced:
        warn_open_loopback(f"{address.rsplit(':', 1)[0]}:{port}")
    await server.start()
    return server, port, health_servicer
