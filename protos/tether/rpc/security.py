"""Who may call a tether daemon, and how clients prove who they are.

Trust model (README "Security"):

* Transport: TLS on every listener when ``--tls-cert/--tls-key`` are given; with
  ``--tls-client-ca`` clients must present a certificate from that CA (mTLS).
  A daemon refuses a non-loopback listen without TLS unless ``--insecure``.
* Identity: a client is allowed if it presents a bearer token listed in the
  daemon's ``--token-file`` (one token per line), or a client certificate whose
  common name is in ``--allow-identity``. When neither is configured the daemon
  is open to whoever can reach it (the loopback default).
* Agents accept lifecycle calls only from their coordinator's identity (its
  certificate CN) or from local clients holding a token; coordinators accept CLI
  and API clients by token and agents by certificate or token.
* Health checking and reflection stay open so orchestrators can probe.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tether.core.errors import TetherError

log = logging.getLogger("tether.security")

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class SecurityConfigError(TetherError):
    pass


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(
            f"cannot read {what} {path!r}: {exc.strerror}; check the path in the flag or "
            "config file") from exc


def load_tokens(path: str) -> frozenset[str]:
    """One token per line; blank lines and # comments ignored. Refuses an empty file."""
    if not path:
        return frozenset()
    tokens = frozenset(
        line.strip() for line in read_file(path, "token file").decode().splitlines()
        if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise SecurityConfigError(f"token file {path!r} holds no token; put one per line")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        log.warning("token file %s is readable by group/others (mode %o); chmod 600 it",
                    path, mode & 0o777)
    return tokens


def load_token(path: str) -> str:
    """The token a client sends: the first token line of the file."""
    if not path:
        return ""
    for line in read_file(path, "token file").decode().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise SecurityConfigError(f"token file {path!r} holds no token; put one on the first line")


@dataclass(frozen=True)
class ServerAuth:
    tokens: frozenset[str] = frozenset()
    identities: frozenset[str] = frozenset()

    @property
    def enforced(self) -> bool:
        return bool(self.tokens or self.identities)

    def token_ok(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) \
                    and value.startswith("Bearer "):
                presented = value[len("Bearer "):].strip()
                return any(hmac.compare_digest(presented, t) for t in self.tokens)
        return False

    def identity_ok(self, context: grpc.aio.ServicerContext) -> bool:
        if not self.identities:
            return False
        auth = context.auth_context() or {}
        names = [n.decode() for n in auth.get("x509_common_name", [])]
        return any(n in self.identities for n in names)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admit a call by bearer token or client-certificate identity; refuse the rest."""

    def __init__(self, auth: ServerAuth, service: str) -> None:
        self.auth = auth
        self.service = service

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not self.auth.enforced or method.startswith(OPEN_PREFIXES):
            return handler
        if self.auth.token_ok(details.invocation_metadata):
            return handler
        message = (f"{method}: not authenticated; {self.service} accepts a bearer token from "
                   "its --token-file" + (" or a client certificate of an allowed identity"
                                         if self.auth.identities else "")
                   + " (CLI: --token-file or TETHER_TOKEN_FILE)")
        if not self.auth.identities:
            return _rewrap(handler, lambda ctx: False, message)
        return _rewrap(handler, self.auth.identity_ok, message)


def _rewrap(handler: Any, allowed: Callable[[Any], bool], message: str) -> Any:
    """A handler that checks ``allowed(context)`` before running the real one."""

    async def check(request: Any, context: Any) -> Any:
        if not allowed(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return request

    return wrap_handler(handler, check, handler.request_deserializer)


Prepare = Callable[[Any, Any], Awaitable[Any]]


def wrap_handler(handler: Any, prepare: Prepare, request_deserializer: Any) -> Any:
    """The same RPC handler with ``prepare(request, context)`` run first; it may abort or
    return a different request (e.g. decode raw bytes)."""
    kwargs = {"request_deserializer": request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: Any) -> Any:
            return await inner(await prepare(request, context), context)

        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: Any) -> Any:
            async for item in inner_stream(await prepare(request, context), context):
                yield item

        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return handler


@dataclass(frozen=True)
class ClientSecurity:
    """How this process dials a tether daemon: TLS roots, client certificate, token."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    token_file: str = ""
    # For tests and IP-addressed deployments whose certificate names a host, not an IP.
    server_name: str = ""
    options: list[tuple[str, Any]] = field(default_factory=list)
    # A token given directly (tether serve's coordinator dialing its own agent).
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def channel(self, address: str) -> grpc.aio.Channel:
        options = list(self.options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        interceptors = []
        token = self.token or load_token(self.token_file)
        if token:
            interceptors.append(_TokenInterceptor(token))
        if self.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=read_file(self.ca, "CA certificate") if self.ca else None,
                private_key=read_file(self.key, "client key") if self.key else None,
                certificate_chain=read_file(self.cert, "client certificate") if self.cert
                else None)
            return grpc.aio.secure_channel(address, creds, options=options,
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


class _TokenMetadata:
    def __init__(self, token: str) -> None:
        self.value = f"Bearer {token}"

    def add(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*list(details.metadata or ()))
        metadata.add("authorization", self.value)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


class _TokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
                        grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._meta = _TokenMetadata(token)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._meta.add(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._meta.add(details), request)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bytes that do not decode as the request type get INVALID_ARGUMENT, not UNKNOWN.

    grpc.aio treats a deserializer error as an unexpected servicer failure; here the
    handler receives the raw bytes and decodes them itself.
    """

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None \
                or details.method.startswith(OPEN_PREFIXES):
            return handler
        decode = handler.request_deserializer
        method = details.method

        async def decoded(raw: bytes, context: Any) -> Any:
            try:
                return decode(raw)
            except Exception as exc:  # protobuf's DecodeError and friends
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{method}: malformed request ({exc}); send a valid "
                                    "tether.v1 message")

        return wrap_handler(handler, decoded, None)
