"""How tether daemons and clients dial each other, and the plumbing of server interceptors.

* Transport: TLS on every listener when ``--tls-cert/--tls-key`` are given; with
  ``--tls-client-ca`` clients must present a certificate from that CA (mTLS).
* A client proves who it is with a bearer token (``--token-file``; sent on every call,
  unary and streaming alike) and/or its client certificate. Who may call what is
  decided by ``tether.rpc.auth`` (roles, checked per RPC).
* Token files are secrets: read without blocking, regular files only for daemons,
  refused when other users may read them, when they belong to another user than the
  daemon's (or root), or when they sit in a directory others may write without the
  sticky bit (anyone could swap them for their own before the next start).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from tether.core.errors import TetherError

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class SecurityConfigError(TetherError):
    pass


#: Secret files (token files) larger than this are refused: they are a few lines.
MAX_SECRET_FILE = 1024 * 1024
#: A bearer token: 1 to 4096 visible ASCII characters (what gRPC metadata can carry).
MAX_TOKEN = 4096


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(
            f"cannot read {what} {path!r}: {exc.strerror}; check the path in the flag or "
            "config file") from exc


def account(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_secret_owner(path: str, what: str, st: os.stat_result) -> None:
    """A daemon's secret file must be its own user's or root's, in directories (the one
    named and, for a link, the one holding the file) that other users may not write
    unless sticky: another user who owns the file, or may replace it, could write
    themselves an admin token for the next start. Group ownership and group-writable
    directories are left to the administrator (the group-readable warning covers the
    file)."""
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise SecurityConfigError(
            f"{what} {path!r} belongs to {account(st.st_uid)}, not to this daemon's user "
            f"{account(euid)} or root; its owner could rewrite the tokens: "
            f"`chown {pwd_name(euid)} {path}` (or root) after checking its lines")
    for d in dict.fromkeys((os.path.dirname(os.path.abspath(path)),
                            os.path.dirname(os.path.realpath(path)))):
        try:
            mode = os.stat(d).st_mode
        except OSError:
            continue
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise SecurityConfigError(
                f"{what} {path!r} is in {d}, which other users may write (mode "
                f"{stat.S_IMODE(mode):o}, not sticky): anyone could replace the file with "
                f"their own; move it to a directory only its owner may write (e.g. "
                f"/etc/tether, mode 755) or `chmod o-w {d}`")


def pwd_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def read_secret(path: str, what: str, *, daemon: bool = True) -> str:
    """Read a token file without ever blocking on it or trusting its kind.

    A daemon takes regular files only (a FIFO would hang its start-up), refuses one that
    other users may read or write, that belongs to another user than its own or root, or
    that other users could replace (``check_secret_owner``), and warns about one its group
    may read. A client (``daemon=False``) also takes a pipe (``--token-file <(pass show
    tether)``) and only warns about loose modes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SecurityConfigError(
            f"cannot read {what} {path!r}: {exc.strerror}; check the path in the flag or "
            "config file") from exc
    try:
        st = os.fstat(fd)
        pipe = stat.S_ISFIFO(st.st_mode)
        if not stat.S_ISREG(st.st_mode) and not (pipe and not daemon):
            raise SecurityConfigError(
                f"{what} {path!r} is not a regular file; give the path of a file holding "
                "the token(s)")
        mode = st.st_mode & 0o777
        if not pipe and mode & 0o006:
            if daemon:
                raise SecurityConfigError(
                    f"{what} {path!r} is readable or writable by other users (mode {mode:o}); "
                    f"anyone on this host could take its tokens: chmod 600 {path}")
            log.warning("%s %s is readable by other users (mode %o); chmod 600 it", what,
                        path, mode)
        elif not pipe and mode & 0o060:
            log.warning("%s %s is readable by its group (mode %o); chmod 600 it unless every "
                        "member may hold its tokens", what, path, mode)
        if daemon:
            check_secret_owner(path, what, st)
        if pipe:
            os.set_blocking(fd, True)
        chunks = []
        total = 0
        while chunk := os.read(fd, 65536):
            total += len(chunk)
            if total > MAX_SECRET_FILE:
                raise SecurityConfigError(
                    f"{what} {path!r} is larger than {MAX_SECRET_FILE} bytes; it should hold "
                    "a few lines of tokens")
            chunks.append(chunk)
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {what} {path!r}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecurityConfigError(f"{what} {path!r} is not UTF-8 text ({exc.reason} at byte "
                                  f"{exc.start}); it should hold tokens, one per line") from exc


