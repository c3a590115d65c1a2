"""An agent whose coordinator-epoch file is a FIFO (or any file whose open blocks: a hung
NFS/FUSE state directory) never starts and never says why: Fence.__init__
(agent/fence.py:51-53) does `path.exists()` then `path.read_text()` synchronously, and
opening a FIFO for reading blocks until a writer comes. The state file next to it is
checked and refused with a message (review1's copied/hung state cases); this one hangs
start-up silently, so the agent (and its orphan sweep, its re-adoption of keep groups)
never runs. Fixed: it refuses to start, naming the file and why.

Run: .venv-test/bin/python -m tests.review3.epoch_fifo_hangs_agent
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.review3.harness import D


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="r3-fifo-"))
    state = root / "agent"
    state.mkdir()
    os.mkfifo(state / "coordinator-epoch-f1.json")
    d = D("agent", ["--listen", "127.0.0.1:0", "--coordinator", "127.0.0.1:1", "--name",
                    "f1", "--state-dir", str(state)], root / "agent.log", wait=False)
    try:
        d.wait_listening(20)
    except TimeoutError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            d.proc.wait(5)  # its stdout closes a moment before it can be reaped
        if d.proc.poll() is not None and "not a regular file" in d.log():
            print("the agent refused to start, saying why:",
                  [ln for ln in d.log().splitlines() if "regular file" in ln][:1])
            return 0
        print("agent log:", d.log()[-800:] or "(empty)")
        print("DEFECT: the agent neither started nor said why within 20 s")
        return 1
    finally:
        if d.proc.poll() is None and not d.address:
            with contextlib.suppress(OSError):  # let it go on (never block on the FIFO)
                fd = os.open(state / "coordinator-epoch-f1.json", os.O_WRONLY | os.O_NONBLOCK)
                os.write(fd, b'{"epoch": 0}')
                os.close(fd)
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
