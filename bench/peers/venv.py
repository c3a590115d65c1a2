"""The peers' own virtual environment (bench/.venv-peers): supervisor and circus from PyPI.

Each peer is checked by actually running it (``--version``, and for circus an import of its
client), so a peer that installs but does not run on this Python is reported with the
reason instead of a number.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
VENV = BENCH / ".venv-peers"
PACKAGES = {"supervisor": "supervisor", "circus": "circus"}


@dataclass
class Peer:
    name: str
    ok: bool
    version: str = ""
    why: str = ""


def bin_path(exe: str) -> Path:
    return VENV / "bin" / exe


def python() -> Path:
    return bin_path("python")


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _check(name: str) -> Peer:
    if name == "supervisor":
        probe = [str(bin_path("supervisord")), "--version"]
    else:
        probe = [str(python()), "-c",
                 "import circus, circus.client, circus.arbiter; print(circus.__version__)"]
    if not Path(probe[0]).exists():
        return Peer(name, False, why=f"{Path(probe[0]).name} missing from {VENV}")
    res = _run(probe, timeout=60)
    if res.returncode != 0:
        return Peer(name, False, why=f"does not run on Python {sys.version.split()[0]}: "
                    f"{_last_line(res.stderr or res.stdout)}")
    return Peer(name, True, version=res.stdout.strip())


def ensure(log: list[str]) -> dict[str, Peer]:
    """Create the venv if needed and install what is missing; report per peer."""
    if not python().exists():
        res = _run([sys.executable, "-m", "venv", str(VENV)])
        if res.returncode != 0:
            why = f"python -m venv failed: {_last_line(res.stderr)}"
            return {n: Peer(n, False, why=why) for n in PACKAGES}
        log.append(f"created {VENV}")
    peers = {n: _check(n) for n in PACKAGES}
    for name, peer in peers.items():
        if peer.ok:
            continue
        res = _run([str(python()), "-m", "pip", "install", "--quiet", PACKAGES[name]])
        if res.returncode != 0:
            peers[name] = Peer(name, False, why=f"pip install {PACKAGES[name]} failed: "
                               f"{_last_line(res.stderr)}")
            continue
        log.append(f"installed {PACKAGES[name]} into {VENV}")
        peers[name] = _check(name)
    return peers
