"""Fixtures shared by every test; heavier ones live in tests/plugins/."""

from __future__ import annotations

pytest_plugins = [
    "tests.plugins.processes",
    "tests.plugins.docker_engine",
    "tests.plugins.sshd",
]
