"""The operations listener (``--metrics-listen HOST:PORT``): Prometheus and people.

* ``GET /metrics``: the injected registry, in the format the scraper asks for
  (Prometheus text or OpenMetrics, gzip when accepted), as prometheus_client's own
  server answers.
* ``GET /healthz``: ``200 ok`` when the daemon serves: its event loop answered within
  ``ANSWER_WITHIN`` seconds; ``503`` with the reason otherwise (loop stuck, shutting
  down). For load balancers and liveness probes.
* ``GET /status``: one JSON object a person can read (groups by state, unhealthy
  groups, orphans now, the last cleanup and its result, agents up and unreachable);
  see README "Metrics". No credential is checked here, so it holds counts, states,
  group ids and check details only: no names, addresses, commands or environments.

The server runs on daemon threads (``http.server``); nothing here touches the
daemon's state from those threads. ``/status`` hands a snapshot function to the
event loop (``call_soon_threadsafe``) and waits for its answer, so the snapshot
is taken between two steps of the loop, never while a group changes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("tether.ops")

#: /healthz and /status answer 503 when the event loop has not answered this long.
ANSWER_WITHIN = 2.0

Snapshot = Callable[[], dict[str, Any]]
"""Builds the /status object; called on the event loop."""


class OpsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 loop: asyncio.AbstractEventLoop, status: Snapshot | None) -> None:
        self.address_family = socket.getaddrinfo(address[0], address[1], 0,
                                                 socket.SOCK_STREAM)[0][0]
        self.registry = registry
        self.loop = loop
        self.status = status
        self.closing = False
        super().__init__(address, _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the event loop; its result, or raise ``TimeoutError`` if the loop
        did not get to it within ``ANSWER_WITHIN`` (or is closed)."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn())
                except Exception as exc:
                    done.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError as exc:  # the loop is closed
            raise TimeoutError("the event loop is closed") from exc
        try:
            return done.result(ANSWER_WITHIN)
        except concurrent.futures.TimeoutError:
            done.cancel()
            raise TimeoutError(f"the event loop did not answer within {ANSWER_WITHIN:g} s "
                               "(it is busy or stuck)") from None

    def close(self) -> None:
        self.closing = True
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: OpsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._metrics(head)
            elif path == "/healthz":
                self._healthz(head)
            elif path == "/status":
                self._status(head)
            else:
                self._send(404, b"not found; try /metrics, /healthz or /status\n",
                           "text/plain; charset=utf-8", head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _metrics(self, head: bool) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.registry)
        extra = {}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            extra["Content-Encoding"] = "gzip"
        self._send(200, body, content_type, head, extra)

    def _healthz(self, head: bool) -> None:
        if self.server.closing:
            self._send(503, b"shutting down\n", "text/plain; charset=utf-8", head)
            return
        try:
            self.server.on_loop(lambda: True)
        except TimeoutError as exc:
            self._send(503, f"{exc}\n".encode(), "text/plain; charset=utf-8", head)
            return
        self._send(200, b"ok\n", "text/plain; charset=utf-8", head)

    def _status(self, head: bool) -> None:
        snapshot = self.server.status
        if snapshot is None:
            self._send(404, b"no status here\n", "text/plain; charset=utf-8", head)
            return
        try:
            body = self.server.on_loop(snapshot)
            code = 503 if self.server.closing else 200
        except TimeoutError as exc:
            body, code = {"error": str(exc)}, 503
        except Exception as exc:
            log.exception("/status failed")
            body, code = {"error": f"the status could not be built: {exc}"}, 500
        self._send(code, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode(),
                   "application/json", head)

    def _send(self, code: int, body: bytes, content_type: str, head: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def iso(at: float) -> str:
    """``time.time()`` as an ISO 8601 UTC timestamp with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def serve_ops(registry: CollectorRegistry, address: str, status: Snapshot | None = None
              ) -> OpsServer:
    """Start the listener on HOST:PORT (port 0 picks one) on a daemon thread; call it from
    the event loop that ``status`` reads. It checks no credential: bound to anything but
    loopback, it says so at start-up (WARNING), with what it shows."""
    from tether.rpc.daemon import ListenError, is_loopback

    host, _, port_text = address.rpartition(":")
    bound = host.strip("[]") or "127.0.0.1"
    try:
        server = OpsServer((bound, int(port_text)), registry,
                           asyncio.get_running_loop(), status)
    except (OSError, ValueError) as exc:
        raise ListenError(address, f"metrics: {exc}; pick another --metrics-listen") from exc
    threading.Thread(target=server.serve_forever, name="tether-ops", daemon=True).start()
    if not is_loopback(f"{bound}:{port_text}"):
        log.warning(
            "metrics listener on %s (not loopback) answers anyone who reaches it, without a "
            "credential: /metrics (counts by state and class: groups, sessions, agents, "
            "cleanups, signals, start failures) and /status (the same counts, unhealthy "
            "group ids with what their last check saw, orphans, the last cleanup; no names, "
            "addresses, commands or environments); bind it to 127.0.0.1 or keep the port "
            "to your scrapers (firewall, NetworkPolicy)", address)
    return server
