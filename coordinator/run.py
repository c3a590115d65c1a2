"""`tether coordinator` and `tether serve` (coordinator plus a local agent, one process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter

import tether
from tether.coordinator.agent_client import AgentClient
from tether.coordinator.core import Coordinator, CoordinatorConfig
from tether.coordinator.grpc_agent import GrpcAgentClient
from tether.coordinator.leader import LeaderAgentClient, Leadership, Sole
from tether.coordinator.metrics import CoordinatorMetrics, coordinator_status
from tether.coordinator.service import CoordinatorServicer, add_to_server
from tether.coordinator.sqlite_store import SQLiteStore
from tether.coordinator.store import Store
from tether.core.audit import AuditLog
from tether.core.errors import TetherError
from tether.core.private import StateDirBusy, exposed, lock_private, private_dir
from tether.core.sessions import AgentInfo
from tether.rpc.auth import IN_PROCESS_CREDENTIAL, ServerAuth
from tether.rpc.daemon import Shutdown, TLSFiles, start_server
from tether.rpc.ops import OpsServer, Snapshot, serve_ops
from tether.rpc.security import ClientSecurity

log = logging.getLogger(__name__)


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return os.path.join(base, "tether")


@dataclass
class CoordinatorDaemonConfig:
    listen: str = "127.0.0.1:7400"
    state_dir: str = field(default_factory=default_state_dir)
    metrics_listen: str = ""
    heartbeat_interval: float = 1.0
    agent_ttl: float = 5.0
    tls: TLSFiles = field(default_factory=TLSFiles)
    insecure: bool = False
    auth: ServerAuth = field(default_factory=ServerAuth)
    dial: ClientSecurity = field(default_factory=ClientSecurity)
    retain_stopped: float = 7 * 24 * 3600.0
    #: Lease streams one credential may hold open at once (ten times this in all).
    max_lease_streams: int = 1000
    #: Logs calls one credential may have open at once.
    max_logs_streams: int = 64
    #: A PostgreSQL URL shared by several coordinators (one leads); empty: SQLite in
    #: state_dir, this coordinator alone.
    store: str = ""
    #: HOST:PORT clients and agents are sent to while this coordinator leads.
    advertise: str = ""
    #: The leader's lease, renewed every third of it; a standby takes over once it lapses.
    leader_ttl: float = 3.0


def claim_state_dir(path: str) -> int:
    """Make the state directory (private) and lock it for this coordinator: a second one
    on the same directory would fight over its database and stop intents. Returns the
    lock's descriptor (held until the process ends)."""
    private_dir(path)
    if exposed(path):
        log.warning("state directory %s is readable by other users; it holds spawn "
                    "environments and the audit log: chmod 700 it", path)
    lock = os.path.join(path, "coordinator.lock")
    try:
        return lock_private(lock, "coordinator")
    except StateDirBusy as exc:
        raise StateDirBusy(
            lock, "coordinator", exc.holder,
            f"another coordinator (pid {exc.holder}) uses state directory {path}; stop it, "
            "or give this one another --state-dir") from None


def audit_log(state_dir: str) -> AuditLog:
    return AuditLog(Path(state_dir) / "audit.jsonl")


async def open_store(cfg: CoordinatorDaemonConfig) -> Store:
    """The store ``cfg`` names: PostgreSQL for ``--store``, else SQLite in the state dir."""
    if not cfg.store:
        return SQLiteStore(Path(cfg.state_dir) / "coordinator.sqlite3")
    if not cfg.store.startswith(("postgresql://", "postgres://")):
        raise TetherError("--store takes a PostgreSQL URL (postgresql://USER@HOST:PORT/DB); "
                          "leave it out for SQLite in --state-dir")
    try:
        from tether.coordinator.postgres_store import PostgresStore
    except ImportError as exc:
        raise TetherError(f"--store postgresql://... needs psycopg ({exc}): install tether "
                          "with its postgresql extra, `pip install 'tether[postgresql]'`") \
            from None
    return await PostgresStore.open(cfg.store, lease_ttl=cfg.leader_ttl)


