"""`tether agent`: build the agent, serve it, register with a coordinator, shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

import tether
from tether.agent import identity, users
from tether.agent import plugins as plugin_registry
from tether.agent.authority import Authority
from tether.agent.capacity import Capacity, raise_fd_limit
from tether.agent.fence import Fence, FenceInterceptor
from tether.agent.hooks import HookChain, Hooks
from tether.agent.keeper import PipeKeeper
from tether.agent.metrics import AgentMetrics, agent_status
from tether.agent.orphans import OrphanReaper
from tether.agent.plugins import Plugins
from tether.agent.ports import PortBook
from tether.agent.registration import Registration
from tether.agent.service import AgentServicer, add_to_server
from tether.agent.state import AgentStore
from tether.core.audit import AuditLog
from tether.core.errors import TetherError
from tether.core.model import (
    Containment,
    GroupState,
    GroupView,
    OrphanPolicy,
    context_from_dict,
    spec_from_dict,
)
from tether.core.output import DEFAULT_RING, DEFAULT_TOTAL, OutputBook
from tether.core.sessions import Orphan
from tether.core.tasks import TaskSet
from tether.rpc.auth import ServerAuth
from tether.rpc.convert import CONTAINMENT_TO_PB
from tether.rpc.daemon import Shutdown, TLSFiles, start_server
from tether.rpc.ops import OpsServer, serve_ops
from tether.rpc.security import ClientSecurity
from tether.signallers.base import Reattach, SignallerContext
from tether.signallers.cgroups import safe_name
from tether.signallers.local import LocalSignaller
from tether.signallers.registry import Signallers

log = logging.getLogger(__name__)


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
    # Who may call this agent (tokens, client-certificate identities); open when empty.
    auth: ServerAuth = field(default_factory=ServerAuth)
    # How this agent dials its coordinator (TLS roots, client certificate, token).
    dial: ClientSecurity = field(default_factory=ClientSecurity)
    # Toolchain plugins turned off by name (`plugin = { nvm = false }` in the config file).
    plugins_off: list[str] = field(default_factory=list)
    # No toolchain plugins at all.
    no_plugins: bool = False
    # Captured output kept per group, and for all groups together (bytes).
    output_buffer: int = DEFAULT_RING
    output_total: int = DEFAULT_TOTAL


class _OrphanTrigger(Hooks):
    """Whenever a group ends, look for orphans (coalesced)."""

    def __init__(self) -> None:
        self.reaper: OrphanReaper | None = None

    def group_changed(self, view: GroupView) -> None:
        if view.state.ended and self.reaper is not None:
            self.reaper.request_scan()


class AgentRuntime:
    """The agent's parts, owned in one place, started and stopped in order.

    Construction claims the agent's identity (a lock in its state directory), opens
    its state file and only then creates its cgroup tree: a refused start (another
    agent holds the directory, a corrupted state file) leaves nothing behind."""

    def __init__(self, config: AgentConfig, registry: CollectorRegistry | None = None,
                 extra_hooks: Hooks | None = None) -> None:
        self.config = config
        self.epoch = secrets.token_hex(6)
        self.registry = registry or CollectorRegistry()
        self.fd_limit = raise_fd_limit()[0]
        self.instance = (identity.claim(config.state_dir, config.name) if config.state_dir
                         else identity.ephemeral(config.name))
        self.metrics = AgentMetrics(self.registry)
        self.store: AgentStore | None = None
        try:
            if config.state_dir:
                self.store = AgentStore(
                    Path(config.state_dir) / f"agent-{safe_name(config.name)}.sqlite3",
                    on_error=self.metrics.state_write_errors.labels("agent").inc)
            opts = {"containment": config.containment, **config.signaller_options}
            self.context = SignallerContext(config.name, config.state_dir, opts,
                                            instance=self.instance.marker)
            self.signallers = Signallers(self.context)
            self.local = LocalSignaller(self.context)
            self.fence = self._fence(config)
        except BaseException:
            if self.store is not None:
                self.store.close_now()
            self.instance.release()
            raise
        self.signallers.add(self.local)
        trigger = _OrphanTrigger()
        chain: list[Hooks] = [self.metrics, trigger]
        if self.store is not None:
            chain.append(self.store)
        if extra_hooks is not None:
            chain.append(extra_hooks)
        self.capacity = Capacity()
        found = [] if config.no_plugins else plugin_registry.load(disabled=config.plugins_off)
        log.info("toolchain plugins: %s", ", ".join(p.name for p in found) or "none")
        tree = self.local.tree
        self.authority = Authority(config.name, self.signallers, HookChain(*chain),
                                   config.default_grace, marker=self.instance.marker,
                                   capacity=self.capacity, plugins=Plugins(found),
                                   ports=PortBook(self.instance.marker,
                                                  tree.name if tree is not None else "",
                                                  config.name),
                                   output=OutputBook(config.output_buffer, config.output_total))
        self.keeper = PipeKeeper()
        self.authority.lc.outputs.keeper = self.keeper
        self.metrics.attach(self.authority)
        self.reaper = OrphanReaper(
            self.instance.marker, self.local.tree, self.authority.live_ids,
            config.orphan_reaping, on_detect=self.metrics.orphans_detected.inc,
            on_reap=self.metrics.orphans_reaped.inc, on_current=self.metrics.set_orphans_now,
            settle=self.authority.no_stops_running)
        trigger.reaper = self.reaper
        self.servicer = AgentServicer(self.authority, self.list_orphans, self.info_extra,
                                      self.epoch)
        self._tasks = TaskSet(log)
        self._guardian: subprocess.Popen[bytes] | None = None
        self._closing = False
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: OpsServer | None = None
        self._register_task: asyncio.Task[None] | None = None

    def _fence(self, config: AgentConfig) -> Fence:
        refused = Counter("tether_fenced_calls", "Calls refused because they came from a "
                          "coordinator epoch older than the newest this agent obeys (a "
                          "replaced leader).", registry=self.registry)
        path = (Path(config.state_dir) / f"coordinator-epoch-{safe_name(config.name)}.json"
                if config.state_dir else None)
        fence = Fence(config.name, path, on_refused=refused.inc)
        Gauge("tether_obeyed_coordinator_epoch", "The newest coordinator epoch this agent "
              "obeys (0: none seen).", registry=self.registry).set_function(lambda: fence.newest)
        return fence

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def info_extra(self) -> dict[str, Any]:
        usage = self.capacity.usage()
        return {"instance": self.instance.marker, "fd_limit": usage.limit,
                "fds_open": usage.open, "groups_left": usage.groups_left}

    async def list_orphans(self, sweep: bool) -> list[Orphan]:
        return await self.reaper.sweep(kill=sweep and self.reaper.policy == "kill")

    async def start_background(self) -> None:
        """Recover from the state file, sweep orphans, start the guardian and the reaper."""
        await self.recover()
        await self.list_orphans(sweep=self.reaper.policy == "kill")
        self._tasks.spawn(self.reaper.run(), "orphans")
        if self.config.guardian and self.store is not None:
            self._start_guardian()

    async def recover(self) -> None:
        """Re-adopt surviving `keep` groups, record `lost` for the vanished ones."""
        if self.store is None:
            return
        records = [r for r in await self.store.records() if not r.ended]
        await self.store.forget_ended()
        for r in records:
            spec = spec_from_dict(r.spec)
            kind, _, where = (r.target or "local").partition(":")
            signaller = self.signallers.get(kind)
            keep = r.orphan_policy == OrphanPolicy.KEEP.value
            handle = None
            between = r.state == GroupState.RESTARTING.value
            if keep and signaller.features.reattach and not between:
                try:
                    handle = await signaller.reattach(Reattach(
                        r.group_id, r.leader_pid, r.leader_start_time, where, r.cgroup))
                except TetherError as exc:
                    log.error("group %s: cannot re-adopt it: %s", r.group_id, exc)
            if handle is not None:
                user = None
                if spec.user:
                    try:
                        user = await users.lookup(spec.user)
                    except TetherError as exc:
                        log.error("group %s: %s; its pre-stop hook and any restart will not "
                                  "run (never as the agent's own user in its place)",
                                  r.group_id, exc)
                await self.authority.restore_running(
                    r.group_id, spec, handle, context_from_dict(r.spec.get("run_context", {})),
                    user)
                continue
            why = ("it was gone when the agent restarted" if keep else
                   "the agent died while it ran; its guardian or the orphan sweep ended it")
            if keep and not signaller.features.reattach:
                why = f"{kind} groups are not re-adopted after an agent restart"
            if between:
                why = ("the agent stopped while the group waited to restart (no run was "
                       "alive); a new agent does not restart it: spawn it again")
            self.authority.restore_lost(r.group_id, spec, Containment(r.containment), why)

    def _start_guardian(self) -> None:
        assert self.store is not None
        theirs = self.keeper.connect()
        args = [sys.executable, "-m", "tether.agent.guardian", "--agent-pid", str(os.getpid()),
                "--agent-marker", self.instance.marker, "--state", self.store.path,
                "--control-fd", str(theirs.fileno())]
        if self.instance.lock_path:
            args += ["--lock", self.instance.lock_path]
        if self.local.tree is not None:
            args += ["--cgroup-base", str(self.local.tree.base)]
        if self.local.limiter is not None:
            for tree in self.local.limiter.v1_trees():
                args += ["--v1-tree", str(tree)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        try:
            self._guardian = subprocess.Popen(args, start_new_session=True, env=env,
                                              stdin=subprocess.DEVNULL,
                                              pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        log.info("guardian started (pid %d)", self._guardian.pid)
        self._tasks.spawn(self._watch_guardian(self._guardian), "guardian-watch")

    async def _watch_guardian(self, proc: subprocess.Popen[bytes]) -> None:
        from tether.signallers.procfs import wait_pidfds

        await wait_pidfds([proc.pid], None)
        with contextlib.suppress(ChildProcessError):
            proc.wait(0)
        if not self._closing:
            log.error("guardian pid %d died (%s); starting a new one", proc.pid, proc.returncode)
            self._start_guardian()

    def registrations(self) -> list[Any]:
        return [lambda server: add_to_server(server, self.servicer)]

    def status(self) -> dict[str, Any]:
        """/status of a standalone agent (on the event loop)."""
        return {"role": "agent", "epoch": self.epoch,
                **agent_status(self.authority, self.metrics)}

    async def start_metrics(self) -> None:
        if self.config.metrics_listen:
            self._metrics_server = serve_ops(self.registry, self.config.metrics_listen,
                                             self.status)
            self.metrics_port = self._metrics_server.port
            log.info("metrics on http://%s:%d/metrics",
                     self.config.metrics_listen.rsplit(":", 1)[0], self.metrics_port)

    def start_registration(self) -> None:
        if self.config.coordinator:
            self._register_task = asyncio.get_running_loop().create_task(
                self._register_loop(), name="register")

    async def _register_loop(self) -> None:
        """Register with the coordinator (the leader, when several are given) and beat."""
        from tether.v1 import coordinator_pb2 as cpb

        request = cpb.RegisterAgentRequest(
            name=self.config.name, address=self.config.advertise or self.address,
            version=tether.__version__, containment=CONTAINMENT_TO_PB[self.local.containment],
            epoch=self.epoch, instance=self.instance.marker)
        registration = Registration(self.config.coordinator, self.config.dial, request)
        try:
            await registration.run()
        finally:
            await registration.close()

    async def shutdown(self, server: grpc.aio.Server | None) -> None:
        """Ordered: stop RPCs, stop kill-policy groups, stop watchers, close, stop metrics.
        Each phase runs even if an earlier one failed (logged): the store is always closed,
        the lock released, the guardian let go."""
        self._closing = True
        if self._metrics_server is not None:
            self._metrics_server.closing = True  # /healthz answers 503 from now on
        phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("no longer accepting RPCs", lambda: self._stop_server(server)),
            ("stopping every group whose orphan policy is kill", self._stop_groups),
            ("stopping registration and watchers", self._stop_background),
            ("closing signallers", self.signallers.aclose),
            ("stopping metrics and closing the state file", self._close),
        ]
        for n, (what, phase) in enumerate(phases, 1):
            log.info("shutdown %d/%d: %s", n, len(phases), what)
            try:
                await phase()
            except Exception:
                log.exception("shutdown %d/%d (%s) failed; going on", n, len(phases), what)

    @staticmethod
    async def _stop_server(server: grpc.aio.Server | None) -> None:
        if server is not None:
            await server.stop(grace=1.0)

    async def _stop_groups(self) -> None:
        await self.authority.shutdown()

    async def _stop_background(self) -> None:
        await self._tasks.cancel_all()
        if self._register_task is not None:
            self._register_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._register_task

    async def _close(self) -> None:
        try:
            if self._metrics_server is not None:
                self._metrics_server.close()
        finally:
            try:
                if self.store is not None:
                    await self.store.aclose()
            finally:
                self.instance.release()
                left = [g.group_id for g in self.authority.groups() if not g.state.ended
                        and g.spec.orphan_policy is OrphanPolicy.KILL]
                if left:
                    log.error("%d kill-policy group(s) could not be stopped (%s); the guardian "
                              "stays and ends them when this agent has exited", len(left),
                              ", ".join(left[:5]))
                elif self._guardian is not None and self.keeper.held:
                    log.info("the guardian stays: it keeps the output of %d keep group(s) "
                             "flowing once this agent has exited", self.keeper.held)
                elif self._guardian is not None:
                    # Every `kill` group is stopped; the guardian would find nothing.
                    self._guardian.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        await asyncio.to_thread(self._guardian.wait, 5)


async def run_agent(config: AgentConfig, shutdown: Shutdown,
                    started: asyncio.Future[AgentRuntime] | None = None) -> None:
    config.dial = config.dial.loaded()  # a bad client token file stops the start-up here
    runtime = AgentRuntime(config)
    server = None
    audit: AuditLog | None = None
    try:
        # Lifecycle calls on this agent, whoever makes them, in its state directory.
        audit = AuditLog(Path(config.state_dir) / "audit.jsonl" if config.state_dir else None)
        server, runtime.port, _ = await start_server(
            config.listen, runtime.registrations(), ["tether.v1.AgentService"], config.tls,
            config.insecure, [FenceInterceptor(runtime.fence)], auth=config.auth, audit=audit,
            label="this agent")
        await runtime.start_metrics()
        # Recover and sweep before announcing: a client must not race the first sweep.
        await runtime.start_background()
        log.info("agent %r listening on %s (containment %s)", config.name, runtime.address,
                 runtime.local.containment.value)
        print(f"tether agent {config.name} listening on {runtime.address}", flush=True)
        runtime.start_registration()
        if started is not None:
            started.set_result(runtime)
        await shutdown.requested.wait()
    finally:
        await shutdown_with_escalation(runtime, server, shutdown)
        if audit is not None:
            await audit.aclose()


async def shutdown_with_escalation(runtime: AgentRuntime, server: Any,
                                   shutdown: Shutdown) -> None:
    """Ordered shutdown; a second SIGINT meanwhile SIGKILLs what is still stopping."""
    task = asyncio.ensure_future(runtime.shutdown(server))
    escalate = asyncio.ensure_future(shutdown.escalated.wait())
    done, _ = await asyncio.wait({task, escalate}, return_when=asyncio.FIRST_COMPLETED)
    if escalate in done:
        await runtime.authority.escalate()
    else:
        escalate.cancel()
    await task

