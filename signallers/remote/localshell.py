"""This host's ``sh`` as a ``RemoteShell``: a real transport, shipped for tests.

The toolkit's own tests run ``ops.sh`` through it under dash, bash and busybox ash, with
no Docker engine or SSH server in the way (the way httpcore ships a mock backend typed
against its network backend interface)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Mapping, Sequence

from tether.core.errors import TargetUnreachable
from tether.signallers.remote.wire import RemoteShell, ShellResult


class LocalShell(RemoteShell):
    def __init__(self, shell: Sequence[str] = ("sh",), env: Mapping[str, str] | None = None
                 ) -> None:
        self.shell = tuple(shell)
        self.env = dict(env) if env is not None else None
        self.target = f"local:{' '.join(self.shell)}"
        self.runs = 0

    async def run(self, script: str, argv: Sequence[str], *, what: str,
                  timeout: float | None = None, unverified: str = "") -> ShellResult:
        self.runs += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.shell, "-c", script, "tether", *argv, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        except OSError as exc:
            raise TargetUnreachable(self.target, f"cannot run {self.shell[0]} while {what}: "
                                                 f"{exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            if isinstance(exc, TimeoutError):
                raise TargetUnreachable(self.target, f"no answer within {timeout:g} s while "
                                                     f"{what}") from exc
            raise
        return ShellResult(proc.returncode, out.decode(errors="replace"),
                           err.decode(errors="replace"))