def dial_settings(cfg: CoordinatorDaemonConfig) -> ClientSecurity:
    # The token is read once, here: never a file read on the event loop per agent dialed.
    dial = cfg.dial.loaded()
    if dial.server_name:
        log.warning("--tls-server-name %s: every agent's certificate is checked for that one "
                    "name, not for the agent's own; any holder of it can pose as any agent",
                    dial.server_name)
    return dial


def make_coordinator(cfg: CoordinatorDaemonConfig, store: Store, metrics: CoordinatorMetrics,
                     dial: ClientSecurity, lead: Leadership | None,
                     local_agent: str = "") -> Coordinator:
    """A coordinator for one term: its calls to agents carry the term's epoch and are made
    only while the term holds."""

    def connect(info: AgentInfo) -> AgentClient:
        if lead is None:
            return GrpcAgentClient(info.name, info.address, dial)
        inner = GrpcAgentClient(info.name, info.address, dial, epoch=lambda: lead.epoch,
                                holder=lead.term.holder)
        return LeaderAgentClient(inner, lead, info.name)

    return Coordinator(
        CoordinatorConfig(state_dir=cfg.state_dir, heartbeat_interval=cfg.heartbeat_interval,
                          agent_ttl=cfg.agent_ttl, local_agent=local_agent, connect=connect,
                          retain_stopped=cfg.retain_stopped,
                          max_lease_streams_per_credential=cfg.max_lease_streams,
                          max_lease_streams=10 * cfg.max_lease_streams,
                          max_logs_streams_per_credential=cfg.max_logs_streams),
        store, metrics, lead.term if lead is not None else None)


async def build_coordinator(cfg: CoordinatorDaemonConfig, registry: CollectorRegistry,
                            local_agent: str = "", store: Store | None = None,
                            write_errors: Counter | None = None) -> Coordinator:
    """A coordinator alone on its store (SQLite): it takes the lease once, for an epoch
    above its previous run's, so agents obey this run and never the one before."""
    store = store or await open_store(cfg)
    metrics = CoordinatorMetrics(registry, write_errors)
    try:
        lead = await Sole(store).take() if isinstance(store, SQLiteStore) else None
        coordinator = make_coordinator(cfg, store, metrics, dial_settings(cfg), lead,
                                       local_agent)
        await coordinator.load()
    except BaseException:
        await store.close()
        raise
    metrics.attach(coordinator)
    return coordinator


async def _phases(phases: list[tuple[str, Callable[[], Awaitable[None]]]]) -> None:
    """Run every shutdown phase, each even if an earlier one failed (logged)."""
    for n, (what, phase) in enumerate(phases, 1):
        log.info("shutdown %d/%d: %s", n, len(phases), what)
        try:
            await phase()
        except Exception:
            log.exception("shutdown %d/%d (%s) failed; going on", n, len(phases), what)


def _stop_metrics(server: OpsServer | None) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        if server is not None:
            server.close()

    return stop


def status_of(coordinator: Coordinator) -> Snapshot:
    metrics = coordinator.hooks
    assert isinstance(metrics, CoordinatorMetrics)

    def status() -> dict[str, Any]:
        return {"role": "coordinator", **coordinator_status(coordinator, metrics)}

    return status


async def run_coordinator(cfg: CoordinatorDaemonConfig, shutdown: Shutdown) -> None:
    if cfg.store:
        await run_shared(cfg, shutdown)
        return
    registry = CollectorRegistry()
    lock = claim_state_dir(cfg.state_dir)
    audit = audit_log(cfg.state_dir)
    try:
        coordinator = await build_coordinator(cfg, registry)
    except BaseException:
        await audit.aclose()
        os.close(lock)
        raise
    server: Any = None
    metrics_server: OpsServer | None = None
    try:
        servicer = CoordinatorServicer(coordinator, audit)
        server, port, _ = await start_server(
            cfg.listen, [lambda s: add_to_server(s, servicer)], ["tether.v1.CoordinatorService"],
            cfg.tls, cfg.insecure, auth=cfg.auth, audit=audit, label="this coordinator")
        if cfg.metrics_listen:
            metrics_server = serve_ops(registry, cfg.metrics_listen, status_of(coordinator))
        coordinator.start()
        host = cfg.listen.rsplit(":", 1)[0]
        print(f"tether coordinator listening on {host}:{port} (state in {cfg.state_dir})",
              flush=True)
        await shutdown.requested.wait()
    finally:
        if metrics_server is not None:
            metrics_server.closing = True  # /healthz answers 503 from now on

        async def stop_rpcs() -> None:
            if server is not None:
                await server.stop(grace=1.0)

        async def release() -> None:
            await audit.aclose()
            os.close(lock)

        await _phases([
            ("no longer accepting RPCs", stop_rpcs),
            ("stopping watchers, closing agent channels, writing state", coordinator.close),
            ("closing the store", coordinator.store.close),
            ("stopping metrics", _stop_metrics(metrics_server)),
            ("closing the audit log, releasing the state directory", release),
        ])


