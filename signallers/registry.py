"""Find signallers through the ``tether.signallers`` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from tether.core.errors import SignallerNotFound
from tether.signallers.base import Signaller, SignallerContext, SignallerFactory

GROUP = "tether.signallers"


def known_kinds() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load_factory(kind: str) -> SignallerFactory:
    """The factory for ``kind``; imports its module only now (docker and asyncssh are slow)."""
    for ep in entry_points(group=GROUP):
        if ep.name == kind:
            factory: SignallerFactory = ep.load()
            return factory
    raise SignallerNotFound(kind, known_kinds())


def split_target(target: str) -> tuple[str, str]:
    """``"docker:web"`` -> ``("docker", "web")``; ``""`` and ``"local"`` -> ``("local", "")``."""
    if not target or target == "local":
        return "local", ""
    kind, sep, where = target.partition(":")
    if not sep or not where:
        raise SignallerNotFound(target, known_kinds())
    return kind, where


class Signallers:
    """The signallers of one agent, created on first use and closed together."""

    def __init__(self, context: SignallerContext) -> None:
        self._context = context
        self._by_kind: dict[str, Signaller] = {}

    def get(self, kind: str) -> Signaller:
        found = self._by_kind.get(kind)
        if found is None:
            found = load_factory(kind)(self._context)
            self._by_kind[kind] = found
        return found

    def add(self, signaller: Signaller) -> None:
        self._by_kind[signaller.kind] = signaller

    def loaded(self) -> list[Signaller]:
        return list(self._by_kind.values())

    async def aclose(self) -> None:
        for s in self._by_kind.values():
            await s.aclose()
        self._by_kind.clear()
