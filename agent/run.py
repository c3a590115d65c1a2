"""`tether agent`: build the agent, serve it, register with a coordinator, shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

import tether
from tether.agent.authority import Authority, Hooks
from tether.agent.convert import CONTAINMENT_TO_PB
from tether.agent.daemon import Shutdown, TLSFiles, start_server
from tether.agent.metrics import AgentMetrics, HookChain, serve_metrics
from tether.agent.service import AgentServicer, add_to_server
from tether.signallers.base import SignallerContext
from tether.signallers.local import LocalSignaller
from tether.signallers.registry import Signallers

log = logging.getLogger("tether.agent.run")


@dataclass
class AgentConfig:
    name: str = "local"
    listen: str = "127.0.0.1:7401"
    state_dir: str = ""
    coordinator: str = ""
    # The address the coordinator should dial (defaults to listen).
    advertise: str = ""
    metrics_listen: str = ""
    containment: str = "auto"
    default_grace: float | None = None
    orphan_reaping: str = "kill"  # or "report"
    signaller_options: dict[str, str] = field(default_factory=dict)
    tls: TLSFiles = field(default_factory=TLSFiles)
    insecure: bool = False
    guardian: bool = True


class AgentRuntime:
    """The agent's parts, owned in one place, started and stopped in order."""

    def __init__(self, config: AgentConfig, registry: CollectorRegistry | None = None,
                 extra_hooks: Hooks | None = None) -> None:
        self.config = config
        self.epoch = secrets.token_hex(6)
        self.registry = registry or CollectorRegistry()
        opts = {"containment": config.containment, **config.signaller_options}
        self.context = SignallerContext(config.name, config.state_dir, opts)
        self.signallers = Signallers(self.context)
        self.local = LocalSignaller(self.context)
        self.signallers.add(self.local)
        self.metrics = AgentMetrics(self.registry)
        hooks: Hooks = self.metrics if extra_hooks is None else HookChain(self.metrics, extra_hooks)
        self.authority = Authority(config.name, self.signallers, hooks, config.default_grace)
        self.metrics.attach(self.authority)
        self.servicer = AgentServicer(self.authority)
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._register_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def registrations(self) -> list[Any]:
        return [lambda server: add_to_server(server, self.servicer)]

    async def start_metrics(self) -> None:
        if self.config.metrics_listen:
            self._metrics_server, self.metrics_port = serve_metrics(
                self.registry, self.config.metrics_listen)
            log.info("metrics on http://%s:%d/metrics",
                     self.config.metrics_listen.rsplit(":", 1)[0], self.metrics_port)

    def start_registration(self) -> None:
        if self.config.coordinator:
            self._register_task = asyncio.get_running_loop().create_task(
                self._register_loop(), name="register")

    async def _register_loop(self) -> None:
        from tether.v1 import coordinator_pb2 as cpb
        from tether.v1 import coordinator_pb2_grpc as cgrpc

        advertise = self.config.advertise or self.address
        request = cpb.RegisterAgentRequest(
            name=self.config.name, address=advertise, version=tether.__version__,
            containment=CONTAINMENT_TO_PB[self.local.containment], epoch=self.epoch)
        backoff = 0.2
        async with grpc.aio.insecure_channel(self.config.coordinator) as channel:
            stub = cgrpc.CoordinatorServiceStub(channel)
            while True:
                try:
                    reply = await stub.RegisterAgent(request, timeout=5)
                    log.info("registered with coordinator %s as %r (%s)", self.config.coordinator,
                             self.config.name, advertise)
                    backoff = 0.2
                    while True:
                        await asyncio.sleep(reply.heartbeat_interval_seconds)
                        beat = await stub.Heartbeat(
                            cpb.HeartbeatRequest(name=self.config.name, epoch=self.epoch),
                            timeout=5)
                        if not beat.known:
                            break
                except grpc.aio.AioRpcError as exc:
                    log.warning("coordinator %s: %s; retrying in %.1f s", self.config.coordinator,
                                exc.details() or exc.code().name, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)

    async def shutdown(self, server: grpc.aio.Server | None) -> None:
        """Ordered: stop RPCs, stop kill-policy groups, stop watchers, close, stop metrics."""
        if server is not None:
            log.info("shutdown 1/5: no longer accepting RPCs")
            await server.stop(grace=1.0)
        log.info("shutdown 2/5: stopping every group whose orphan policy is kill")
        await self.authority.shutdown()
        log.info("shutdown 3/5: stopping registration and watchers")
        if self._register_task is not None:
            self._register_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._register_task
        log.info("shutdown 4/5: closing signallers")
        await self.signallers.aclose()
        log.info("shutdown 5/5: stopping metrics")
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()


async def run_agent(config: AgentConfig, shutdown: Shutdown,
                    started: asyncio.Future[AgentRuntime] | None = None) -> None:
    runtime = AgentRuntime(config)
    server = None
    try:
        server, runtime.port, _ = await start_server(
            config.listen, runtime.registrations(), ["tether.v1.AgentService"], config.tls,
            config.insecure)
        await runtime.start_metrics()
        log.info("agent %r listening on %s (containment %s)", config.name, runtime.address,
                 runtime.local.containment.value)
        print(f"tether agent {config.name} listening on {runtime.address}", flush=True)
        runtime.start_registration()
        if started is not None:
            started.set_result(runtime)
        await shutdown.requested.wait()
    finally:
        await runtime.shutdown(server)
