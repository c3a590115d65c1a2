"""Shared test policy: skips that CI turns into failures.

Tests that need root, a real sshd, a real Docker engine or a real Prometheus
call ``require(ok, why)``. Outside CI they skip with the reason; under
``.ci/run`` (which sets TETHER_REQUIRE_ALL=1) the same condition fails the
test, so CI can never go green by skipping what it was meant to exercise.
"""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ALL = os.environ.get("TETHER_REQUIRE_ALL") == "1"


def require(ok: bool, why: str) -> None:
    if ok:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required in CI but unavailable: {why}", pytrace=False)
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (cgroup v2 directories, network namespaces, users)")


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    require(path is not None, f"needs {name!r} (Debian package {package}; .ci/install-deps installs it)")
    assert path is not None
    return path
