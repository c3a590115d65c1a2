"""`tether coordinator` and `tether serve` (coordinator plus a local agent, one process)."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

import tether
from tether.coordinator.agent_client import AgentClient
from tether.coordinator.core import Coordinator, CoordinatorConfig
from tether.coordinator.grpc_agent import GrpcAgentClient
from tether.coordinator.metrics import CoordinatorMetrics, coordinator_status
from tether.coordinator.service import CoordinatorServicer, add_to_server
from tether.coordinator.sqlite_store import SQLiteStore
from tether.coordinator.store import Store
from tether.core.private import exposed, private_dir
from tether.core.sessions import AgentInfo
from tether.rpc.daemon import Shutdown, TLSFiles, start_server
from tether.rpc.ops import OpsServer, Snapshot, serve_ops
from tether.rpc.security import AuthInterceptor, ClientSecurity, ServerAuth

log = logging.getLogger("tether.coordinator.run")


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


def prepare_state_dir(path: str) -> None:
    private_dir(path)
    if exposed(path):
        log.warning("state directory %s is readable by other users; it holds spawn "
                    "environments: chmod 700 it", path)


async def build_coordinator(cfg: CoordinatorDaemonConfig, registry: CollectorRegistry,
                            local_agent: str = "", store: Store | None = None,
                            write_errors: Counter | None = None) -> Coordinator:
    prepare_state_dir(cfg.state_dir)
    store = store or SQLiteStore(Path(cfg.state_dir) / "coordinator.sqlite3")
    metrics = CoordinatorMetrics(registry, write_errors)
    def connect(info: AgentInfo) -> AgentClient:
        return GrpcAgentClient(info.name, info.address, cfg.dial)

    coordinator = Coordinator(
        CoordinatorConfig(state_dir=cfg.state_dir, heartbeat_interval=cfg.heartbeat_interval,
                          agent_ttl=cfg.agent_ttl, local_agent=local_agent, connect=connect),
        store, metrics)
    try:
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
    registry = CollectorRegistry()
    coordinator = await build_coordinator(cfg, registry)
    server: Any = None
    metrics_server: OpsServer | None = None
    try:
        servicer = CoordinatorServicer(coordinator)
        server, port, _ = await start_server(
            cfg.listen, [lambda s: add_to_server(s, servicer)], ["tether.v1.CoordinatorService"],
            cfg.tls, cfg.insecure, [AuthInterceptor(cfg.auth, "this coordinator")])
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

        await _phases([
            ("no longer accepting RPCs", stop_rpcs),
            ("stopping watchers, closing agent channels, writing state", coordinator.close),
            ("closing the store", coordinator.store.close),
            ("stopping metrics", _stop_metrics(metrics_server)),
        ])


async def run_serve(cfg: CoordinatorDaemonConfig, agent_cfg: Any, shutdown: Shutdown) -> None:
    """Coordinator and a local agent on one gRPC server, in one process."""
    from tether.agent.run import AgentRuntime, shutdown_with_escalation
    from tether.coordinator.inprocess import InProcessAgent

    registry = CollectorRegistry()
    prepare_state_dir(cfg.state_dir)
    agent_cfg.state_dir = agent_cfg.state_dir or os.path.join(cfg.state_dir, "agent")
    runtime = AgentRuntime(agent_cfg, registry)
    coordinator: Coordinator | None = None
    server: Any = None
    metrics_server: OpsServer | None = None
    try:
        coordinator = await build_coordinator(
            cfg, registry, local_agent=agent_cfg.name,
            write_errors=runtime.metrics.state_write_errors)
        servicer = CoordinatorServicer(coordinator)
        server, port, _ = await start_server(
            cfg.listen, [lambda s: add_to_server(s, servicer), *runtime.registrations()],
            ["tether.v1.CoordinatorService", "tether.v1.AgentService"], cfg.tls, cfg.insecure,
            [AuthInterceptor(cfg.auth, "tether serve")])
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
        coordinator.agents.register(
            AgentInfo(agent_cfg.name, address, runtime.local.containment, tether.__version__,
                      runtime.epoch, instance=runtime.instance.marker),
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

        await _phases([
            ("no longer accepting RPCs", stop_rpcs),
            ("stopping the agent's kill-policy groups", stop_agent),
            ("closing the coordinator and its store", close_coordinator),
            ("stopping metrics", _stop_metrics(metrics_server)),
        ])
