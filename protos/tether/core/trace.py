"""W3C trace context: the ``traceparent`` a caller sends, checked strictly, and the spans
daemons emit with the optional extra ``tether[otel]``.

A caller's ``traceparent`` (gRPC metadata, or the SDK's ``traceparent=``) is kept with
the group it starts (``GroupSpec.traceparent``), put in the child's environment as
``TRACEPARENT``, and carried on the group's events, records and log lines, so an editor
action can be followed to the processes it started and to their exit. A malformed one
is dropped with a log line: it never fails a call and never reaches a child.

Spans: only when OpenTelemetry's SDK is installed (``pip install tether[otel]``);
without it nothing here imports ``opentelemetry``. Daemons then use the global tracer
provider (``setup`` installs one that exports as ``OTEL_TRACES_EXPORTER`` says:
``console``, ``otlp`` with opentelemetry-exporter-otlp installed, or ``none``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: 2 hex version, 32 hex trace id, 16 hex parent id, 2 hex flags, lower case: version 00,
#: and the first 55 characters of any later version.
TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
ENV = "TRACEPARENT"
#: The gRPC metadata key (W3C's header name).
HEADER = "traceparent"
#: The longest traceparent taken (a later version may add fields; none needs more).
MAX_LENGTH = 512


def parse(value: str) -> str:
    """A W3C traceparent as version 00 (what tether carries on), or "" if malformed.

    Version 00 is exactly 55 characters. A later version is read as W3C says a parser
    should: its first 55 characters as version 00, followed by the end or by "-" and
    more fields (printable, no spaces; ignored). Version ff is invalid; so are upper-case
    hex and all-zero trace or parent ids."""
    if not isinstance(value, str) or not 55 <= len(value) <= MAX_LENGTH:
        return ""
    m = TRACEPARENT.fullmatch(value[:55])
    if m is None or m[1] == "ff" or m[2] == "0" * 32 or m[3] == "0" * 16:
        return ""
    rest = value[55:]
    if rest and (m[1] == "00" or rest[0] != "-"
                 or any(not "!" <= ch <= "~" for ch in rest)):
        return ""
    return "00" + value[2:55]


def valid(value: str) -> bool:
    """A well-formed W3C traceparent (version 00, or a later one; see ``parse``)."""
    return bool(parse(value))


def checked(value: str, where: str) -> str:
    """``value`` as a version 00 traceparent if it is a valid one, else "" (logged, never
    an error)."""
    if not value:
        return ""
    tp = parse(value)
    if tp:
        return tp
    log.warning("ignoring a malformed traceparent from %s (%r): a W3C traceparent is "
                "<2 hex version, not ff>-<32 hex>-<16 hex>-<2 hex>, lower case", where,
                value[:80])
    return ""


def from_metadata(metadata: Any, where: str) -> str:
    """The caller's traceparent from gRPC metadata (the first one; "" if none or bad)."""
    for key, value in metadata or ():
        if key == HEADER:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            return checked(text, where)
    return ""


def child_env(env: Mapping[str, str], traceparent: str) -> dict[str, str]:
    """``TRACEPARENT`` for a child: the spec's own variable wins (it was asked for)."""
    tp = parse(traceparent) if traceparent else ""
    if tp and ENV not in env:
        return {ENV: tp}
    return {}


# ---------------------------------------------------------------- spans (optional)

_tracer: Any = None
_checked = False


def enabled() -> bool:
    """OpenTelemetry's SDK is installed (checked without importing it)."""
    global _checked, _tracer
    if not _checked:
        _checked = True
        try:
            available = importlib.util.find_spec("opentelemetry.sdk") is not None
        except (ImportError, ValueError):
            available = False
        if available:
            from opentelemetry import trace

            _tracer = trace.get_tracer("tether")
    return _tracer is not None


def setup(service: str) -> None:
    """A daemon's tracer provider, if the SDK is installed and none is set yet."""
    if not enabled():
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return  # somebody (a test, an embedding program) set one up already
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    exporter: Any = None
    if kind == "console":
        exporter = ConsoleSpanExporter()
    elif kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.info("OpenTelemetry: no OTLP exporter installed "
                     "(opentelemetry-exporter-otlp); spans are not exported")
        else:
            exporter = OTLPSpanExporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


@contextlib.contextmanager
def span(name: str, traceparent: str = "", **attributes: Any) -> Iterator[Any]:
    """A span (child of ``traceparent`` when given), or nothing without the SDK. Yields
    the span (or None); an exception escaping the block is recorded on it."""
    if not enabled():
        yield None
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({HEADER: traceparent}) \
        if traceparent else None
    attrs = {f"tether.{k}": v for k, v in attributes.items() if v not in (None, "")}
    with _tracer.start_as_current_span(name, context=ctx, attributes=attrs) as s:
        yield s