def advertised(cfg: CoordinatorDaemonConfig, port: int) -> str:
    """Where clients and agents are sent while this coordinator leads."""
    if cfg.advertise:
        return cfg.advertise
    host = cfg.listen.rsplit(":", 1)[0]
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
        log.warning("no --advertise: clients will be sent to %s:%d while this coordinator "
                    "leads; give --advertise HOST:PORT if they reach it by another name",
                    host, port)
    return f"{host}:{port}"


async def run_shared(cfg: CoordinatorDaemonConfig, shutdown: Shutdown) -> None:
    """A coordinator among several on one PostgreSQL store: it leads or stands by."""
    from tether.coordinator.gate import LeaderGate
    from tether.coordinator.ha import Controller

    registry = CollectorRegistry()
    lock = claim_state_dir(cfg.state_dir)
    audit = audit_log(cfg.state_dir)
    try:
        store = await open_store(cfg)
    except BaseException:
        await audit.aclose()
        os.close(lock)
        raise
    metrics = CoordinatorMetrics(registry)
    server: Any = None
    metrics_server: OpsServer | None = None
    campaign: asyncio.Task[None] | None = None
    # No coordinator yet: the gate lets no call through to the servicer until one leads.
    servicer = CoordinatorServicer(cast(Coordinator, None), audit)

    def serve_with(coordinator: Coordinator | None) -> None:
        if coordinator is not None:
            servicer.c = coordinator

    try:
        dial = dial_settings(cfg)
        controller = Controller(
            store, cfg.advertise, cfg.leader_ttl, cfg.agent_ttl,
            lambda lead: make_coordinator(cfg, store, metrics, dial, lead), serve_with,
            registry)
        servicer.leader = controller.leader_info
        metrics.attach(lambda: controller.coordinator)
        server, port, health = await start_server(
            cfg.listen, [lambda s: add_to_server(s, servicer)], ["tether.v1.CoordinatorService"],
            cfg.tls, cfg.insecure, [LeaderGate(controller)], auth=cfg.auth, audit=audit,
            label="this coordinator")
        controller.address = controller.campaign.address = advertised(cfg, port)
        if cfg.metrics_listen:
            def status() -> dict[str, Any]:
                c = controller.coordinator
                if c is None:  # standing by (the leader's address is for credentials)
                    info = controller.leader_info()
                    return {"role": "standby", "leader_known": bool(info.leader),
                            "epoch": info.epoch}
                return {**status_of(c)(), "role": "leader"}

            metrics_server = serve_ops(registry, cfg.metrics_listen, status)
        campaign = asyncio.get_running_loop().create_task(controller.run(health),
                                                          name="campaign")
        host = cfg.listen.rsplit(":", 1)[0]
        print(f"tether coordinator listening on {host}:{port} (store {store.where}, "
              f"advertised as {controller.address}, state in {cfg.state_dir})", flush=True)
        await shutdown.requested.wait()
    finally:
        async def resign() -> None:
            if campaign is not None:
                campaign.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await campaign
                await controller.resign()

        async def stop_rpcs() -> None:
            if server is not None:
                await server.stop(grace=1.0)

        async def release() -> None:
            await audit.aclose()
            os.close(lock)

        if metrics_server is not None:
            metrics_server.closing = True  # /healthz answers 503 from now on
        await _phases([
            ("stepping down, handing the lease to a standby", resign),
            ("no longer accepting RPCs", stop_rpcs),
            ("closing the store", store.close),
            ("stopping metrics", _stop_metrics(metrics_server)),
            ("closing the audit log, releasing the state directory", release),
        ])


