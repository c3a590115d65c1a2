"""Who may call what: roles, checked per RPC, in one place.

A caller proves who it is with a bearer token listed in the daemon's ``--token-file``
(one ``TOKEN ROLE`` per line) or a client certificate whose common name is listed with
``--allow-identity CN=ROLE``. Its role then decides, per method, through ``RULES``:

* ``admin``: everything;
* ``operator``: sessions and groups (spawn, adopt, signal, stop, keepalive, watch, list,
  orphans), nothing about agents' registration, no lifecycle call on an agent directly;
* ``reader``: list, get, watch (and health, open to all);
* ``agent:NAME``: ``RegisterAgent`` and ``Heartbeat`` as agent NAME, nothing else;
* ``coordinator``: the agent API (what a coordinator sends its agents).

``RULES`` fails closed: a method it does not list is refused to all but ``admin``, and
a test enumerates both services so a new RPC without an entry fails CI. The one
``AuthInterceptor`` wraps every kind of handler (unary and streaming, in both
directions), refusing with UNAUTHENTICATED (no credential, or one this daemon does not
know) or PERMISSION_DENIED (a known credential whose role does not allow the call); a
servicer reads the admitted caller with ``current_caller()``. Mutating calls are written
to the audit log, with who, what, which session or group, and the result.

A daemon with neither tokens nor identities is open: every caller is ``admin``. It
may listen on loopback only (or with ``--insecure``): see ``tether.rpc.daemon``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import enum
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from tether.core.audit import AuditLog, clip, timestamp
from tether.core.errors import InvalidSpec, PermissionDenied, Unauthenticated
from tether.core.model import check_name
from tether.rpc.leader import REDIRECTED
from tether.rpc.security import (
    MAX_TOKEN,
    OPEN_PREFIXES,
    SecurityConfigError,
    check_token,
    read_secret,
    token_lines,
    wrap_handler,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- roles and callers


class RoleKind(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    READER = "reader"
    AGENT = "agent"
    COORDINATOR = "coordinator"


ROLES_HELP = "admin, operator, reader, agent:NAME, coordinator"


@dataclass(frozen=True)
class Role:
    kind: RoleKind
    #: For ``agent:NAME``: the one agent name this role may register and heartbeat.
    agent: str = ""

    def __str__(self) -> str:
        return f"agent:{self.agent}" if self.kind is RoleKind.AGENT else self.kind.value

    @classmethod
    def parse(cls, text: str, where: str) -> Role:
        kind, sep, name = text.partition(":")
        if kind == RoleKind.AGENT.value and sep:
            try:
                check_name(name, "agent name")
            except InvalidSpec as exc:
                raise SecurityConfigError(f"{where}: role {text!r}: {exc}") from None
            if any(ch.isspace() for ch in name):
                raise SecurityConfigError(f"{where}: role {text!r}: an agent name has no spaces")
            return cls(RoleKind.AGENT, name)
        if not sep and kind in RoleKind.__members__.values() and kind != RoleKind.AGENT.value:
            return cls(RoleKind(kind))
        raise SecurityConfigError(f"{where}: {text!r} is not a role; use one of {ROLES_HELP}")


ADMIN = Role(RoleKind.ADMIN)


class Proof(enum.StrEnum):
    """How a caller was identified."""

    TOKEN = "token"
    CERTIFICATE = "certificate"
    #: The daemon checks no credential (loopback default): every caller is admin.
    OPEN = "open"


#: The credential of the agent ``tether serve`` hosts: registered in-process, it is no
#: token id (``token:...``), certificate (``cn:...``) or ``open``, so no network caller
#: can present it and take the name over.
IN_PROCESS_CREDENTIAL = "in-process"
OPEN_CREDENTIAL = "open"


@dataclass(frozen=True)
class Caller:
    role: Role
    #: ``token:<first 8 hex of the token's sha256>``, ``cn:<common name>`` or ``open``:
    #: names the credential without revealing it (audit log, agent name binding).
    credential: str
    proof: Proof
    peer: str = ""

    def __str__(self) -> str:
        return f"{self.role} ({self.credential})"


def token_id(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Rule:
    """Who may call one method, and whether a call is written to the audit log."""

    roles: frozenset[RoleKind]
    #: Mutating: written to the audit log (a predicate on the request for calls that
    #: mutate only sometimes, e.g. ListOrphans with sweep).
    audit: bool | Callable[[Any], bool] = False
    #: The agent name a request acts as; an ``agent:NAME`` caller must match it.
    agent_name: Callable[[Any], str] | None = None
    #: A request stream whose servicer audits the call itself, when it has read what the
    #: stream is about (``OpenLease``, ``Attach``: on open, with its outcome); refusals
    #: (PERMISSION_DENIED) are audited here as for every call.
    audit_by_servicer: bool = False

    def audited(self, request: Any) -> bool:
        if callable(self.audit):
            return request is None or bool(self.audit(request))
        return self.audit

    def needs(self) -> str:
        names = ["agent:NAME" if k is RoleKind.AGENT else k.value
                 for k in RoleKind if k in self.roles]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    def check(self, method: str, caller: Caller, request: Any) -> None:
        role = caller.role
        if role.kind is not RoleKind.ADMIN and role.kind not in self.roles:
            raise PermissionDenied(
                f"{method}: {caller} may not call it; it needs the role {self.needs()}. "
                f"Use a credential with {'that role' if len(self.roles) == 1 else 'one of those'}"
                " (a token file line `TOKEN ROLE`, or --allow-identity CN=ROLE)")
        if role.kind is RoleKind.AGENT:
            name = self.agent_name(request) if self.agent_name and request is not None else None
            if name != role.agent:
                raise PermissionDenied(
                    f"{method} as agent {name!r}: {caller} may act only as agent "
                    f"{role.agent!r}; an agent registers under its own name, with its own "
                    "credential")


_A = "/tether.v1.AgentService/"
_C = "/tether.v1.CoordinatorService/"
_ADMIN, _OPERATOR, _READER, _AGENT, _COORD = (RoleKind.ADMIN, RoleKind.OPERATOR,
                                              RoleKind.READER, RoleKind.AGENT,
                                              RoleKind.COORDINATOR)


def _r(*roles: RoleKind, audit: bool | Callable[[Any], bool] = False,
       agent_name: Callable[[Any], str] | None = None, audit_by_servicer: bool = False
       ) -> Rule:
    return Rule(frozenset((_ADMIN, *roles)), audit, agent_name, audit_by_servicer)


def _sweeps(request: Any) -> bool:
    return bool(request.sweep)


def _agent_name(request: Any) -> str:
    return str(request.name)


#: Method -> who may call it. Admin may call everything; anything missing: admin only.
RULES: Mapping[str, Rule] = {
    # The coordinator: agents register and heartbeat as themselves only.
    _C + "RegisterAgent": _r(_AGENT, audit=True, agent_name=_agent_name),
    _C + "Heartbeat": _r(_AGENT, agent_name=_agent_name),
    _C + "ListAgents": _r(_OPERATOR, _READER),
    _C + "CreateSession": _r(_OPERATOR, audit=True),
    _C + "GetSession": _r(_OPERATOR, _READER),
    _C + "ListSessions": _r(_OPERATOR, _READER),
    _C + "KeepAlive": _r(_OPERATOR, audit=True),
    _C + "Spawn": _r(_OPERATOR, audit=True),
    _C + "Adopt": _r(_OPERATOR, audit=True),
    _C + "SignalSession": _r(_OPERATOR, audit=True),
    _C + "StopSession": _r(_OPERATOR, audit=True),
    _C + "WatchSession": _r(_OPERATOR, _READER),
    _C + "ListOrphans": _r(_OPERATOR, audit=_sweeps),
    _C + "ReadAudit": _r(),
    # Every listening process on the host: pid, user and command line (secrets in argv):
    # for the credentials that may spawn there, never a read-only one.
    _C + "ListPorts": _r(_OPERATOR),
    _C + "ForgetAgent": _r(audit=True),
    _C + "GetLeader": _r(_OPERATOR, _READER),
    _C + "RestartGroups": _r(_OPERATOR, audit=True),
    _C + "ForgetGroups": _r(_OPERATOR, audit=True),
    _C + "Wait": _r(_OPERATOR, _READER),
    # A lease holds a session's processes alive: an operator's call, audited on open.
    _C + "OpenLease": _r(_OPERATOR, audit=True, audit_by_servicer=True),
    # Output is read-only; Attach may write a program's stdin: operators, audited.
    _C + "Logs": _r(_OPERATOR, _READER),
    _C + "Attach": _r(_OPERATOR, audit=True, audit_by_servicer=True),
    # An agent: lifecycle calls from its coordinator (and admins) only.
    _A + "Spawn": _r(_COORD, audit=True),
    _A + "Adopt": _r(_COORD, audit=True),
    _A + "Signal": _r(_COORD, audit=True),
    _A + "Stop": _r(_COORD, audit=True),
    _A + "StopGroups": _r(_COORD, audit=True),
    _A + "Get": _r(_COORD, _OPERATOR, _READER),
    _A + "List": _r(_COORD, _OPERATOR, _READER),
    _A + "Watch": _r(_COORD, _OPERATOR, _READER),
    _A + "ListOrphans": _r(_COORD, audit=_sweeps),
    _A + "Info": _r(_COORD, _OPERATOR, _READER),
    _A + "ListPorts": _r(_COORD, _OPERATOR),
    _A + "Restart": _r(_COORD, audit=True),
    _A + "Forget": _r(_COORD, audit=True),
    _A + "Logs": _r(_COORD, _OPERATOR, _READER),
    _A + "Attach": _r(_COORD, audit=True),
}

#: A method ``RULES`` does not list (a new RPC, before someone decided who may call it).
ADMIN_ONLY = Rule(frozenset({_ADMIN}), audit=True)


def rule_for(method: str) -> Rule:
    return RULES.get(method, ADMIN_ONLY)


# ---------------------------------------------------------------- credentials


@dataclass(frozen=True)
class TokenEntry:
    role: Role
    #: ``token:<8 hex>``.
    id: str
    #: Where it was read (file and line), for messages.
    where: str


def load_tokens(path: str) -> dict[bytes, TokenEntry]:
    """A daemon's token file: one ``TOKEN ROLE`` per line; blank lines and ``#`` comments
    are ignored. A token alone means ``admin`` (today's files keep working) and is warned
    about, naming the file. Refuses an empty file, unknown roles, a token listed twice
    with two roles, and a file other users may read."""
    if not path:
        return {}
    text = read_secret(path, "token file", daemon=True)
    entries: dict[bytes, TokenEntry] = {}
    legacy: list[int] = []
    for n, fields in token_lines(text):
        where = f"token file {path} line {n}"
        if len(fields) > 2:
            raise SecurityConfigError(f"{where}: expected `TOKEN ROLE`, found {len(fields)} "
                                      "fields; a token holds no spaces")
        token = check_token(fields[0], where)
        if len(fields) == 2:
            role = Role.parse(fields[1], where)
        else:
            role = ADMIN
            legacy.append(n)
        if len(token) < 16:
            log.warning("%s: the token has only %d characters; use 32 random ones or more "
                        "(e.g. `openssl rand -hex 32`)", where, len(token))
        key = _digest(token)
        first = entries.get(key)
        if first is not None and first.role != role:
            raise SecurityConfigError(f"{where}: this token is also on {first.where} with "
                                      f"another role ({first.role}); keep one line per token")
        if first is None:
            entries[key] = TokenEntry(role, token_id(token), where)
    if not entries:
        raise SecurityConfigError(f"token file {path!r} holds no token; put one `TOKEN ROLE` "
                                  f"per line (roles: {ROLES_HELP})")
    ids = [e.id for e in entries.values()]
    if len(set(ids)) != len(ids):
        raise SecurityConfigError(f"token file {path}: two tokens share the id of their first "
                                  "8 sha256 hex digits; replace one of them")
    if legacy:
        log.warning("token file %s: %d token(s) without a role (line %s) mean admin, as "
                    "before roles existed; write `TOKEN admin` to keep that, or give a "
                    "narrower role (%s)", path, len(legacy), ", ".join(map(str, legacy)),
                    ROLES_HELP)
    return entries


def parse_identities(items: Iterable[str]) -> dict[str, Role]:
    """``--allow-identity CN=ROLE`` values; a bare ``CN`` means admin (as before roles
    existed), with a warning."""
    out: dict[str, Role] = {}
    for item in items:
        where = f"--allow-identity {item!r}"
        cn, sep, text = item.rpartition("=")
        if not sep:
            cn, role = item, ADMIN
            log.warning("%s has no role: it means admin, as before roles existed; write "
                        "%s=admin to keep that, or give a narrower role (%s)", where, item,
                        ROLES_HELP)
        else:
            role = Role.parse(text, where)
        if not cn or any(not ch.isprintable() for ch in cn):
            raise SecurityConfigError(f"{where}: give CN=ROLE, the certificate's common name "
                                      "and a role")
        if out.get(cn, role) != role:
            raise SecurityConfigError(f"{where}: CN {cn!r} is listed twice with two roles "
                                      f"({out[cn]} and {role}); keep one")
        out[cn] = role
    return out


@functools.lru_cache(maxsize=512)
def common_names(pem: bytes) -> tuple[str, ...]:
    """Every common name in a certificate's subject (gRPC reports only one of several)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    return tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))


class NotAuthenticated(Unauthenticated):
    def __init__(self, why: str, credential: str = "") -> None:
        super().__init__(why)
        self.why = why
        #: The id of the token presented, if any (never the token).
        self.credential = credential


def _bearer(metadata: Iterable[tuple[str, Any]]) -> str | None:
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise NotAuthenticated(f"{len(values)} authorization headers; send one")
    value = values[0]
    scheme, _, token = value.partition(" ") if isinstance(value, str) else ("", "", "")
    if scheme.lower() != "bearer" or not token:
        raise NotAuthenticated("the authorization header is not `Bearer TOKEN`")
    if len(token) > MAX_TOKEN or not all("!" <= ch <= "~" for ch in token):
        raise NotAuthenticated("the bearer token is malformed (spaces, control characters or "
                               f"more than {MAX_TOKEN} characters)")
    return token


class ServerAuth:
    """The credentials a daemon accepts, and the role each one carries."""

    def __init__(self, tokens: Mapping[bytes, TokenEntry] | Iterable[str] = (),
                 identities: Mapping[str, Role] | Iterable[str] = ()) -> None:
        if isinstance(tokens, Mapping):
            self.tokens: dict[bytes, TokenEntry] = dict(tokens)
        else:  # bare tokens (the Python API before roles): admin
            self.tokens = {_digest(t): TokenEntry(ADMIN, token_id(t), "argument")
                           for t in tokens}
        self.identities: dict[str, Role] = (dict(identities) if isinstance(identities, Mapping)
                                            else parse_identities(identities))

    def __repr__(self) -> str:
        return f"<ServerAuth {len(self.tokens)} tokens, {len(self.identities)} identities>"

    @property
    def enforced(self) -> bool:
        return bool(self.tokens or self.identities)

    def authenticate(self, metadata: Iterable[tuple[str, Any]], context: Any) -> Caller:
        """The caller of one call, or ``NotAuthenticated``. A known token decides; else a
        listed certificate (a caller may present an unknown token and an allowed
        certificate, as a coordinator whose token this agent does not list)."""
        peer = _peer(context)
        if not self.enforced:
            return Caller(ADMIN, OPEN_CREDENTIAL, Proof.OPEN, peer)
        presented = _bearer(metadata) if self.tokens else None
        if presented is not None:
            entry = self.tokens.get(_digest(presented))
            if entry is not None:
                return Caller(entry.role, entry.id, Proof.TOKEN, peer)
        why = "no credential presented"
        if self.identities:
            caller, why = self._certificate(context, peer)
            if caller is not None:
                return caller
        if presented is not None:
            why = f"the bearer token presented ({token_id(presented)}) is not in its token file"
        raise NotAuthenticated(why, token_id(presented) if presented is not None else "")

    def _certificate(self, context: Any, peer: str) -> tuple[Caller | None, str]:
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:
            return None, "no client certificate presented"
        try:
            names = common_names(pems[0])
        except ValueError:
            return None, "the client certificate cannot be read"
        if len(names) != 1:
            return None, (f"the client certificate has {len(names)} common names; an identity "
                          "needs exactly one")
        cn = names[0]
        role = self.identities.get(cn)
        if role is None:
            return None, f"certificate CN={cn!r} is not listed in --allow-identity"
        return Caller(role, f"cn:{cn}", Proof.CERTIFICATE, peer), ""


def check_auth(auth: ServerAuth, client_ca: str) -> None:
    """Refuse credential settings that would admit more than they say."""
    if auth.identities and not client_ca:
        raise SecurityConfigError("--allow-identity needs --tls-client-ca: identities come "
                                  "from verified client certificates")
    if client_ca and not auth.enforced:
        raise SecurityConfigError(
            "--tls-client-ca without --allow-identity or --token-file would let every "
            "certificate that CA ever signed (agents' included) do everything; say who may "
            f"call: --allow-identity CN=ROLE (repeatable; roles: {ROLES_HELP}) and/or "
            "--token-file")


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # a context without a transport (tests)
        return ""


# ---------------------------------------------------------------- the caller of this call

#: Response header of an admitted call with a request stream: the caller's role.
ADMITTED_HEADER = "tether-admitted-as"

CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("tether_caller",
                                                                      default=None)


def current_caller() -> Caller:
    """The admitted caller of the RPC being served (every RPC runs in a task of its own,
    so this is per call). Fails closed outside a call the interceptor admitted."""
    caller = CALLER.get()
    if caller is None:
        raise PermissionDenied("no authenticated caller for this call; serve it through "
                               "tether.rpc.daemon.start_server, which checks credentials")
    return caller


# ---------------------------------------------------------------- audit entries

_TOP_FIELDS = {"session_id": "session", "group_id": "group", "agent": "agent", "name": "agent"}
_DETAIL_FIELDS = ("address", "signal", "pid", "start_time", "sweep", "idempotency_key",
                  "ttl_seconds", "grace_seconds", "epoch", "lease_grace_seconds", "write",
                  "close_stdin_on_detach", "on_behalf_of")
_MAX_VALUE = 256
#: A list field (group ids, labels, what was forgotten): at most this many items...
_MAX_ITEMS = 20
#: ... and this many characters in all, whatever each item holds.
_MAX_LIST = 1024


def _short(value: Any) -> str:
    """A field's value as the audit log keeps it: text (``true``, ``15``), at most 256
    characters."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_MAX_VALUE] + "..." if len(text) > _MAX_VALUE else text


def _short_list(values: Iterable[Any]) -> str:
    """A list as the audit log keeps it: comma-joined, each item ``_short``, at most
    ``_MAX_ITEMS`` of them and ``_MAX_LIST`` characters, saying how many there were."""
    items = [str(v) for v in values]
    text = ",".join(_short(v) for v in items[:_MAX_ITEMS])
    if len(text) > _MAX_LIST:
        text = text[:_MAX_LIST] + "..."
    if len(items) > _MAX_ITEMS or text.endswith("..."):
        text += f" ({len(items)} in all)"
    return text


def audit_fields(request: Any, response: Any = None) -> dict[str, Any]:
    """What a call was about, from a whitelist of fields (never an environment)."""
    out: dict[str, Any] = {}
    details: dict[str, Any] = {}

    def take(msg: Any) -> None:
        if msg is None or not hasattr(msg, "DESCRIPTOR"):
            return
        fields = msg.DESCRIPTOR.fields_by_name
        for name, key in _TOP_FIELDS.items():
            if name in fields and getattr(msg, name) and key not in out:
                out[key] = _short(getattr(msg, name))
        if "group_ids" in fields and msg.group_ids and "group" not in out:
            out["group"] = _short_list(msg.group_ids)
        if "forgotten" in fields and msg.forgotten and "forgotten" not in details:
            details["forgotten"] = _short_list(msg.forgotten)
        for name in _DETAIL_FIELDS:
            if name not in fields or name in details:
                continue
            has = (msg.HasField(name) if fields[name].has_presence else bool(getattr(msg, name)))
            if has:
                details[name] = _short(getattr(msg, name))
        if "spec" in fields and msg.HasField("spec"):
            spec = msg.spec
            if spec.session_id and "session" not in out:
                out["session"] = _short(spec.session_id)
            for name in ("label", "target"):
                if getattr(spec, name):
                    details.setdefault(name, _short(getattr(spec, name)))
            if spec.argv:
                details.setdefault("program", _short(spec.argv[0]))
        if "group" in fields and msg.HasField("group"):
            take(msg.group)
        if "selector" in fields and msg.HasField("selector"):
            # --group/--label: which groups of the session the call was for.
            take(msg.selector)
            if msg.selector.labels and "labels" not in details:
                details["labels"] = _short_list(msg.selector.labels)

    take(request)
    take(response)
    if details:
        out["details"] = details
    return out


def _outcome(exc: BaseException | None, context: Any) -> tuple[str, str]:
    if exc is None:
        return "OK", ""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED", "the call ended before its answer (client gone or deadline)"
    code = None
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        details = ""
        try:
            details = context.details() or ""
        except Exception:
            details = ""
        return code.name, details.decode(errors="replace") if isinstance(details, bytes) \
            else str(details)
    return "UNKNOWN", f"{type(exc).__name__}: {exc}"


class _Throttle:
    """At most one log line per ``every`` seconds; counts what it held back."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.next = 0.0
        self.held = 0

    def ready(self) -> int | None:
        now = time.monotonic()
        if now < self.next:
            self.held += 1
            return None
        self.next = now + self.every
        held, self.held = self.held, 0
        return held


#: Refused (PERMISSION_DENIED) calls of one credential recorded one by one per window...
REFUSED_RECORDED = 5
#: ... of this many seconds; the rest of the window's are one summary entry at its end, so
#: a weak credential hammering refused calls cannot rotate the record of real ones away.
REFUSED_WINDOW = 60.0


class _Refusals:
    """One credential's refused calls in the current window."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        self.started = time.time()
        self.recorded = 0
        self.held: collections.Counter[str] = collections.Counter()


# ---------------------------------------------------------------- the interceptor


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admit each call by its caller's role (``RULES``), for every kind of handler; audit
    the mutating ones. Health checking and reflection stay open."""

    def __init__(self, auth: ServerAuth, service: str = "this daemon",
                 audit: AuditLog | None = None, rules: Mapping[str, Rule] = RULES,
                 refused_window: float = REFUSED_WINDOW) -> None:
        self.auth = auth
        self.refused_window = refused_window
        self.service = service
        self.audit = audit
        self.rules = rules
        self._refusals = _Throttle()
        #: Credential -> its refused calls in the current window (``REFUSED_WINDOW``).
        self._denied: dict[str, _Refusals] = {}

    def _unauthenticated(self, method: str, why: str) -> str:
        ways = "a bearer token from its --token-file" if self.auth.tokens else ""
        if self.auth.identities:
            ways += (" or " if ways else "") + "a client certificate of an allowed identity"
        cli = "--token-file or TETHER_TOKEN_FILE" if self.auth.tokens else ""
        if self.auth.identities:
            cli += ("; " if cli else "") + "--tls-cert/--tls-key"
        return f"{method}: not authenticated ({why}); {self.service} accepts {ways} (CLI: {cli})"

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        rule = self.rules.get(method, ADMIN_ONLY)
        metadata = tuple(details.invocation_metadata or ())

        async def admit(request: Any, context: Any) -> Any:
            try:
                caller = self.auth.authenticate(metadata, context)
                rule.check(method, caller, request)
            except NotAuthenticated as exc:
                held = self._refusals.ready()
                if held is not None:
                    log.warning("refused %s from %s: %s%s", method, _peer(context), exc.why,
                                f" ({held} more refusals not logged)" if held else "")
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    self._unauthenticated(method, exc.why))
                raise  # unreachable: abort raises
            except PermissionDenied as exc:
                if self.audit is not None and rule.audited(request):
                    self._refused(method, caller, request, str(exc))
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                raise
            CALLER.set(caller)
            if request is None:
                # A request stream: say "admitted" now, in the response headers, so a client
                # can wait for them before it writes: one that writes into a refused call
                # may see INTERNAL instead of the refusal (grpc.aio, grpc/grpc#36066).
                await context.send_initial_metadata(((ADMITTED_HEADER, str(caller.role)),))
            return request

        if self.audit is None:
            return wrap_handler(handler, admit, handler.request_deserializer)

        def finish(request: Any, response: Any, exc: BaseException | None, context: Any) -> None:
            if not rule.audited(request) or REDIRECTED.get() or rule.audit_by_servicer:
                return
            caller = CALLER.get()
            if caller is None:  # refused before admission: recorded there
                return
            result, message = _outcome(exc, context)
            self._record(method, caller, request, response, result, message)

        return wrap_handler(handler, admit, handler.request_deserializer, finish=finish)

    def _refused(self, method: str, caller: Caller, request: Any, message: str) -> None:
        """A refused call: recorded as any call for the credential's first
        ``REFUSED_RECORDED`` in a window, then counted; the window's end records one summary
        entry of what was held back. Its INFO line is a short summary of what the daemon
        knows (method, role, credential, peer), never the caller's fields."""
        tally = self._denied.get(caller.credential)
        if tally is None:
            tally = self._denied[caller.credential] = _Refusals(caller)
            asyncio.get_running_loop().call_later(self.refused_window,
                                                  self._refusals_summary, caller.credential)
        short = method.lstrip("/").removeprefix("tether.v1.")
        if tally.recorded < REFUSED_RECORDED:
            tally.recorded += 1
            self._record(method, caller, request, None, "PERMISSION_DENIED", message,
                         summary=f"refused {short} for {caller.role} {caller.credential} "
                                 f"from {clip(caller.peer, 80)}: PERMISSION_DENIED")
        else:
            tally.held[short] += 1

    def _refusals_summary(self, credential: str) -> None:
        tally = self._denied.pop(credential, None)
        if tally is None or not tally.held or self.audit is None:
            return
        c = tally.caller
        total = sum(tally.held.values())
        calls = ", ".join(f"{m} x{n}" for m, n in tally.held.most_common(10))
        more = len(tally.held) - 10
        message = (f"{total} more refused call(s) of this credential within "
                   f"{self.refused_window:g} s were not recorded one by one (the first "
                   f"{REFUSED_RECORDED} were): {calls}" + (f" and {more} other methods"
                                                           if more > 0 else ""))
        self.audit.record({
            "time": timestamp(time.time()), "method": "(refused calls)", "role": str(c.role),
            "credential": c.credential, "proof": c.proof.value, "peer": c.peer,
            "result": "PERMISSION_DENIED", "message": message,
            "details": {"refused": str(total), "since": timestamp(tally.started)},
        }, summary=f"refused {total} more call(s) for {c.role} {c.credential} within "
                   f"{self.refused_window:g} s: {calls}")

    def _record(self, method: str, caller: Caller, request: Any, response: Any, result: str,
                message: str, summary: str = "") -> None:
        assert self.audit is not None
        self.audit.record(audit_entry(method, caller, request, response, result, message),
                          summary=summary)


def audit_entry(method: str, caller: Caller, request: Any, response: Any, result: str,
                message: str, details: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One audit log line: who called ``method`` (``/tether.v1.Service/Method``), about
    what (a whitelist of the request's fields, plus ``details``), and how it ended."""
    entry: dict[str, Any] = {
        "time": timestamp(time.time()),
        "method": method.lstrip("/").removeprefix("tether.v1."),
        "role": str(caller.role), "credential": _short(caller.credential),
        "proof": caller.proof.value, "peer": _short(caller.peer), "result": result,
    }
    try:
        entry.update(audit_fields(request, response))
    except Exception:  # never let the audit break a call it describes
        log.exception("audit: cannot describe a %s call", method)
    if details:
        entry.setdefault("details", {}).update(details)
    if message:
        entry["message"] = message[:1000]
    return entry
