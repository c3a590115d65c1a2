"""Fixtures shared by every test; heavier ones live in tests/plugins/."""

from __future__ import annotations

import tether  # noqa: F401  (sets GRPC_ENABLE_FORK_SUPPORT before any test imports grpc)

pytest_plugins = [
    "tests.plugins.processes",
    "tests.plugins.docker_engine",
    "tests.plugins.sshd",
    "tests.plugins.postgres",
]
