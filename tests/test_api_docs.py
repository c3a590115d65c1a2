"""docs/api.md is generated from tether.client's docstrings (docs/gen_api.py) and kept
current: a changed signature or docstring without a regenerated file fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_api_reference_is_current() -> None:
    res = subprocess.run([sys.executable, str(REPO / "docs" / "gen_api.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_the_api_reference_covers_the_window_and_every_public_name() -> None:
    import tether.client

    text = (REPO / "docs" / "api.md").read_text()
    for name in tether.client.__all__:
        assert f"`{name}`" in text, name
    assert "### method `AsyncClient.window`" in text and "lease_grace" in text
    assert "(no docstring)" not in text, "every public name says what it does"
