"""Configuration plugins: enhance a spec before launch (the project's node, python, java).

A plugin is a ``SpecPlugin``: a ``name``, a ``priority``, ``applies(spec)`` and
``enhance(spec) -> spec``. Plugins are found through the ``tether.plugins``
entry-point group; each entry point is a factory called once at agent start with a
``PluginContext`` (the agent's environment) that returns the plugin, or ``None``
when its tool is not on this host (no root directory): only detected tools are
registered. Built-ins: ``nvm``, ``pyenv``, ``jenv``, ``asdf`` and ``mise``
(``tether.agent.toolchains``).

At spawn the registered plugins run in ascending ``(priority, name)`` order, each
on the enhanced spec of the one before, on a small thread pool with a deadline
(their file reads may block: a ``.nvmrc`` on a stuck NFS mount must not freeze the
agent). A plugin may change the environment and argv only; its result is checked
again by the model's rules. A plugin that raises, times out or returns something
else logs a warning and the spec goes on unchanged, except ``StartFailed`` (a
version file naming a version that is not installed: ``toolchain_missing``), which
fails the start. What each plugin changed is recorded as one line per change
("pyenv: PATH += /root/.pyenv/versions/3.12.1/bin"): in the group's context, the
Spawn answer, ``tether show`` and the exit record. A plugin that reads files of the
project should find and read them with ``tether.agent.versionfiles`` (the agent is
usually root, and the project tree may hold files other users planted).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Final, Protocol, TypeVar, runtime_checkable

from tether.core.errors import InvalidSpec, StartFailed
from tether.core.model import GroupSpec

log = logging.getLogger(__name__)

GROUP: Final = "tether.plugins"
#: How long one plugin may take for one spawn before it counts as failed.
PLUGIN_DEADLINE: Final = 5.0
#: Threads for plugin file reads; a stuck read holds one, never the event loop.
PLUGIN_THREADS: Final = 4
#: Fields a plugin may change; any other change discards its result.
MUTABLE: Final = ("env", "argv")

T = TypeVar("T")


@runtime_checkable
class SpecPlugin(Protocol):
    """Enhances a spec before launch (e.g. puts the project's toolchain first on PATH)."""

    name: str
    #: Lower runs first; a later plugin's PATH entries end up before an earlier one's.
    priority: int

    def applies(self, spec: GroupSpec) -> bool:
        """Whether this plugin has anything to do for ``spec`` (may read files)."""
        ...

    def enhance(self, spec: GroupSpec) -> GroupSpec:
        """The enhanced spec. Raise ``StartFailed`` to fail the start with a class (e.g.
        ``toolchain_missing``); any other exception only skips this plugin."""
        ...


@dataclass(frozen=True)
class PluginContext:
    """What a plugin factory sees at agent start."""

    #: The agent's environment (HOME, NVM_DIR, PYENV_ROOT, JENV_ROOT, ASDF_DATA_DIR...).
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


PluginFactory = Callable[[PluginContext], SpecPlugin | None]


def base_path(spec: GroupSpec) -> str:
    """The PATH the child would search without plugins: the spec's, else the agent's when
    ``inherit_env``, else the default search path."""
    if "PATH" in spec.env:
        return spec.env["PATH"]
    if spec.inherit_env and "PATH" in os.environ:
        return os.environ["PATH"]
    return os.defpath


def prepend_path(spec: GroupSpec, *dirs: str, **env: str) -> GroupSpec:
    """``spec`` with ``dirs`` first on its PATH and ``env`` set: what toolchain plugins do."""
    new = dict(spec.env)
    new.update(env)
    if dirs:
        new["PATH"] = ":".join([*dirs, base_path(spec)])
    return replace(spec, env=_frozen(new))


def _frozen(d: Mapping[str, str]) -> MappingProxyType[str, str]:
    return MappingProxyType(dict(d))


def describe_changes(name: str, before: GroupSpec, after: GroupSpec) -> tuple[str, ...]:
    """One line per change: ``PATH += DIR`` for prepended entries, ``KEY = VALUE`` for set
    ones, ``KEY unset``, ``argv: OLD -> NEW``."""
    lines = []
    old_env, new_env = dict(before.env), dict(after.env)
    for key in sorted(set(old_env) | set(new_env)):
        old, new = old_env.get(key), new_env.get(key)
        if old == new:
            continue
        if new is None:
            lines.append(f"{name}: {key} unset")
            continue
        base = old if old is not None else (base_path(before) if key == "PATH" else None)
        if base is not None and new.endswith(":" + base) and len(new) > len(base) + 1:
            lines.append(f"{name}: {key} += {new[:-len(base) - 1]}")
        else:
            lines.append(f"{name}: {key} = {new}")
    if before.argv != after.argv:
        lines.append(f"{name}: argv {' '.join(before.argv)[:80]} -> {' '.join(after.argv)[:80]}")
    return tuple(lines)


def load(context: PluginContext | None = None, disabled: Iterable[str] = ()) -> list[SpecPlugin]:
    """The plugins of the ``tether.plugins`` group whose tool is on this host, in order.
    ``disabled`` names plugins turned off in the agent's configuration."""
    context = context or PluginContext()
    off = set(disabled)
    found: list[SpecPlugin] = []
    for ep in entry_points(group=GROUP):
        if ep.name in off:
            log.info("plugin %s: off (agent configuration)", ep.name)
            continue
        try:
            factory: PluginFactory = ep.load()
            plugin = factory(context)
        except Exception as exc:  # a broken plugin package must not stop the agent
            log.warning("plugin %s (%s) cannot be loaded: %s; going on without it", ep.name,
                        ep.value, exc)
            continue
        if plugin is None:
            log.info("plugin %s: its tool is not on this host; not registered", ep.name)
            continue
        if not isinstance(plugin, SpecPlugin):
            log.warning("plugin %s (%s) is not a SpecPlugin (name, priority, applies, "
                        "enhance); going on without it", ep.name, ep.value)
            continue
        found.append(plugin)
    return order(found)


def order(plugins: Iterable[SpecPlugin]) -> list[SpecPlugin]:
    return sorted(plugins, key=lambda p: (p.priority, p.name))


class Plugins:
    """The registered plugins of one agent, applied to specs on their own thread pool."""

    def __init__(self, plugins: Iterable[SpecPlugin] = (), deadline: float = PLUGIN_DEADLINE,
                 on_failure: Callable[[str], None] = lambda name: None) -> None:
        self.plugins = order(plugins)
        self.deadline = deadline
        self.on_failure = on_failure
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def __bool__(self) -> bool:
        return bool(self.plugins)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    async def _run(self, fn: Callable[[GroupSpec], T], spec: GroupSpec) -> T:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                PLUGIN_THREADS, thread_name_prefix="tether-plugin")
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, spec)
        async with asyncio.timeout(self.deadline):
            return await asyncio.shield(fut)

    async def apply(self, spec: GroupSpec, glog: logging.LoggerAdapter[logging.Logger] | None
                    = None) -> tuple[GroupSpec, tuple[str, ...]]:
        """The enhanced spec and the changes made. Raises ``StartFailed`` only."""
        out = glog or log
        changes: list[str] = []
        for plugin in self.plugins:
            try:
                if not await self._run(plugin.applies, spec):
                    continue
                enhanced = await self._run(plugin.enhance, spec)
                checked = check_enhanced(plugin.name, spec, enhanced)
            except StartFailed:
                raise
            except TimeoutError:
                self.on_failure(plugin.name)
                out.warning("plugin %s did not answer within %g s (a version file on a stuck "
                            "mount?); the spec goes on without it", plugin.name, self.deadline)
                continue
            except Exception as exc:
                self.on_failure(plugin.name)
                out.warning("plugin %s failed (%s: %s); the spec goes on without it",
                            plugin.name, type(exc).__name__, exc)
                continue
            made = describe_changes(plugin.name, spec, checked)
            changes.extend(made)
            spec = checked
            if made:
                out.info("%s", "; ".join(made))
        return spec, tuple(changes)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def check_enhanced(name: str, before: GroupSpec, after: object) -> GroupSpec:
    """The enhanced spec, validated again; raises ``InvalidSpec`` naming the plugin."""
    if not isinstance(after, GroupSpec):
        raise InvalidSpec(f"plugin {name} returned {type(after).__name__}, not a GroupSpec")
    for f in GroupSpec.__dataclass_fields__:
        if f not in MUTABLE and getattr(after, f) != getattr(before, f):
            raise InvalidSpec(f"plugin {name} changed {f}; plugins may change only "
                              f"{' and '.join(MUTABLE)}")
    if not isinstance(after.env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in after.env.items()):
        raise InvalidSpec(f"plugin {name} set an environment that is not strings")
    if not isinstance(after.argv, tuple) or not all(isinstance(a, str) for a in after.argv):
        raise InvalidSpec(f"plugin {name} set an argv that is not a tuple of strings")
    # Construct it again: every rule of the model runs on the enhanced spec.
    return replace(after, env=_frozen(after.env))