def token_lines(text: str) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every line that is not blank or a #
    comment."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            out.append((n, fields))
    return out


def check_token(token: str, where: str) -> str:
    if len(token) > MAX_TOKEN:
        raise SecurityConfigError(f"{where}: the token is longer than {MAX_TOKEN} characters")
    if not all("!" <= ch <= "~" for ch in token):
        raise SecurityConfigError(f"{where}: the token holds characters other than visible "
                                  "ASCII; use letters, digits and punctuation")
    return token


def load_token(path: str, *, daemon: bool = False) -> str:
    """The token a client sends: the first field of the first token line (a server's
    ``TOKEN ROLE`` file works too)."""
    if not path:
        return ""
    text = read_secret(path, "token file", daemon=daemon)
    for n, fields in token_lines(text):
        return check_token(fields[0], f"token file {path} line {n}")
    raise SecurityConfigError(f"token file {path!r} holds no token; put one on the first line")


@dataclass(frozen=True)
class ClientSecurity:
    """How this process dials a tether daemon: TLS roots, client certificate, token."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    token_file: str = ""
    # The name to verify in the server's certificate when it is not the address's host
    # (the coordinator dials each agent expecting the agent's name).
    server_name: str = ""
    options: list[tuple[str, Any]] = field(default_factory=list)
    # The token itself, read once (daemons), instead of the file on every dial.
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    @property
    def has_token(self) -> bool:
        return bool(self.token or self.token_file)

    def loaded(self) -> ClientSecurity:
        """The same, with the token read now, with a daemon's checks (a regular private
        file): a daemon reads its secrets once, at start-up, not on its event loop later."""
        if self.token or not self.token_file:
            return self
        return replace(self, token=load_token(self.token_file, daemon=True))

    def without_token(self) -> ClientSecurity:
        return replace(self, token="", token_file="")

    def channel(self, address: str) -> grpc.aio.Channel:
        options = list(self.options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        token = self.token or load_token(self.token_file)
        interceptors = token_interceptors(token) if token else []
        if self.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=read_file(self.ca, "CA certificate") if self.ca else None,
                private_key=read_file(self.key, "client key") if self.key else None,
                certificate_chain=read_file(self.cert, "client certificate") if self.cert
                else None)
            return grpc.aio.secure_channel(address, creds, options=options,
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def _with_token(details: Any, value: str) -> Any:
    metadata = grpc.aio.Metadata(*[(k, v) for k, v in (details.metadata or ())
                                   if k != "authorization"])
    metadata.add("authorization", value)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


# grpc.aio files each interceptor under the first of the four kinds it is an instance of
# (an if/elif chain), so one object per kind: a single class deriving from all four would
# only ever see unary-unary calls, and streams would go out without the token.
class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, value: str) -> None:
        self.value = value

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.value), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, value: str) -> None:
        self.value = value

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.value), request)


class _StreamUnaryToken(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, value: str) -> None:
        self.value = value

    async def intercept_stream_unary(self, continuation: Any, details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self.value), request_iterator)


class _StreamStreamToken(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, value: str) -> None:
        self.value = value

    async def intercept_stream_stream(self, continuation: Any, details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self.value), request_iterator)


def token_interceptors(token: str) -> list[Any]:
    """Client interceptors that send ``authorization: Bearer TOKEN`` on every kind of call."""
    value = f"Bearer {token}"
    return [_UnaryUnaryToken(value), _UnaryStreamToken(value), _StreamUnaryToken(value),
            _StreamStreamToken(value)]


# ---------------------------------------------------------------- server-side plumbing

#: Runs before the servicer with (request, context); for streaming requests with
#: (None, context). Returns the request to pass on (it may abort instead).
Prepare = Callable[[Any, Any], Awaitable[Any]]
#: Runs after the servicer with (request, response, exception, context): response is the
#: unary response (None for streams), exception what ended the call (None: success;
#: CancelledError or GeneratorExit when the client went away). Must not raise.
Finish = Callable[[Any, Any, BaseException | None, Any], None]


def handler_kind(handler: Any) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return kind
    raise ValueError(f"RPC method handler {handler!r} has no behaviour")


_MAKERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


async def _responses(produced: Any) -> AsyncGenerator[Any, None]:
    """What a streaming servicer produced: an async generator (yield style), or a
    coroutine that writes with ``context.write`` (reader/writer style). The generator is
    closed here, at once, when the call ends early (the client went away), so its
    ``finally`` clauses run now rather than whenever it is collected."""
    if not hasattr(produced, "__aiter__"):
        await produced
        return
    try:
        async for item in produced:
            yield item
    finally:
        await produced.aclose()


def wrap_handler(handler: Any, prepare: Prepare, request_deserializer: Any, *,
                 prepare_item: Prepare | None = None, finish: Finish | None = None) -> Any:
    """The same RPC handler, of whichever of the four kinds, with ``prepare`` run before
    the servicer (it may abort, or return a different request, e.g. decode raw bytes),
    ``prepare_item`` run on each message of a request stream, and ``finish`` run once the
    call ended, however it ended."""
    kind = handler_kind(handler)
    inner = getattr(handler, kind)
    done: Finish = finish or (lambda request, response, exc, context: None)
    # A request stream's first message stands for the call in ``finish`` (the audit log
    # records which group an Attach was for).
    first: dict[int, Any] = {}

    async def items(requests: Any, context: Any) -> AsyncIterator[Any]:
        async for item in requests:
            item = item if prepare_item is None else await prepare_item(item, context)
            first.setdefault(id(context), item)
            yield item

    async def unary_unary(request: Any, context: Any) -> Any:
        request = await prepare(request, context)
        try:
            response = await inner(request, context)
        except BaseException as exc:
            done(request, None, exc, context)
            raise
        done(request, response, None, context)
        return response

    async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        request = await prepare(request, context)
        try:
            async with contextlib.aclosing(_responses(inner(request, context))) as responses:
                async for item in responses:
                    yield item
        except BaseException as exc:
            done(request, None, exc, context)
            raise
        done(request, None, None, context)

    async def stream_unary(requests: Any, context: Any) -> Any:
        await prepare(None, context)
        try:
            response = await inner(items(requests, context), context)
        except BaseException as exc:
            done(first.pop(id(context), None), None, exc, context)
            raise
        done(first.pop(id(context), None), response, None, context)
        return response

    async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
        await prepare(None, context)
        try:
            async with contextlib.aclosing(
                    _responses(inner(items(requests, context), context))) as responses:
                async for item in responses:
                    yield item
        except BaseException as exc:
            done(first.pop(id(context), None), None, exc, context)
            raise
        done(first.pop(id(context), None), None, None, context)

    wrapped = {"unary_unary": unary_unary, "unary_stream": unary_stream,
               "stream_unary": stream_unary, "stream_stream": stream_stream}[kind]
    return _MAKERS[kind](wrapped, request_deserializer=request_deserializer,
                         response_serializer=handler.response_serializer)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bytes that do not decode as the request type get INVALID_ARGUMENT, not UNKNOWN,
    for every message of every kind of call.

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
        streaming = handler.stream_unary is not None or handler.stream_stream is not None

        async def decoded(raw: bytes, context: Any) -> Any:
            try:
                return decode(raw)
            except Exception as exc:  # protobuf's DecodeError and friends
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{method}: malformed request ({exc}); send a valid "
                                    "tether.v1 message")

        async def nothing(request: Any, context: Any) -> Any:
            return request

        if streaming:
            return wrap_handler(handler, nothing, None, prepare_item=decoded)
        return wrap_handler(handler, decoded, None)

