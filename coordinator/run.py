"""`tether coordinator` and `tether serve` (coordinator plus a local agent, one process)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

import tether
from tether.agent.metrics import serve_metrics
from tether.coordinator.core import Coordinator, CoordinatorConfig
from tether.coordinator.metrics import CoordinatorMetrics
from tether.coordinator.service import CoordinatorServicer, add_to_server
from tether.coordinator.store import Store
from tether.rpc.daemon import Shutdown, TLSFiles, start_server
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


def build_coordinator(cfg: CoordinatorDaemonConfig, registry: CollectorRegistry,
                      local_agent: str = "") -> Coordinator:
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    store = Store(Path(cfg.state_dir) / "coordinator.sqlite3")
    metrics = CoordinatorMetrics(registry)
    coordinator = Coordinator(
        CoordinatorConfig(state_dir=cfg.state_dir, heartbeat_interval=cfg.heartbeat_interval,
                          agent_ttl=cfg.agent_ttl, local_agent=local_agent, dial=cfg.dial),
        store, metrics)
    metrics.attach(coordinator)
    return coordinator


async def run_coordinator(cfg: CoordinatorDaemonConfig, shutdown: Shutdown) -> None:
    registry = CollectorRegistry()
    coordinator = build_coordinator(cfg, registry)
    server = None
    metrics_server: Any = None
    try:
        servicer = CoordinatorServicer(coordinator)
        server, port, _ = await start_server(
            cfg.listen, [lambda s: add_to_server(s, servicer)], ["tether.v1.CoordinatorService"],
            cfg.tls, cfg.insecure, [AuthInterceptor(cfg.auth, "this coordinator")])
        if cfg.metrics_listen:
            metrics_server, _ = serve_metrics(registry, cfg.metrics_listen)
        coordinator.start()
        host = cfg.listen.rsplit(":", 1)[0]
        print(f"tether coordinator listening on {host}:{port} (state in {cfg.state_dir})",
              flush=True)
        await shutdown.requested.wait()
    finally:
        log.info("shutdown 1/3: no longer accepting RPCs")
        if server is not None:
            await server.stop(grace=1.0)
        log.info("shutdown 2/3: stopping watchers and closing agent channels")
        await coordinator.close()
        coordinator.store.close()
        log.info("shutdown 3/3: stopping metrics")
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()


async def run_serve(cfg: CoordinatorDaemonConfig, agent_cfg: Any, shutdown: Shutdown) -> None:
    """Coordinator and a local agent on one gRPC server, in one process."""
    from tether.agent.run import AgentRuntime
    from tether.coordinator.inprocess import InProcessAgentStub
    from tether.rpc.convert import CONTAINMENT_TO_PB
    from tether.v1 import coordinator_pb2 as cpb

    registry = CollectorRegistry()
    agent_cfg.state_dir = agent_cfg.state_dir or os.path.join(cfg.state_dir, "agent")
    Path(agent_cfg.state_dir).mkdir(parents=True, exist_ok=True)
    runtime = AgentRuntime(agent_cfg, registry)
    coordinator = build_coordinator(cfg, registry, local_agent=agent_cfg.name)
    server = None
    metrics_server: Any = None
    try:
        servicer = CoordinatorServicer(coordinator)
        server, port, _ = await start_server(
            cfg.listen, [lambda s: add_to_server(s, servicer), *runtime.registrations()],
            ["tether.v1.CoordinatorService", "tether.v1.AgentService"], cfg.tls, cfg.insecure,
            [AuthInterceptor(cfg.auth, "tether serve")])
        runtime.port = port
        if cfg.metrics_listen:
            metrics_server, _ = serve_metrics(registry, cfg.metrics_listen)
        host = cfg.listen.rsplit(":", 1)[0]
        # Recover first: the coordinator reconciles with what the agent knows after it.
        await runtime.start_background()
        coordinator.register_agent(cpb.RegisterAgentRequest(
            name=agent_cfg.name, address=f"{host}:{port}", version=tether.__version__,
            containment=CONTAINMENT_TO_PB[runtime.local.containment], epoch=runtime.epoch,
            instance=runtime.instance.marker),
            always_up=True, local=InProcessAgentStub(runtime.servicer))
        coordinator.start()
        print(f"tether serve listening on {host}:{port} (coordinator + agent {agent_cfg.name!r}, "
              f"containment {runtime.local.containment.value}, state in {cfg.state_dir})",
              flush=True)
        await shutdown.requested.wait()
    finally:
        log.info("shutdown: no longer accepting RPCs")
        if server is not None:
            await server.stop(grace=1.0)
        from tether.agent.run import shutdown_with_escalation

        await shutdown_with_escalation(runtime, None, shutdown)
        # The agent's groups ended in its shutdown; record their exits before closing.
        from tether.rpc.convert import group_to_pb as to_pb

        for view in runtime.authority.views():
            coordinator.absorb(agent_cfg.name, to_pb(view), "exit")
        await coordinator.close()
        coordinator.store.close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()