async def run_serve(cfg: CoordinatorDaemonConfig, agent_cfg: Any, shutdown: Shutdown) -> None:
    """Coordinator and a local agent on one gRPC server, in one process."""
    from tether.agent.run import AgentRuntime, shutdown_with_escalation
    from tether.coordinator.inprocess import InProcessAgent

    registry = CollectorRegistry()
    lock = claim_state_dir(cfg.state_dir)
    agent_cfg.state_dir = agent_cfg.state_dir or os.path.join(cfg.state_dir, "agent")
    try:
        audit = audit_log(cfg.state_dir)
        try:
            runtime = AgentRuntime(agent_cfg, registry)
        except BaseException:
            await audit.aclose()
            raise
    except BaseException:
        os.close(lock)
        raise
    coordinator: Coordinator | None = None
    server: Any = None
    metrics_server: OpsServer | None = None
    try:
        coordinator = await build_coordinator(
            cfg, registry, local_agent=agent_cfg.name,
            write_errors=runtime.metrics.state_write_errors)
        servicer = CoordinatorServicer(coordinator, audit)
        # One listener, both services: the role table covers both (an operator token may
        # spawn through the coordinator, not call the agent API directly).
        server, port, _ = await start_server(
            cfg.listen, [lambda s: add_to_server(s, servicer), *runtime.registrations()],
            ["tether.v1.CoordinatorService", "tether.v1.AgentService"], cfg.tls, cfg.insecure,
            auth=cfg.auth, audit=audit, label="tether serve")
        runtime.port = port
        if cfg.metrics_listen:
            coordinator_part = status_of(coordinator)

            def status() -> dict[str, Any]:
                agent = runtime.status()
                return {**coordinator_part(), "role": "serve", "orphans": agent["orphans"],
                        "agent": agent}

            metrics_server = serve_ops(registry, cfg.metrics_listen, status)
        host = cfg.listen.rsplit(":", 1)[0]
        # Recover first: the coordinator reconciles with what the agent knows after it.
        await runtime.start_background()
        address = f"{host}:{port}"
        # A credential no network caller can present: nobody can take this name over.
        coordinator.agents.register(
            AgentInfo(agent_cfg.name, address, runtime.local.containment, tether.__version__,
                      runtime.epoch, instance=runtime.instance.marker,
                      credential=IN_PROCESS_CREDENTIAL),
            client=InProcessAgent(runtime.authority, address, runtime.epoch,
                                  runtime.list_orphans),
            always_up=True)
        coordinator.start()
        print(f"tether serve listening on {host}:{port} (coordinator + agent {agent_cfg.name!r}, "
              f"containment {runtime.local.containment.value}, state in {cfg.state_dir})",
              flush=True)
        await shutdown.requested.wait()
    finally:
        if metrics_server is not None:
            metrics_server.closing = True  # /healthz answers 503 from now on

        async def stop_rpcs() -> None:
            if server is not None:
                await server.stop(grace=1.0)

        async def stop_agent() -> None:
            await shutdown_with_escalation(runtime, None, shutdown)
            # The agent's groups ended in its shutdown; record their exits before closing.
            if coordinator is not None:
                for view in runtime.authority.views():
                    coordinator.absorb(agent_cfg.name, view)

        async def close_coordinator() -> None:
            if coordinator is not None:
                await coordinator.close()
                await coordinator.store.close()

        async def release() -> None:
            await audit.aclose()
            os.close(lock)

        await _phases([
            ("no longer accepting RPCs", stop_rpcs),
            ("stopping the agent's kill-policy groups", stop_agent),
            ("closing the coordinator and its store", close_coordinator),
            ("stopping metrics", _stop_metrics(metrics_server)),
            ("closing the audit log, releasing the state directory", release),
        ])
