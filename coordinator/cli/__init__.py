"""The `tether` command line (``python -m tether.coordinator.cli`` runs it too)."""

from tether.coordinator.cli.main import console, main
from tether.coordinator.cli.parser import build_parser

__all__ = ["build_parser", "console", "main"]
