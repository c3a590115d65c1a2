"""``exec:`` probes (readiness and liveness): each check its own contained, kill-policy
tree in the group's place, with its environment, killed at its timeout.

A check is cancelled when its group stops or its start is abandoned: the tree is gone
before the cancellation goes on, whether it came mid-launch or while the check ran, so
nothing a check started outlives the group it checked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace

from tether.agent.groups import Group
from tether.agent.lifecycle import dispose
from tether.agent.probes import ExecRunner
from tether.core.errors import StartFailed, TetherError
from tether.core.model import MARKER_ENV, Limits, OrphanPolicy, StdinMode
from tether.signallers.base import GroupHandle, LaunchSpec, Signaller


async def _finish(work: asyncio.Future[None]) -> None:
    """Wait for ``work`` to end even if cancelled meanwhile; then cancel on."""
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await work
        raise


async def _launch(signaller: Signaller, launch: LaunchSpec) -> GroupHandle:
    """Launch a check's tree; a cancellation mid-launch disposes of what it started."""
    spawning = asyncio.ensure_future(signaller.spawn(launch))
    try:
        return await asyncio.shield(spawning)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await _finish(asyncio.ensure_future(dispose(await spawning)))
        raise


def exec_runner(g: Group, signaller: Signaller, base_launch: Callable[[], LaunchSpec],
                prefix: str = "probe") -> ExecRunner:
    counter = 0

    async def run(argv: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
        nonlocal counter
        counter += 1
        try:
            base = base_launch()
        except StartFailed as exc:
            return None, f"exec probe not run: {exc.message}"
        # Probes are kill-policy trees whatever the group's policy: none may outlive a
        # dead agent (a keep group's re-adoption would claim it as its own).
        probe_id = f"{g.group_id}.{prefix}{counter}"
        launch = replace(base, group_id=probe_id, argv=argv, limits=Limits(),
                         orphan_policy=OrphanPolicy.KILL, capture=False,
                         stdin=StdinMode.NULL, env={**base.env, MARKER_ENV: probe_id})
        try:
            handle = await _launch(signaller, launch)
        except StartFailed as exc:
            return 127, f"exec probe could not start: {exc.message}"
        except TetherError as exc:
            return None, f"exec probe could not start: {exc}"
        try:
            async with asyncio.timeout(timeout):
                status = await handle.wait_leader()
        except TimeoutError:
            return None, (f"exec probe {argv[0]!r} timed out after {timeout:g} s; its tree "
                          "was killed")
        finally:
            # The probe's whole tree dies with it, whatever happened (cancellation too),
            # before this returns or the cancellation goes on.
            await _finish(asyncio.ensure_future(dispose(handle)))
        code = status.exit_code if status.exit_code is not None else 128 + (status.signal or 0)
        return code, f"exec probe exited with {status.describe()}"

    return run
